"""Generate k candidates per prompt with the current model, on 1 or N ranks, and optionally judge them.

    python train_scripts/rollout.py --model outputs/sft_ws1 --prompts data/sft --limit 10 --samples 4
    torchrun --nproc_per_node=2 train_scripts/rollout.py --model data/tiny-qwen3 --prompts data/sft \\
        --samples 4 --judge verifier --config examples/config_oak_dpo.yaml --iteration 1
    python -m opensloth.rollout ...          # the same command

Writes ``<output_dir>/iter_<iteration>/rollouts.jsonl`` (traces, prompt
included) and ``manifest.json`` (counts, settings, model, timings); with
``--judge`` also ``judged.jsonl`` (the format ``opensloth.data.judged``
reads) and ``pairs.jsonl`` (best vs worst per prompt; ties skipped and
counted). Sampling settings come from the ``rollout:`` section of
``--config``; flags override them. Each candidate's seed is derived from
``--seed``, the iteration and the prompt index, so 1 and N ranks give the
same candidates. With ``WORLD_SIZE > 1`` the process group is created (nccl on
CUDA, gloo on CPU) and every rank ends up with all traces.
"""

from __future__ import annotations

import argparse
import os
import sys

# Light imports only: Unsloth must be imported before transformers, in setup_backend.
from opensloth.config import ArgumentParser, add_config_flags, resolve
from opensloth.errors import run_cli
from opensloth.launch import BACKENDS, DTYPES, model_dtype_name, setup_backend
from opensloth.log import log_rank0
from opensloth.rollout.judges import make_judge
from opensloth.rollout.policy import describe_checkpoint, load_policy
from opensloth.rollout.run import run_rollout
from opensloth.rollout.settings import SECTIONS
from opensloth.rollout.traces import load_prompts


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model folder, LoRA adapter folder (its base is read from adapter_config.json) or hub id")
    p.add_argument("--prompts", required=True,
                   help="prompts: JSONL/JSON/Parquet file or folder with <split>.jsonl; rows with a 'prompt' "
                        "string or chat 'messages' (the first user turn is the prompt)")
    p.add_argument("--split", default="train", help="split of --prompts (slicing like train[:100] works)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts (quick runs)")
    p.add_argument("--iteration", type=int, default=0, help="iteration number: output folder iter_<n> and seeds")
    p.add_argument("--output_dir", "--output-dir", default="rollout_output", help="parent of the iter_<n> folders")
    p.add_argument("--judge", default=None,
                   help="verifier | reward_model | package.module:function; omit to write traces only")
    p.add_argument("--dataset_type", "--dataset-type", default="synthetic",
                   help="verifier task kind (add, prontoqa, ...) or 'synthetic' to detect it per prompt")
    p.add_argument("--reward_model", "--reward-model", default=None,
                   help="sequence-classification checkpoint for --judge reward_model")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="unsloth, hf, or auto (unsloth if installed)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: backend default)")
    # --config (its 'rollout:' section) and --samples, --temperature, --top_p, --top_k, --max_new_tokens, ...
    add_config_flags(p, SECTIONS, config_help="YAML whose 'rollout:' section holds the sampling settings")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    (settings,) = resolve(args, SECTIONS, ignore_other_keys=True)
    kind, base, adapter = describe_checkpoint(args.model, "--model")
    prompts = load_prompts(args.prompts, args.split, args.limit)

    # --- setup: Unsloth first, then ddp_patch (device, process group when WORLD_SIZE > 1) ---
    launch = setup_backend(args.backend)
    judge = None
    if args.judge:
        judge = make_judge(args.judge, dataset_type=args.dataset_type, reward_model=args.reward_model,
                           device=launch.device)
    model, tokenizer = load_policy(base, adapter=adapter, backend=launch.backend, device=launch.device,
                                   seed=settings.seed, dtype=args.dtype)
    out_dir = os.path.join(args.output_dir, f"iter_{args.iteration}")
    result = run_rollout(model, tokenizer, prompts, settings, iteration=args.iteration, out_dir=out_dir,
                         env=launch.env, judge=judge, backend=launch.backend,
                         model_info={"model": base, "adapter": adapter, "checkpoint": args.model,
                                     "backend": launch.backend, "dtype": model_dtype_name(model)})
    counts = result.manifest["counts"]
    pairs = f", {counts['pairs']} pairs" if "pairs" in counts else ""
    log_rank0(f"wrote {out_dir}: {counts['prompts']} prompts, {counts['candidates']} candidates{pairs}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
