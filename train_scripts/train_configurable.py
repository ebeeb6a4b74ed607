"""LoRA SFT on 1 or N ranks with Unsloth (or transformers + PEFT), the opensloth way.

    torchrun --nproc_per_node=2 train_scripts/train_configurable.py            # embedded default
    torchrun --nproc_per_node=4 train_scripts/train_configurable.py --global_batch_size 16
    python train_scripts/train_configurable.py --no_patches                    # 1-process parity run
    torchrun --nproc_per_node=2 train_scripts/train_configurable.py --task dpo # delegates to train_dpo.py

Steps: parse flags -> import Unsloth (first) -> ddp_patch() -> load model + LoRA
-> load and format data -> SFTTrainer -> train -> save adapter and trainer state
to ``<output_dir>/<experiment_name>_ws<world_size>``.

``--no_patches`` turns off the optional speed patches (batch repacking and
cross-rank balancing). The correctness fixes of ``ddp_patch()`` (device
pinning, process-group backend, out-of-place loss scaling) always apply.
"""

from __future__ import annotations

import argparse
import sys
import time

from opensloth.errors import UserInputError, run_cli  # light imports only: Unsloth must come first
from opensloth.training import (
    BACKENDS,
    DEFAULT_MODEL,
    check_model_source,
    DEFAULT_SFT_DATASET,
    DTYPES,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sft", "dpo"), default="sft",
                   help="sft (this script) or dpo (hands over to train_scripts/train_dpo.py)")
    p.add_argument("--model_name", default=DEFAULT_MODEL, help="local model folder or hub id")
    p.add_argument("--dataset", default=DEFAULT_SFT_DATASET,
                   help="chat data: folder with train.jsonl/test.jsonl, a JSON/JSONL/Parquet file, or a hub id")
    p.add_argument("--train_split", default="train", help="split of --dataset to train on; slicing like train[:1%%] works")
    p.add_argument("--test_split", default="test", help="split for evaluation (skipped when --test_samples 0)")
    p.add_argument("--max_seq_length", type=int, default=1024, help="truncate samples to this many tokens")
    p.add_argument("--num_epochs", type=float, default=1.0, help="epochs (ignored when --max_steps > 0)")
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; -1 means use --num_epochs")
    p.add_argument("--train_samples", type=int, default=None, help="use the first N training records")
    p.add_argument("--test_samples", type=int, default=0, help="evaluate on the first N test records (0: no eval)")
    p.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default: --logging_steps x 5)")
    p.add_argument("--eval_batch_size", type=int, default=None,
                   help="per-device eval batch (default: the train one); 1 makes eval_loss independent of the "
                        "world size, since Trainer averages per-batch means")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="peak learning rate (linear decay)")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear warmup steps")
    p.add_argument("--per_device_batch_size", type=int, default=None, help="micro-batch per rank (default 8)")
    p.add_argument("--global_batch_size", type=int, default=None,
                   help="derive the per-device size as global / (world_size x grad_accum)")
    p.add_argument("--grad_accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--logging_steps", type=int, default=1, help="log the loss every N steps")
    p.add_argument("--save_steps", type=int, default=0, help="save a checkpoint every N steps (0: only at the end)")
    p.add_argument("--seed", type=int, default=3407, help="seed for LoRA init and data order (same on all ranks)")
    p.add_argument("--no_patches", action="store_true",
                   help="disable the optional speed patches (batch repacking / cross-rank balancing)")
    p.add_argument("--packing_layout", choices=("auto", "varlen", "rows4d", "padded"), default="auto",
                   help="micro-batch layout of the batch patch: padding-free varlen rows, packed rows with a "
                        "4D block mask, or padded rows (auto picks for the attention backend)")
    p.add_argument("--debug_dataloader", action="store_true",
                   help="write an HTML preview of the first batches (trained/masked tokens, boundaries) to .log/")
    p.add_argument("--experiment_name", default="sft", help="run name; the run dir is <output_dir>/<name>_ws<N>")
    p.add_argument("--output_dir", default="outputs", help="parent folder of run directories")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="unsloth (FastLanguageModel), hf (transformers + PEFT), or auto (unsloth if installed)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype; auto = Unsloth's choice (bf16 on CPU) or float32 for hf")
    p.add_argument("--load_in_4bit", action="store_true", help="4-bit base weights (needs bitsandbytes and CUDA)")
    p.add_argument("--assistant_only_loss", action="store_true",
                   help="train only on assistant turns (needs {%% generation %%} markers in the chat template)")
    p.add_argument("--no_gradient_checkpointing", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--skip_prepare", action="store_true",
                   help="train from a tokenized dataset written by precompute_dataset.py")
    p.add_argument("--prepared_dataset_path", default=None,
                   help="folder with train/ (and val/) from precompute_dataset.py; needs --skip_prepare")
    p.add_argument("--cache_dir", default="data/cache",
                   help="tokenized-dataset cache shared by all ranks and later launches ('' disables it)")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.max_seq_length < 8:
        raise UserInputError(f"--max_seq_length {args.max_seq_length} is too small; use at least 8")
    if args.skip_prepare and not args.prepared_dataset_path:
        raise UserInputError("--skip_prepare needs --prepared_dataset_path data/precomputed/<name>")
    if args.prepared_dataset_path and not args.skip_prepare:
        raise UserInputError("--prepared_dataset_path is only read with --skip_prepare; add --skip_prepare")
    for flag in ("train_samples", "test_samples"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UserInputError(f"--{flag} {value} must be >= 0")
    if args.logging_steps < 1:
        raise UserInputError(f"--logging_steps {args.logging_steps} must be >= 1")
    check_model_source(args.model_name)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    task_parser = argparse.ArgumentParser(add_help=False)
    task_parser.add_argument("--task", choices=("sft", "dpo"), default="sft")
    task, rest = task_parser.parse_known_args(argv)
    if task.task == "dpo":
        import train_dpo  # sibling script; same flags plus the DPO ones

        return train_dpo.main(rest)
    args = build_parser().parse_args(rest)
    validate(args)

    # --- setup: Unsloth first, then ddp_patch (device, process group, loss fix) ---
    from opensloth.training import import_backend, resolve_backend, resolve_per_device_batch, run_dir_for
    from opensloth.distributed import distributed_env

    env = distributed_env()
    backend = resolve_backend(args.backend)
    per_device = resolve_per_device_batch(args.per_device_batch_size, args.global_batch_size,
                                          args.grad_accum, env.world_size)
    import_backend(backend)
    from opensloth.patching.ddp_patch import ddp_patch

    device = ddp_patch()
    if not args.no_patches:
        from opensloth.patching.batch_samples import patch_optimize_sft_trainer_batch_samples

        patch_optimize_sft_trainer_batch_samples(layout=args.packing_layout)

    from opensloth.log import log_rank0
    from opensloth.patching import applied_patches
    from opensloth.training import LoraSettings, load_model_and_tokenizer

    run_dir = run_dir_for(args.output_dir, args.experiment_name, env.world_size)
    global_batch = per_device * args.grad_accum * env.world_size
    log_rank0(
        f"effective global batch = {per_device} per device x {args.grad_accum} accum x "
        f"{env.world_size} rank(s) = {global_batch}; run dir {run_dir}"
    )

    # --- model ---
    model, tokenizer = load_model_and_tokenizer(
        args.model_name, backend=backend, max_seq_length=args.max_seq_length, device=device,
        seed=args.seed, dtype=args.dtype, lora=LoraSettings(),
        gradient_checkpointing=not args.no_gradient_checkpointing, load_in_4bit=args.load_in_4bit,
    )

    # --- data ---
    from opensloth.sft import SFTRunSettings, build_sft_trainer, load_sft_splits

    if args.skip_prepare:  # tokenized by train_scripts/precompute_dataset.py; checked against this tokenizer
        from opensloth.utils.dataset_cache import load_prepared_dataset

        train_ds, val_ds = load_prepared_dataset(args.prepared_dataset_path, tokenizer,
                                                 max_seq_length=args.max_seq_length)
        if args.train_samples is not None:
            train_ds = train_ds.select(range(min(args.train_samples, len(train_ds))))
        val_ds = (val_ds.select(range(min(args.test_samples, len(val_ds))))
                  if val_ds is not None and args.test_samples else None)
    else:
        train_ds, val_ds = load_sft_splits(
            args.dataset, tokenizer, train_split=args.train_split, test_split=args.test_split,
            train_samples=args.train_samples, test_samples=args.test_samples,
        )

    # --- trainer ---
    settings = SFTRunSettings(
        run_dir=run_dir, per_device_batch_size=per_device, grad_accum=args.grad_accum,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, num_epochs=args.num_epochs,
        max_steps=args.max_steps, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
        eval_batch_size=args.eval_batch_size,
        save_steps=args.save_steps, seed=args.seed, max_seq_length=args.max_seq_length,
        backend=backend, dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        gradient_checkpointing=not args.no_gradient_checkpointing,
        assistant_only_loss=args.assistant_only_loss,
    )
    factory = build_sft_trainer
    if args.cache_dir and not args.skip_prepare:
        # One rank tokenizes; the others (and later launches) load the result.
        from opensloth.utils import simple_cache_dataset_wrapper

        factory = simple_cache_dataset_wrapper(
            cache_dir=args.cache_dir, max_seq_length=args.max_seq_length, packing=False,
            assistant_only_loss=args.assistant_only_loss,
        )(build_sft_trainer)
    trainer = factory(model, tokenizer, train_ds, val_ds, env.world_size, settings)
    log_rank0("applied patches:\n  " + "\n  ".join(str(p) for p in applied_patches()))
    if args.debug_dataloader and env.is_main:
        from opensloth._debug_dataloader import debug_chat_dataloader_for_training

        log_rank0(f"dataloader preview: {debug_chat_dataloader_for_training(trainer, tokenizer)}")

    # --- train and save ---
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    trainer.save_state()
    if trainer.is_world_process_zero():
        model.save_pretrained(run_dir)
        tokenizer.save_pretrained(run_dir)
    log_rank0(f"trained {trainer.state.global_step} steps in {elapsed:.1f}s; adapter saved to {run_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
