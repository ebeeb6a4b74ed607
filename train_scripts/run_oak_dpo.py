"""Iterative (online) DPO, OaK-DPO style: rollouts on all ranks, judged pairs, one DPO round per iteration.

    torchrun --nproc_per_node=2 train_scripts/run_oak_dpo.py --iterations 3 --samples 4 \\
        --config examples/config_oak_dpo.yaml --train-data outputs/oak_demo/data/prompts.jsonl \\
        --eval-data outputs/oak_demo/data/heldout.jsonl --sft-model outputs/oak_demo/sft \\
        --dataset-type prontoqa --output outputs/oak_demo/dpo_nll
    python train_scripts/run_oak_dpo.py ... --iterations 4          # resumes after the last complete iteration
    .venv/bin/python scripts/oak_demo.py                            # data + SFT + 3 iterations on CPU, with plots

Per iteration k = 1..K (see ``src/opensloth/online_dpo/__init__.py`` for the layout):

1. policy = the SFT weights (a LoRA ``--sft-model`` is merged into its base
   once) + the LoRA adapter of iteration k-1 (a fresh adapter for k = 1);
2. rollout: each rank samples ``--samples`` candidates for its share of the
   prompts, the judge scores them, and the traces of all ranks are gathered,
   so every rank holds the same records
   (``<output>/rollout_output/iter_<k>/``, with ``manifest.json``);
3. pairs: best vs worst candidate per prompt; ties, all-equal and
   single-candidate prompts are skipped and counted;
4. one DPO round (fixed or dynamic beta, as in ``train_dpo.py``) with a fresh
   copy of the DPO settings; reference = adapter disabled = the SFT policy;
   adapter and trainer state go to ``<output>/dpo/iter_<k>/``;
5. held-out accuracy (greedy) of the new policy, then the completion marker
   ``dpo/iter_<k>/iteration_complete.json``, written last and atomically.

A killed loop restarts at the first iteration without a marker. Bad input
(a missing SFT checkpoint, an empty rollout, a judge returning a non-numeric
score, an iteration without any usable pair) stops with one ``error:`` line
and exit code 2; completed iterations are never touched.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

# Light imports only (none imports torch, transformers or TRL): Unsloth must come first, in setup_backend.
from opensloth.atomic import write_json_atomic
from opensloth.config import ArgumentParser, add_flags
from opensloth.distributed import barrier
from opensloth.errors import UserInputError, run_cli
from opensloth.launch import model_dtype_name, resolve_backend, setup_backend
from opensloth.log import log_rank0
from opensloth.online_dpo import layout
from opensloth.online_dpo.config import SECTIONS, iteration_settings, prompt_window, resolve_oak_config
from opensloth.online_dpo.evaluate import heldout_accuracy
from opensloth.online_dpo.report import SFT_EVAL, summary_markdown, write_reports
from opensloth.online_dpo.round import run_dpo_round
from opensloth.online_dpo.run_record import check_run_record
from opensloth.online_dpo.sft_reference import prepare_reference
from opensloth.rollout.judges import make_judge
from opensloth.rollout.policy import describe_checkpoint, load_policy
from opensloth.rollout.run import PAIRS_FILE, run_rollout
from opensloth.summary import next_commands_for
from opensloth.rollout.traces import load_prompts
from opensloth.tasks import TASK_KINDS


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, required=True, help="number of rollout + DPO rounds (K)")
    p.add_argument("--config", default=None,
                   help="YAML: DPO keys at the top level, 'dynamic_beta:', 'rollout:', 'lora:' and 'oak:' sections")
    p.add_argument("--train-data", "--train_data", dest="train_data", required=True,
                   help="prompts for the rollouts: JSONL/JSON/Parquet file or folder; rows with a 'prompt' "
                        "string or chat 'messages' (first user turn)")
    p.add_argument("--train-split", "--train_split", dest="train_split", default="train",
                   help="split of --train-data")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of --train-data")
    p.add_argument("--prompts-per-iteration", "--prompts_per_iteration", dest="prompts_per_iteration", type=int,
                   default=None, help="prompts per iteration, a window that moves through the pool (default: all)")
    p.add_argument("--sft-model", "--sft_model", dest="sft_model", required=True,
                   help="the SFT policy: a model folder, or a LoRA adapter folder (merged into its base once)")
    p.add_argument("--dataset-type", "--dataset_type", dest="dataset_type", default="synthetic",
                   help="task kind for the verifier judge and the held-out check (add, prontoqa, ...), or "
                        "'synthetic' to detect the kind per prompt")
    p.add_argument("--judge", default="verifier",
                   help="verifier | reward_model | package.module:function (prompt, completions) -> scores")
    p.add_argument("--reward-model", "--reward_model", dest="reward_model", default=None,
                   help="sequence-classification checkpoint for --judge reward_model")
    p.add_argument("--eval-data", "--eval_data", dest="eval_data", default=None,
                   help="held-out prompts with checkable answers (same formats as --train-data); "
                        "omit to skip the accuracy report")
    p.add_argument("--eval-split", "--eval_split", dest="eval_split", default="train", help="split of --eval-data")
    p.add_argument("--eval-limit", "--eval_limit", dest="eval_limit", type=int, default=200,
                   help="held-out prompts evaluated per iteration")
    p.add_argument("--output", default="outputs/oak_dpo", help="run folder (see the layout above)")
    # --dpo.learning_rate, ..., --dynamic_beta.warmup_steps, --rollout.temperature, --lora.r, --oak.nll_weight,
    # and the shortcuts --backend, --beta_mode, --samples, --nll_weight
    for section in SECTIONS:
        add_flags(p, section.cls, section.prefix, section.aliases)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.iterations < 1:
        raise UserInputError(f"--iterations {args.iterations} must be >= 1")
    cfg = resolve_oak_config(args.config, vars(args))

    # --- cheap checks first: no model is loaded for a run that cannot start ---
    describe_checkpoint(args.sft_model, "--sft-model", allow_hub=False)
    checkable = args.dataset_type == "synthetic" or args.dataset_type in TASK_KINDS
    if args.judge == "verifier" and not checkable:
        raise UserInputError(f"--dataset-type {args.dataset_type!r} has no verifier; use one of "
                             f"{('synthetic', *TASK_KINDS)} or --judge reward_model")
    kind = None if args.dataset_type == "synthetic" else args.dataset_type
    resolve_backend(cfg.dpo.backend)
    pool = load_prompts(args.train_data, args.train_split, args.limit)
    heldout = load_prompts(args.eval_data, args.eval_split, args.eval_limit) if args.eval_data else None
    if heldout is not None and not checkable:
        raise UserInputError(f"--eval-data needs a checkable --dataset-type; {args.dataset_type!r} is not")

    # --- setup: Unsloth first, then ddp_patch (device, process group when WORLD_SIZE > 1) ---
    launch = setup_backend(cfg.dpo.backend)
    env, backend, device = launch.env, launch.backend, launch.device

    # --- the judge ---
    judge = make_judge(args.judge, dataset_type=args.dataset_type, reward_model=args.reward_model, device=device)

    # --- the run folder: same settings on resume, reference = SFT policy ---
    check_run_record(args.output, env, {
        "sft_model": os.path.abspath(args.sft_model), "train_data": os.path.abspath(args.train_data),
        "train_split": args.train_split, "limit": args.limit, "prompts_per_iteration": args.prompts_per_iteration,
        "dataset_type": args.dataset_type, "judge": args.judge, "reward_model": args.reward_model,
        "backend": backend, "config": cfg.as_dict(),
    })
    reference = prepare_reference(args.sft_model, args.output, env)
    start = layout.next_iteration(args.output)
    if start > 1:
        log_rank0(f"resuming {args.output}: iterations 1..{start - 1} are complete")
    if start > args.iterations:
        log_rank0(f"all {args.iterations} iteration(s) are already complete in {args.output}")

    def load(adapter):
        return load_policy(reference["path"], adapter=adapter, backend=backend, device=device, seed=cfg.dpo.seed,
                           dtype=cfg.dpo.dtype, max_seq_length=cfg.dpo.max_seq_length,
                           gradient_checkpointing=not cfg.dpo.no_gradient_checkpointing, lora=cfg.lora)

    def evaluate(model, tokenizer):
        return heldout_accuracy(model, tokenizer, heldout, kind=kind, max_new_tokens=cfg.rollout.max_new_tokens,
                                batch_size=cfg.rollout.batch_size, env=env, backend=backend, sampling=cfg.rollout)

    # --- iteration 0: the SFT policy on the held-out prompts (once per run folder) ---
    sft_eval_path = os.path.join(args.output, SFT_EVAL)
    if heldout is not None and not os.path.isfile(sft_eval_path) and start <= args.iterations:
        model, tokenizer = load(None)  # fresh adapter (lora_B = 0): exactly the SFT policy
        result = evaluate(model, tokenizer)
        if env.is_main:
            write_json_atomic(sft_eval_path, result)
        sampled = "" if result["sampled_accuracy"] is None else f", {result['sampled_accuracy']:.3f} sampled"
        log_rank0(f"held-out accuracy of the SFT policy: {result['accuracy']:.3f} "
                  f"({result['correct']}/{result['n']}) greedy{sampled}")
        del model
        barrier()

    # --- the loop ---
    for k in range(start, args.iterations + 1):
        t_start = time.perf_counter()
        if env.is_main:
            for folder in layout.clear_partial(args.output, k):
                log_rank0(f"removed leftovers of the interrupted iteration {k}: {folder}")
        barrier()
        previous = layout.dpo_dir(args.output, k - 1) if k > 1 else None
        model, tokenizer = load(previous)

        # rollout + judge + pairs, identical on every rank after the gather
        rollout = run_rollout(
            model, tokenizer, prompt_window(pool, k, args.prompts_per_iteration), cfg.rollout, iteration=k,
            out_dir=layout.rollout_dir(args.output, k), env=env, judge=judge, backend=backend,
            model_info={"reference": reference["path"], "sft_model": args.sft_model, "adapter": previous,
                        "backend": backend, "dtype": model_dtype_name(model)},
        )
        counts = rollout.manifest["counts"]
        if not rollout.pairs:
            raise UserInputError(
                f"iteration {k}: no preference pairs from {counts['prompts']} prompts (skipped: {counts['skipped']}); "
                f"every prompt's candidates scored the same. Raise --samples or rollout.temperature. Completed "
                f"iterations in {args.output} are kept; rerun to resume at iteration {k}"
            )

        # one DPO round with a fresh copy of the settings
        run_dir = layout.dpo_dir(args.output, k)
        settings = iteration_settings(cfg.dpo, iteration=k, reference_path=reference["path"],
                                      pairs_path=os.path.join(layout.rollout_dir(args.output, k), PAIRS_FILE),
                                      output=args.output)
        dpo = run_dpo_round(model, tokenizer, rollout.pairs, settings, cfg.dynamic, run_dir=run_dir, env=env,
                            backend=backend, nll_weight=cfg.nll_weight)
        result = evaluate(model, tokenizer) if heldout is not None else None

        record = {
            "rollout": {"prompts": counts["prompts"], "candidates": counts["candidates"], "pairs": counts["pairs"],
                        "skipped": counts["skipped"], "mean_score": counts["judged"]["mean_score"]},
            "dpo": dpo, "eval": result, "adapter": run_dir, "reference": reference["path"],
            "world_size": env.world_size, "seconds": round(time.perf_counter() - t_start, 1),
        }
        if env.is_main:
            write_json_atomic(os.path.join(run_dir, "eval.json"), result or {})
            layout.write_marker(args.output, k, record)  # last: the iteration is complete
            write_reports(args.output)
        barrier()
        accuracy = "" if result is None else f", held-out accuracy {result['accuracy']:.3f}"
        log_rank0(f"iteration {k} complete: {counts['pairs']} pairs, {dpo['steps']} DPO steps{accuracy}")
        del model, tokenizer
        gc.collect()

    if env.is_main and os.path.isdir(args.output):
        summary = write_reports(args.output)
        log_rank0("accuracy per iteration:\n" + summary_markdown(summary["rows"]))
        done = layout.completed_iterations(args.output)
        if done:  # the last iteration's adapter is the result
            last = layout.dpo_dir(args.output, done[-1])
            print(f"result: {last}\nnext:\n  " + "\n  ".join(next_commands_for(last, adapter=True)), flush=True)
    barrier()


if __name__ == "__main__":
    sys.exit(run_cli(main))
