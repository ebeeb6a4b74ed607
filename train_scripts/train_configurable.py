"""LoRA SFT on 1 or N ranks with Unsloth (or transformers + PEFT), the opensloth way.

    torchrun --nproc_per_node=2 train_scripts/train_configurable.py            # embedded default
    torchrun --nproc_per_node=4 train_scripts/train_configurable.py --global_batch_size 16
    torchrun --nproc_per_node=2 train_scripts/train_configurable.py --config run.yaml --max_steps 50
    python train_scripts/train_configurable.py --no_patches                    # 1-process parity run
    torchrun --nproc_per_node=2 train_scripts/train_configurable.py --save_steps 50 --resume_from_checkpoint last
    torchrun --nproc_per_node=2 train_scripts/train_configurable.py --task dpo # delegates to train_dpo.py

Steps: flags (+ YAML) -> pre-flight (model files, data, checkpoint, output
folder: opensloth.preflight) -> import Unsloth (first) -> ddp_patch() -> load
model + LoRA -> load and format data -> SFTTrainer (one rank tokenizes, all
reuse) -> held-out loss and exact-match of the base -> train -> save adapter
and trainer state to ``<output_dir>/<experiment_name>_ws<world_size>``
(``..._nopatches`` with ``--no_patches``) -> held-out again -> a summary
(throughput, losses, held-out before/after, where things are, next commands). A run dir that already holds a run is refused unless the
launch resumes it.

``--resume_from_checkpoint last`` continues from the last complete checkpoint
of the run dir (``--save_steps`` writes them); the resumed run reproduces the
uninterrupted losses. ``--cache_builder local`` gives every node its own
tokenized-data cache (node-local ``--cache_dir``). Errors are one line
(``--debug`` shows the traceback); docs/reliability.md lists them.

``--config run.yaml`` takes the same keys as the flags (``max_steps: 50``,
``learning_rate: 2e-4``, ...); flags given on the command line win.

``--no_patches`` turns off the optional speed patches (batch repacking and
cross-rank balancing). The correctness fixes of ``ddp_patch()`` (device
pinning, process-group backend, out-of-place loss scaling) always apply.
The original OpenSloth's flags work as they did (``--use_patches`` is
accepted; docs/compat.md lists the differences).
"""

from __future__ import annotations

import argparse
import sys

# Light imports only (none imports torch, transformers or TRL): Unsloth must come first, in setup_run.
from opensloth.cache import load_prepared_dataset, simple_cache_dataset_wrapper
from opensloth.cache.wrapper import DATA_REPORT
from opensloth.config import ArgumentParser, add_config_flags
from opensloth.data.chat import load_chat_splits, truncation_message
from opensloth.debug.dataloader_preview import debug_chat_dataloader_for_training
from opensloth.errors import run_cli
from opensloth.launch import finish_run, load_model_and_tokenizer, setup_run, train_and_save
from opensloth.log import log_rank0, warn_rank0
from opensloth.patches import applied_patches
from opensloth.patches.batch_samples import patch_optimize_sft_trainer_batch_samples
from opensloth.sft import SECTIONS, build_sft_trainer, resolve_settings
from opensloth.sft.run import data_checks, evaluate_heldout_for_summary, heldout_path


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sft", "dpo"), default="sft",
                   help="sft (this script) or dpo (hands over to train_scripts/train_dpo.py)")
    add_config_flags(p, SECTIONS)  # --config, --model_name, --dataset, --max_steps, --no_patches, --cache_dir, ...
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    task_parser = ArgumentParser(add_help=False)
    task_parser.add_argument("--task", choices=("sft", "dpo"), default="sft")
    task, rest = task_parser.parse_known_args(argv)
    if task.task == "dpo":
        import train_dpo  # sibling script; same flags plus the DPO ones

        return train_dpo.main(rest)
    settings = resolve_settings(build_parser().parse_args(rest))

    # --- setup: pre-flight (model files, data, checkpoint, output folder), Unsloth first, then ddp_patch ---
    launch = setup_run(settings, data=data_checks(settings), lora=settings.lora)
    if settings.use_patches and settings.no_patches:
        log_rank0("--use_patches and --no_patches both given: --no_patches wins, as in the original OpenSloth")
    if not settings.no_patches:
        patch_optimize_sft_trainer_batch_samples(layout=settings.packing_layout)

    log_rank0(f"learning rate {settings.learning_rate:g}; LoRA r={settings.lora_r} alpha={settings.lora_alpha} on "
              f"{','.join(settings.lora_target_modules)}")

    # --- model ---
    model, tokenizer = load_model_and_tokenizer(
        settings.model_name, backend=launch.backend, max_seq_length=settings.max_seq_length, device=launch.device,
        seed=settings.seed, dtype=settings.dtype, lora=settings.lora,
        gradient_checkpointing=not settings.no_gradient_checkpointing, load_in_4bit=settings.load_in_4bit,
    )

    # --- data ---
    if settings.skip_prepare:  # tokenized by train_scripts/precompute_dataset.py; checked against this tokenizer
        train_ds, val_ds = load_prepared_dataset(settings.prepared_dataset_path, tokenizer,
                                                 max_seq_length=settings.max_seq_length)
        if settings.train_samples is not None:
            train_ds = train_ds.select(range(min(settings.train_samples, len(train_ds))))
        val_ds = (val_ds.select(range(min(settings.test_samples, len(val_ds))))
                  if val_ds is not None and settings.test_samples else None)
    else:
        train_ds, val_ds = load_chat_splits(
            settings.dataset, tokenizer, train_split=settings.train_split, test_split=settings.test_split,
            train_samples=settings.train_samples, test_samples=settings.test_samples,
        )

    # --- trainer ---
    factory = build_sft_trainer
    if settings.cache_dir != "" and not settings.skip_prepare:  # None: the default cache folder
        # One rank tokenizes; the others (and later launches) load the result.
        factory = simple_cache_dataset_wrapper(
            cache_dir=settings.cache_dir, builder=settings.cache_builder, max_seq_length=settings.max_seq_length,
            packing=False, assistant_only_loss=settings.assistant_only_loss,
        )(build_sft_trainer)
    trainer = factory(model, tokenizer, train_ds, val_ds, launch.world_size, settings,
                      run_dir=launch.run_dir, per_device=launch.per_device, backend=launch.backend)
    truncated = truncation_message(getattr(trainer, DATA_REPORT, None))
    if truncated:
        warn_rank0(truncated)
    log_rank0("applied patches:\n  " + "\n  ".join(str(p) for p in applied_patches()))
    if settings.debug_dataloader and launch.env.is_main:
        log_rank0(f"dataloader preview: {debug_chat_dataloader_for_training(trainer, tokenizer)}")

    # --- held-out loss and exact-match before training (every rank scores a share) ---
    heldout = heldout_path(settings)
    before = evaluate_heldout_for_summary(model, tokenizer, settings, heldout)

    # --- train and save ---
    elapsed = train_and_save(trainer, model, tokenizer, launch.run_dir,
                             resume_from_checkpoint=launch.resume_from_checkpoint)
    after = evaluate_heldout_for_summary(model, tokenizer, settings, heldout)
    finish_run(trainer, launch, task="SFT", seconds=elapsed, heldout=(before, after),
               heldout_what=f"{after['n']} conversations of {heldout}" if after else "",
               example_prompt=(after or {}).get("example_prompt"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
