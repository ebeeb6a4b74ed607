"""Benchmark: slowest-rank compute per epoch of batching strategies, relative to the physical limit.

    python scripts/bench_packing.py                 # full table + 2-rank CPU wall-clock, writes docs/benchmarks.md
    python scripts/bench_packing.py --quick         # fewer samples and layouts
    python scripts/bench_packing.py --skip-ddp      # simulation only

Every optimizer step waits for its slowest rank, so the cost of an epoch is
the sum over steps of the slowest rank's compute. The metric divides that by
the physical limit, (total cost of every real token) / world_size: 1.00 means
no padding and perfectly even ranks.

Two cost models (``scripts``-level constants below):

- linear: a token costs 1; a padded micro-batch costs rows x longest row.
- quadratic: adds attention, ``C_ATTN * L**2`` per attended block of length L:
  per sequence for padding-free (varlen) batches, per row for padded rows and
  for packed rows with a dense 4D mask. Its limit is ``sum(l + C_ATTN*l**2) / W``.

Strategies, all simulated on the same sample order (a seeded permutation, as
accelerate's SeedableRandomSampler draws it) and dealt to ranks by
accelerate's own ``BatchSamplerShard`` (even_batches):

- trl-default: pad every micro-batch to its longest sample.
- trl-bfd: TRL's ``_pack_bfd`` (called, not re-implemented) on the dataset in
  chunks of 1000 rows (``datasets.map`` batches), rows of max_len, then
  padding-free micro-batches of B packed rows.
- hf-batch-rebalance: transformers' ``BatchRebalanceSampler`` (called), padded.
- unsloth-token-balance: Unsloth's ``TokenBalancedSampler`` (called; loaded
  from the installed file without importing Unsloth) with cross-rank
  balancing; it only switches on for padding-free batches, so varlen cost.
- opensloth-dp: the original OpenSloth repacking: each rank's own samples of
  the step, sorted, split into its micro-batches by the least-padding DP.
- opensloth (varlen / rows4d / padded): :func:`opensloth.packing.plan_step`
  over the whole step window, in each of the three layouts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from opensloth.markdown import update_markdown_block  # noqa: E402
from opensloth.packing import (  # noqa: E402
    balanced_rows,
    min_padding_partition,
    padded_cost,
    plan_step,
    sequence_cost,
)

C_ATTN = 1.0 / 16384  # attention adds 25% to a 4096-token sequence's linear cost (a ~1-3B model)
SEED = 3407
SECTION = "bench_packing"  # docs/benchmarks.md block between <!-- bench_packing:start/end -->

STRATEGIES = [
    "trl-default",
    "trl-bfd",
    "hf-batch-rebalance",
    "unsloth-token-balance",
    "opensloth-dp",
    "opensloth-padded",
    "opensloth-rows4d",
    "opensloth",
]


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


def lognormal_lengths(n, rng, median=600, sigma=0.9, cap=4096):
    return [max(1, min(cap, int(round(math.exp(math.log(median) + sigma * rng.gauss(0, 1)))))) for _ in range(n)]


def bimodal_lengths(n, rng, cap=4096):
    """75% short questions (median 150), 25% long documents (median 3000)."""
    out = []
    for _ in range(n):
        if rng.random() < 0.75:
            out.append(max(8, min(cap, int(math.exp(math.log(150) + 0.5 * rng.gauss(0, 1))))))
        else:
            out.append(max(8, min(cap, int(math.exp(math.log(3000) + 0.2 * rng.gauss(0, 1))))))
    return out


def uniform_lengths(n, rng, cap=4096):
    return [rng.randint(32, cap) for _ in range(n)]


def real_lengths():
    """Token lengths of data/sft/train.jsonl with the tiny tokenizer and its chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO / "data" / "tiny-qwen3"))
    out = []
    for line in (REPO / "data" / "sft" / "train.jsonl").read_text().splitlines():
        ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False)
        out.append(len(ids["input_ids"] if isinstance(ids, dict) else ids))
    return out


# ---------------------------------------------------------------------------
# The stock order and dealing (accelerate)
# ---------------------------------------------------------------------------


def stock_order(n, seed=SEED):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)  # SeedableRandomSampler: initial_seed + epoch, epoch 0
    return torch.randperm(n, generator=g).tolist()


def deal(order, world, batch):
    """Per rank, the index batches accelerate's BatchSamplerShard yields (even_batches)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    sampler = BatchSampler(order, batch, drop_last=False)
    if world == 1:
        return [list(sampler)]
    return [list(BatchSamplerShard(sampler, world, r, split_batches=False, even_batches=True)) for r in range(world)]


def steps(streams, accum):
    m = len(streams[0])
    for s in range(0, m, accum):
        yield [stream[s:s + accum] for stream in streams]


def varlen_cost(lengths, coef):
    return sum(sequence_cost(x, coef) for x in lengths)


# ---------------------------------------------------------------------------
# Strategies: each returns the summed slowest-rank cost over one epoch
# ---------------------------------------------------------------------------


def run_trl_default(L, world, batch, accum, cap, coef):
    total = 0.0
    for window in steps(deal(stock_order(len(L)), world, batch), accum):
        total += max(sum(padded_cost([L[i] for i in mb], coef) for mb in mbs) for mbs in window)
    return total


def run_opensloth_dp(L, world, batch, accum, cap, coef):
    total = 0.0
    for window in steps(deal(stock_order(len(L)), world, batch), accum):
        worst = 0.0
        for mbs in window:
            items = [L[i] for mb in mbs for i in mb]
            groups = min_padding_partition(items, min(len(mbs), len(items)), attention_coef=coef)
            worst = max(worst, sum(padded_cost([items[j] for j in g], coef) for g in groups))
        total += worst
    return total


def _window(window):
    indices, drawn = [], []
    for mbs in window:
        rank = []
        for mb in mbs:
            rank.append(list(range(len(indices), len(indices) + len(mb))))
            indices.extend(mb)
        drawn.append(rank)
    return indices, drawn


def run_opensloth(L, world, batch, accum, cap, coef, layout="varlen", timings=None):
    total = 0.0
    for window in steps(deal(stock_order(len(L)), world, batch), accum):
        indices, drawn = _window(window)
        lens = [L[i] for i in indices]
        t0 = time.perf_counter()
        plan = plan_step(lens, world, len(window[0]), token_budget=batch * cap, attention_coef=coef,
                         layout=layout, drawn=drawn)
        if layout == "rows4d":
            costs = []
            for mbs in plan.micro_batches:
                c = 0.0
                for mb in mbs:
                    if mb:
                        ml = [lens[p] for p in mb]
                        rows = balanced_rows(ml, cap, attention_coef=coef)
                        c += padded_cost([sum(ml[i] for i in row) for row in rows], coef)
                costs.append(c)
            step_cost = max(costs)
        else:
            step_cost = max(plan.rank_loads)
        if timings is not None:
            timings.append(time.perf_counter() - t0)
        total += step_cost
    return total


def run_trl_bfd(L, world, batch, accum, cap, coef):
    import pyarrow as pa
    from trl.data_utils import _pack_bfd

    rows = []  # per packed row, its sequence lengths
    for start in range(0, len(L), 1000):  # datasets.map(batched=True) hands 1000 rows at a time
        chunk = L[start:start + 1000]
        table = pa.table({"input_ids": pa.array([[0] * n for n in chunk], type=pa.list_(pa.int32()))})
        rows.extend(_pack_bfd(table, cap).column("seq_lengths").to_pylist())
    total = 0.0
    for window in steps(deal(stock_order(len(rows)), world, batch), accum):
        total += max(sum(varlen_cost([x for i in mb for x in rows[i]], coef) for mb in mbs) for mbs in window)
    return total


def run_batch_rebalance(L, world, batch, accum, cap, coef):
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    streams = []
    for r in range(world):
        sampler = BatchRebalanceSampler(lengths=L, effective_batch_size=batch * accum * world, dp_size=world,
                                        grad_accum=accum, shuffle=True, seed=SEED, rank=r, drop_last=False)
        streams.append(list(sampler))
    return sum(max(sum(padded_cost([L[i] for i in mb], coef) for mb in mbs) for mbs in window)
               for window in steps(streams, accum))


def _unsloth_token_budget():
    spec = importlib.util.find_spec("unsloth")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "token_budget.py"
    if not path.exists():
        return None
    mod_spec = importlib.util.spec_from_file_location("_unsloth_token_budget", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)  # torch + stdlib only; does not import unsloth itself
    return module


def run_unsloth_token_balance(L, world, batch, accum, cap, coef):
    module = _unsloth_token_budget()
    if module is None:
        return None
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    order = stock_order(len(L))
    # _balance_dataloader: keep the first window when accelerate will wrap around to it.
    keep_first = len(order) % (world * batch) != 0
    balanced = list(module.TokenBalancedSampler(order, L, batch, accum, world, cross_rank=world > 1,
                                                keep_first_window=keep_first))
    sampler = BatchSampler(balanced, batch, drop_last=False)
    if world == 1:
        streams = [list(sampler)]
    else:
        streams = [list(BatchSamplerShard(sampler, world, r, split_batches=False, even_batches=True))
                   for r in range(world)]
    return sum(max(sum(varlen_cost([L[i] for i in mb], coef) for mb in mbs) for mbs in window)
               for window in steps(streams, accum))


RUNNERS = {
    "trl-default": run_trl_default,
    "trl-bfd": run_trl_bfd,
    "hf-batch-rebalance": run_batch_rebalance,
    "unsloth-token-balance": run_unsloth_token_balance,
    "opensloth-dp": run_opensloth_dp,
    "opensloth-padded": lambda *a: run_opensloth(*a, layout="padded"),
    "opensloth-rows4d": lambda *a: run_opensloth(*a, layout="rows4d"),
    "opensloth": lambda *a: run_opensloth(*a, layout="varlen"),
}


def evaluate(L, world, batch, accum, cap, coefs=(0.0, C_ATTN)):
    """{strategy: (ratio per cost model)} for one workload and layout."""
    out = {}
    for name in STRATEGIES:
        ratios = []
        for coef in coefs:
            limit = sum(sequence_cost(x, coef) for x in L) / world
            cost = RUNNERS[name](L, world, batch, accum, cap, coef)
            ratios.append(None if cost is None else cost / limit)
        out[name] = tuple(ratios)
    return out


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def fmt(ratio):
    return "absent" if ratio is None else f"{ratio:.3f}"


def table(rows, title_cols):
    head = "| " + " | ".join(title_cols + STRATEGIES) + " |"
    sep = "|" + "|".join(["---"] * len(title_cols) + ["---:"] * len(STRATEGIES)) + "|"
    lines = [head, sep]
    for key, res, model in rows:
        cells = []
        vals = {s: res[s][model] for s in STRATEGIES}
        best = min(v for v in vals.values() if v is not None)
        for s in STRATEGIES:
            v = vals[s]
            text = fmt(v)
            cells.append(f"**{text}**" if v is not None and abs(v - best) < 5e-4 else text)
        lines.append("| " + " | ".join(list(key) + cells) + " |")
    return "\n".join(lines)


def ddp_wallclock(samples, steps_, quick):
    """Run scripts/bench_packing_ddp.py on 2 gloo ranks; returns its JSON result."""
    out = REPO / ".log" / "bench_packing_ddp.json"
    out.parent.mkdir(exist_ok=True)
    if out.exists():
        out.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "scripts" / "bench_packing_ddp.py"), "--out", str(out), "--samples", str(samples),
           "--max_steps", str(steps_)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples and layouts")
    p.add_argument("--skip-ddp", action="store_true", help="skip the 2-rank CPU wall-clock run")
    p.add_argument("--samples", type=int, default=4096, help="synthetic samples per workload")
    p.add_argument("--ddp-samples", type=int, default=480, help="samples of data/sft for the wall-clock run")
    p.add_argument("--ddp-steps", type=int, default=30, help="optimizer steps per wall-clock run")
    p.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    args = p.parse_args()

    n = 2048 if args.quick else args.samples
    rng = random.Random(SEED)
    workloads = {
        "lognormal": (lognormal_lengths(n, rng), 4096),
        "bimodal": (bimodal_lengths(n, rng), 4096),
        "uniform": (uniform_lengths(n, rng), 4096),
    }
    real = real_lengths()
    workloads["data/sft"] = (real, max(real))
    layouts = [(w, b, a) for w in (1, 2, 4, 8) for (b, a) in ((2, 4), (1, 8), (8, 1))]
    if args.quick:
        layouts = [(4, 2, 4), (2, 1, 8), (8, 8, 1)]

    t_start = time.time()
    target_rows, all_rows = [], []
    for name, (L, cap) in workloads.items():
        res = evaluate(L, 4, 2, 4, cap)
        for model in (0, 1):
            target_rows.append(((name, "linear" if model == 0 else "quadratic"), res, model))
        print(f"{name} 4x2x4: " + ", ".join(f"{s}={fmt(res[s][0])}/{fmt(res[s][1])}" for s in STRATEGIES),
              flush=True)
    for name, (L, cap) in workloads.items():
        for w, b, a in layouts:
            res = evaluate(L, w, b, a, cap, coefs=(0.0,))
            all_rows.append(((name, str(w), str(b), str(a)), res, 0))
            print(f"{name} W={w} B={b} GA={a}: " + ", ".join(f"{s}={fmt(res[s][0])}" for s in STRATEGIES),
                  flush=True)

    # Planning overhead (pure planner time per step) at the target layout.
    L, cap = workloads["lognormal"]
    plan_times: list[float] = []
    run_opensloth(L, 4, 2, 4, cap, C_ATTN, "varlen", timings=plan_times)
    plan_times_8: list[float] = []
    run_opensloth(L, 8, 2, 4, cap, C_ATTN, "varlen", timings=plan_times_8)
    sim_seconds = time.time() - t_start

    ddp = None if args.skip_ddp else ddp_wallclock(args.ddp_samples, args.ddp_steps, args.quick)

    # Verdicts.
    lognormal_lin = next(r for r in target_rows if r[0] == ("lognormal", "linear"))[1]["opensloth"][0]
    wins, worst_gap = [], 0.0
    for key, res, model in target_rows + all_rows:
        best, best_name = min((res[s][model], s) for s in STRATEGIES if res[s][model] is not None)
        if res["opensloth"][model] > best + 5e-4:
            worst_gap = max(worst_gap, res["opensloth"][model] - best)
            wins.append(f"{'/'.join(key)} ({res['opensloth'][model]:.3f} vs {best_name} {best:.3f})")

    md = [
        "## Packing and cross-rank balancing (`scripts/bench_packing.py`)",
        "",
        "Slowest-rank compute per epoch divided by the physical limit (all real tokens / world size); "
        "1.000 is perfect. Each step waits for its slowest rank, so this is the epoch's compute time "
        f"relative to ideal. Linear model: a token costs 1, padding included. Quadratic model: adds "
        f"`{C_ATTN:.3g} * L^2` attention per attended block (per sequence when padding-free, per row when padded "
        "or packed under a dense 4D mask); its limit is `sum(l + c*l^2)/W`. Bold: best in the row. "
        f"{n} synthetic samples per workload (max 4096 tokens); data/sft: {len(real)} samples, tiny tokenizer + "
        "chat template, max " + str(max(real)) + " tokens. Same seeded order and accelerate `BatchSamplerShard` "
        "dealing for all strategies; TRL's `_pack_bfd`, transformers' `BatchRebalanceSampler` and Unsloth's "
        "`TokenBalancedSampler` are the installed implementations, called directly.",
        "",
        "`opensloth` = cross-rank plan, padding-free (varlen) micro-batches (the default layout); "
        "`opensloth-rows4d` = same plan, rows of at most max_len under a 4D block mask; "
        "`opensloth-padded` = same plan, no packing; `opensloth-dp` = the original within-rank DP repacking.",
        "",
        "### 4 ranks x batch 2 x grad-accum 4",
        "",
        table(target_rows, ["workload", "cost model"]),
        "",
        "### All layouts (linear cost model)",
        "",
        table(all_rows, ["workload", "ranks", "batch", "accum"]),
        "",
        "### Overhead and wall-clock",
        "",
        f"- Planner time per step (lognormal, batch 2 x accum 4): {1e3 * sum(plan_times) / len(plan_times):.2f} ms "
        f"at 4 ranks, {1e3 * sum(plan_times_8) / len(plan_times_8):.2f} ms at 8 ranks (pure Python, one core).",
    ]
    if ddp:
        md += [
            f"- Tiny model, 2 gloo ranks on CPU, {ddp['samples']} samples of data/sft, batch {ddp['batch']} x "
            f"accum {ddp['accum']}, {ddp['steps']} steps per run (one epoch), runs alternated "
            f"({ddp['repeats']} each): "
            f"wall-clock per run unpatched {ddp['unpatched_s']:.1f} s, patched {ddp['patched_s']:.1f} s, "
            f"ratio patched/unpatched **{ddp['ratio']:.3f}** (median of pairs).",
            f"- Padded tokens processed per step: unpatched {ddp['unpatched_tokens_per_step']:.0f}, patched "
            f"{ddp['patched_tokens_per_step']:.0f} (slowest rank, summed micro-batch shapes).",
            f"- Time inside the patched `get_batch_samples` beyond the stock one: {ddp['overhead_ms']:.1f} ms per step "
            f"= {100 * ddp['overhead_fraction']:.1f}% of the patched step time ({ddp['patched_step_ms']:.0f} ms); "
            "it includes fetching and collating the rank's samples again (the stock loader's batches are discarded).",
        ]
    else:
        md.append("- 2-rank wall-clock run skipped (--skip-ddp) or failed; see stderr.")
    md += [
        "",
        "### Targets",
        "",
        f"- lognormal, 4 x 2 x 4, linear: opensloth {lognormal_lin:.3f} of the limit (target <= 1.05): "
        + ("**met**." if lognormal_lin <= 1.05 else "**missed**."),
        "- best of all strategies on every row: " + ("**met**." if not wins else "**missed** on " + "; ".join(wins) + "."),
    ]
    if wins and worst_gap <= 0.005:
        md.append(
            "  The gap comes from the epoch's last, partial step: its few samples cannot be spread evenly over "
            "the ranks, and opensloth keeps every step's samples as the stock loader drew them (so the gradient is "
            "unchanged), while TRL's bfd packs the whole dataset into rows before it forms steps."
        )
    if ddp:
        md.append(f"- overhead under 2% of step time: {100 * ddp['overhead_fraction']:.1f}% -> "
                  + ("**met**." if ddp["overhead_fraction"] < 0.02 else "**missed** (see notes)."))
    md.append(f"\nSimulation time {sim_seconds:.0f} s. Regenerate with `python scripts/bench_packing.py`.")
    text = "\n".join(md)
    print(text)
    update_markdown_block(args.output, SECTION, text)
    print(f"\nwrote section to {args.output}")


if __name__ == "__main__":
    main()
