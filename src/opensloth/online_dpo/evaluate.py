"""Held-out accuracy: verifier-checked answers to unseen prompts, sharded over the ranks and gathered.

Two numbers per policy:

- ``accuracy``: the greedy answer is right (what a deployed model answers);
- ``sampled_accuracy``: the mean verifier score of candidates sampled with the
  rollout settings (what the next rollout will see). Seeds are fixed, so two
  policies are compared on the same random draws.
"""

from __future__ import annotations

from opensloth.distributed import gather_checked
from opensloth.errors import UserInputError
from opensloth.rollout.generate import generate_candidates
from opensloth.rollout.judges import VerifierJudge, judge_traces
from opensloth.rollout.seeding import merge_shards, shard_indices
from opensloth.rollout.settings import RolloutSettings

EVAL_SEED_ITERATION = -1  # enters the sampling seeds of the held-out check, never used by a rollout


def heldout_accuracy(model, tokenizer, prompts: list[dict], *, kind: str | None, max_new_tokens: int,
                     batch_size: int, env, backend: str = "hf", sampling=None) -> dict:
    """Greedy (and, with ``sampling``, sampled) accuracy of ``model`` on ``prompts``.

    Args:
        kind: the task kind, or ``None`` to detect it per prompt.
        prompts: ``[{"index", "id", "prompt"}]``; every rank passes the same list.
        sampling: a :class:`opensloth.rollout.settings.RolloutSettings` for the
            sampled accuracy, or ``None`` to skip it.

    Returns:
        ``{"n", "correct", "accuracy", "sampled_accuracy", "samples", "examples"}``,
        identical on every rank; ``examples`` holds the first three prompts with their greedy answers.
    """

    greedy = RolloutSettings(samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    mine = [prompts[i] for i in shard_indices(len(prompts), env.rank, env.world_size)]
    judge = VerifierJudge(kind)
    judged, sampled, error = [], None, None
    try:
        judged, _ = judge_traces(generate_candidates(model, tokenizer, mine, greedy, iteration=0, backend=backend),
                                 judge)
        if sampling is not None and not sampling.greedy:
            records = generate_candidates(model, tokenizer, mine, sampling, iteration=EVAL_SEED_ITERATION,
                                          backend=backend)
            _, counts = judge_traces(records, judge)
            sampled = (counts["mean_score"] or 0.0) * counts["scored"], counts["scored"]
    except UserInputError as exc:
        error = f"rank {env.rank}: held-out evaluation: {exc}"
    gathered = gather_checked({"judged": judged, "sampled": sampled}, error)
    merged = merge_shards([g["judged"] for g in gathered])
    correct = sum(rec["candidates"][0]["score"] for rec in merged if rec["candidates"])
    sampled_parts = [g["sampled"] for g in gathered if g["sampled"] is not None]
    n_sampled = sum(n for _, n in sampled_parts)
    return {
        "n": len(merged),
        "correct": int(correct),
        "accuracy": correct / len(merged) if merged else None,
        "sampled_accuracy": sum(s for s, _ in sampled_parts) / n_sampled if n_sampled else None,
        "samples": n_sampled,
        "examples": [{"prompt": rec["prompt"], "answer": rec["candidates"][0]["text"] if rec["candidates"] else None}
                     for rec in merged[:3]],
    }
