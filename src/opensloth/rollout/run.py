"""One rollout iteration on every rank: shard, generate, judge, gather, pair, write.

Each rank generates (and judges) its stride of the prompts
(:func:`opensloth.rollout.seeding.shard_indices`); the results of all ranks
are gathered with ``all_gather_object`` and ordered by prompt index, so after
:func:`run_rollout` every rank holds the same records and builds the same
preference pairs -- the precondition for a DPO round that starts on all ranks
at once. A user error on any rank (a judge returning garbage) is gathered as
well and raised on every rank, so no rank is left waiting in a collective.

Files (rank 0 writes, atomically, then all ranks meet at a barrier)::

    <out_dir>/rollouts.jsonl   one line per prompt: traces (prompt included)
    <out_dir>/judged.jsonl     the judged schema of opensloth.data.judged (with --judge)
    <out_dir>/pairs.jsonl      best-vs-worst pairs (with --judge)
    <out_dir>/manifest.json    counts, settings, model, judge, timings
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from opensloth.atomic import write_json_atomic, write_jsonl_atomic
from opensloth.data.judged import pairs_from_records
from opensloth.distributed import barrier, gather_checked
from opensloth.errors import UserInputError
from opensloth.log import log_rank0
from opensloth.rollout.generate import generate_candidates
from opensloth.rollout.judges import judge_traces
from opensloth.rollout.seeding import merge_shards, shard_indices
from opensloth.rollout.settings import RolloutSettings

ROLLOUTS_FILE = "rollouts.jsonl"
JUDGED_FILE = "judged.jsonl"
PAIRS_FILE = "pairs.jsonl"
MANIFEST_FILE = "manifest.json"


@dataclass
class RolloutResult:
    """What every rank holds after :func:`run_rollout`."""

    records: list[dict]
    judged: list[dict] | None
    pairs: list[dict] | None
    manifest: dict


def build_pairs(judged: list[dict]):
    """Best-vs-worst pairs of judged records, with the counted skips (ties, single candidates, ...).

    Returns ``(pairs, report)`` where ``report`` is an :class:`opensloth.data.report.DropReport`.
    """

    return pairs_from_records(enumerate(judged), "judged rollouts")


def _finish_counts(records: list[dict]) -> dict:
    counts = {"eos": 0, "length": 0, "no_tokens": 0}
    for record in records:
        for cand in record["candidates"]:
            counts[cand["finish"]] += 1
            counts["no_tokens"] += cand["new_tokens"] == 0
    return counts


def run_rollout(model, tokenizer, prompts: list[dict], settings: RolloutSettings, *, iteration: int, out_dir: str,
                env, judge=None, model_info: dict | None = None, backend: str = "hf") -> RolloutResult:
    """Generate, judge and gather one iteration's rollouts; rank 0 writes the files.

    Args:
        model, tokenizer: the policy (same weights on every rank).
        prompts: all prompts of the iteration (every rank passes the same list).
        settings: sampling settings.
        iteration: enters the seeds and the manifest.
        out_dir: folder of this iteration's files (e.g. ``rollout_output/iter_1``).
        env: the :class:`opensloth.distributed.DistEnv` of this process.
        judge: a judge (see :mod:`opensloth.rollout.judges`) or ``None`` for traces only.
        model_info: recorded in the manifest (path, adapter, backend, dtype).

    Raises:
        UserInputError: no prompts, or a judge error on any rank (raised on every rank).
    """

    if not prompts:
        raise UserInputError("empty rollout: there are no prompts to generate for")
    start = time.perf_counter()
    mine = [prompts[i] for i in shard_indices(len(prompts), env.rank, env.world_size)]
    log_rank0(f"rollout iteration {iteration}: distributing {len(prompts)} prompts x {settings.samples} samples "
              f"across {env.world_size} rank(s)")
    records, judged, counts, error = [], [], None, None
    generate_s = judge_s = 0.0
    try:
        t0 = time.perf_counter()
        records = generate_candidates(model, tokenizer, mine, settings, iteration=iteration, backend=backend)
        generate_s = time.perf_counter() - t0
        for record in records:
            record["rank"] = env.rank
        if judge is not None:
            t0 = time.perf_counter()
            judged, counts = judge_traces(records, judge)
            judge_s = time.perf_counter() - t0
    except UserInputError as exc:
        error = f"rank {env.rank}: {exc}"
    gathered = gather_checked({"rank": env.rank, "records": records, "judged": judged, "counts": counts,
                               "generate_s": generate_s, "judge_s": judge_s}, error)
    all_records = merge_shards([g["records"] for g in gathered])
    log_rank0(f"rollout iteration {iteration}: generated {sum(len(r['candidates']) for r in all_records)} total "
              f"traces for {len(all_records)} prompts")

    manifest = {
        "iteration": iteration,
        "world_size": env.world_size,
        "model": model_info or {},
        "config": dataclasses.asdict(settings),
        "judge": getattr(judge, "name", None),
        "counts": {
            "prompts": len(all_records),
            "candidates": sum(len(r["candidates"]) for r in all_records),
            "prompts_per_rank": [len(g["records"]) for g in gathered],
            "finish": _finish_counts(all_records),
        },
        "timings": {
            "generate_s_per_rank": [round(g["generate_s"], 3) for g in gathered],
            "judge_s_per_rank": [round(g["judge_s"], 3) for g in gathered],
        },
        "files": {"rollouts": ROLLOUTS_FILE},
    }
    all_judged = pairs = None
    if judge is not None:
        all_judged = merge_shards([g["judged"] for g in gathered])
        pairs, report = build_pairs(all_judged)
        judge_counts = [g["counts"] for g in gathered]
        scored = sum(c["scored"] for c in judge_counts)
        manifest["counts"]["judged"] = {
            "scored": scored,
            "prompt_mismatch": sum(c["prompt_mismatch"] for c in judge_counts),
            "mean_score": (sum(c["mean_score"] * c["scored"] for c in judge_counts if c["scored"]) / scored
                           if scored else None),
        }
        manifest["counts"]["pairs"] = len(pairs)
        manifest["counts"]["skipped"] = dict(report.dropped)
        manifest["files"].update(judged=JUDGED_FILE, pairs=PAIRS_FILE)
        log_rank0(f"rollout iteration {iteration}: {report.summary()}")
    manifest["timings"]["total_s"] = round(time.perf_counter() - start, 3)
    if env.is_main:
        os.makedirs(out_dir, exist_ok=True)
        write_jsonl_atomic(os.path.join(out_dir, ROLLOUTS_FILE), all_records)
        if all_judged is not None:
            write_jsonl_atomic(os.path.join(out_dir, JUDGED_FILE), all_judged)
            write_jsonl_atomic(os.path.join(out_dir, PAIRS_FILE), pairs)
        write_json_atomic(os.path.join(out_dir, MANIFEST_FILE), manifest)  # last: its presence means complete
    barrier()
    return RolloutResult(records=all_records, judged=all_judged, pairs=pairs, manifest=manifest)
