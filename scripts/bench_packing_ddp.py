"""CPU wall-clock of the tiny model on 2 gloo ranks: stock batches vs opensloth's (driver of bench_packing.py).

    torchrun --standalone --nproc_per_node=2 scripts/bench_packing_ddp.py --out .log/bench_packing_ddp.json

Trains the embedded tiny Qwen3 model on the first ``--samples`` chats of
data/sft for ``--max_steps`` optimizer steps, alternating unpatched and
patched runs (``--repeats`` of each, fresh model each time) in the same
processes. Rank 0 writes a JSON summary: seconds per run, the median
patched/unpatched ratio of the pairs, the slowest rank's padded tokens per
step (sum of micro-batch shapes), and the time spent inside
``get_batch_samples`` (patched minus stock) per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--samples", type=int, default=480, help="chats of data/sft/train.jsonl to use")
    p.add_argument("--max_steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=4, help="per-device batch")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternated")
    p.add_argument("--max_length", type=int, default=1024, help="SFT max_length")
    return p.parse_args()


def main():
    args = parse()
    torch.set_num_threads(1)
    from opensloth.patches.ddp import ddp_patch

    ddp_patch()
    import torch.distributed as dist
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.patches.batch_samples import (
        patch_optimize_sft_trainer_batch_samples,
        unpatch_optimize_sft_trainer_batch_samples,
    )
    from opensloth.distributed import all_gather_object_list, barrier, distributed_env

    env = distributed_env()
    tok = AutoTokenizer.from_pretrained("data/tiny-qwen3")
    data = load_dataset("json", data_files="data/sft/train.jsonl", split="train").select(range(args.samples))

    def one_run(patched: bool) -> dict:
        if patched:
            patch_optimize_sft_trainer_batch_samples()
        else:
            unpatch_optimize_sft_trainer_batch_samples()
        model = AutoModelForCausalLM.from_pretrained("data/tiny-qwen3", dtype=torch.float32)
        config = trl.SFTConfig(
            output_dir=".log/bench_packing_ddp_run", per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum, max_steps=args.max_steps, learning_rate=1e-4,
            max_length=args.max_length, seed=0, data_seed=0, report_to="none", save_strategy="no",
            logging_steps=int(__import__("os").environ.get("BENCH_LOG_STEPS", "10000")), bf16=False, gradient_checkpointing=False, ddp_find_unused_parameters=False,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
        gbs_seconds = [0.0]
        step_tokens: list[int] = []
        inner_gbs, inner_step = trainer.get_batch_samples, trainer.training_step

        def timed_gbs(*a, **k):
            t = time.perf_counter()
            out = inner_gbs(*a, **k)
            gbs_seconds[0] += time.perf_counter() - t
            step_tokens.append(0)
            return out

        def counted_step(model, inputs, *a, **k):
            step_tokens[-1] += int(inputs["input_ids"].numel())
            return inner_step(model, inputs, *a, **k)

        trainer.get_batch_samples, trainer.training_step = timed_gbs, counted_step
        barrier()
        t0 = time.perf_counter()
        trainer.train()
        barrier()
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "gbs_seconds": gbs_seconds[0], "step_tokens": step_tokens,
                "steps": trainer.state.global_step}

    runs = {"patched": [], "unpatched": []}
    for rep in range(args.repeats):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for patched in order:
            runs["patched" if patched else "unpatched"].append(one_run(patched))

    gathered = all_gather_object_list(runs)
    if env.rank == 0:
        def slowest_tokens(kind):
            per_rank = [g[kind][0]["step_tokens"] for g in gathered]
            return statistics.mean(max(col) for col in zip(*per_rank))

        def mean(kind, key):
            return statistics.mean(r[key] for r in runs[kind])

        ratios = [p["seconds"] / u["seconds"] for p, u in zip(runs["patched"], runs["unpatched"])]
        steps = runs["patched"][0]["steps"]
        overhead = (mean("patched", "gbs_seconds") - mean("unpatched", "gbs_seconds")) / steps
        patched_step = mean("patched", "seconds") / steps
        result = {
            "samples": args.samples, "batch": args.batch, "accum": args.accum, "steps": steps,
            "repeats": args.repeats, "world_size": env.world_size,
            "unpatched_s": mean("unpatched", "seconds"), "patched_s": mean("patched", "seconds"),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "unpatched_tokens_per_step": slowest_tokens("unpatched"),
            "patched_tokens_per_step": slowest_tokens("patched"),
            "overhead_ms": 1e3 * overhead, "patched_step_ms": 1e3 * patched_step,
            "overhead_fraction": overhead / patched_step,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
