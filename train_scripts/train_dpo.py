"""LoRA DPO with a fixed or a dynamic beta, on 1 or N ranks (Unsloth or transformers + PEFT).

    torchrun --nproc_per_node=2 train_scripts/train_dpo.py                      # embedded default, dynamic beta
    torchrun --nproc_per_node=2 train_scripts/train_dpo.py --config examples/config_dpo.yaml
    torchrun --nproc_per_node=2 train_scripts/train_dpo.py --beta_mode fixed --beta 0.1
    python train_scripts/train_dpo.py --max_steps 8 --dynamic_beta.warmup_steps 2 --dynamic_beta.alpha 0.5
    python train_scripts/train_dpo.py --resume_from_checkpoint outputs/dpo_ws1/checkpoint-4
    python train_scripts/train_configurable.py --task dpo ...                  # same script, via the SFT entry point

Steps: flags (+ YAML) -> import Unsloth (first) -> ddp_patch() -> load model +
LoRA -> load preference pairs -> DPOTrainer (patched for dynamic beta) with the
base model as reference -> train -> save adapter, trainer state and
controller state to ``<output_dir>/<experiment_name>_ws<world_size>``.

Dynamic beta (docs/dynamic_beta_rules.md): beta is fixed for each optimizer
step; the margins of all ranks and micro-batches of step t are gathered at the
step boundary and set the beta of step t+1. Rank 0 writes one JSONL record per
step to ``<run_dir>/logs/margins/margins.jsonl``; TensorBoard gets the
``dynamic_beta/*`` scalars next to TRL's DPO metrics. Render them with
``python scripts/plot_margins.py <run_dir>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from opensloth.dpo.controller import DynamicBetaConfig  # standard library only: Unsloth must come first
from opensloth.dpo.run import DYNAMIC_SECTION, DPORunSettings, add_dataclass_flags
from opensloth.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file with these settings (dynamic-beta keys under 'dynamic_beta:'); flags override it")
    add_dataclass_flags(p, DPORunSettings)  # --model_name, --dataset, --max_steps, --beta_mode, ...
    add_dataclass_flags(p, DynamicBetaConfig, prefix=f"{DYNAMIC_SECTION}.")  # --dynamic_beta.alpha, ...
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from opensloth.dpo.run import resolve_settings

    settings, dynamic_cfg = resolve_settings(args)
    dynamic = settings.beta_mode == "dynamic"

    # --- setup: Unsloth first, then ddp_patch (device, process group, loss fix) ---
    from opensloth.training import import_backend, resolve_backend, resolve_per_device_batch, run_dir_for
    from opensloth.distributed import distributed_env

    env = distributed_env()
    backend = resolve_backend(settings.backend)
    per_device = resolve_per_device_batch(settings.per_device_batch_size, settings.global_batch_size,
                                          settings.grad_accum, env.world_size)
    import_backend(backend)
    from opensloth.patching.ddp_patch import ddp_patch

    device = ddp_patch()

    from opensloth.log import log_rank0
    from opensloth.patching import applied_patches
    from opensloth.training import LoraSettings, load_model_and_tokenizer

    run_dir = run_dir_for(settings.output_dir, settings.experiment_name, env.world_size)
    margins_dir = settings.margins_log_dir or os.path.join(run_dir, "logs", "margins")
    log_rank0(f"global batch = {per_device} pairs per device x {settings.grad_accum} accum x {env.world_size} "
              f"rank(s) = {per_device * settings.grad_accum * env.world_size} pairs; beta_mode={settings.beta_mode}; "
              f"run dir {run_dir}")

    # --- model ---
    model, tokenizer = load_model_and_tokenizer(
        settings.model_name, backend=backend, max_seq_length=settings.max_seq_length, device=device,
        seed=settings.seed, dtype=settings.dtype, lora=LoraSettings(),
        gradient_checkpointing=not settings.no_gradient_checkpointing, load_in_4bit=settings.load_in_4bit,
    )
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")

    # --- data ---
    from opensloth.dpo.run import load_preference_splits

    train_ds, val_ds = load_preference_splits(settings)

    # --- trainer ---
    from opensloth.dpo.data import count_prompt_truncations
    from opensloth.dpo.reference import parameter_report, use_base_model_as_reference
    from opensloth.dpo.run import build_dpo_trainer, dpo_trainer_class, make_dpo_config, write_settings

    dpo_config = make_dpo_config(settings, dynamic_cfg, run_dir=run_dir, per_device=per_device,
                                 world_size=env.world_size, backend=backend, dtype=dtype_name,
                                 has_eval=val_ds is not None)
    trainer_cls = dpo_trainer_class(dynamic=dynamic, backend=backend)
    trainer = build_dpo_trainer(trainer_cls, model, tokenizer, train_ds, val_ds, dpo_config,
                                left_truncate_to=None if settings.no_patches else settings.max_seq_length)
    if settings.no_patches:
        log_rank0("--no_patches: TRL's own truncation (keep_start) and its 'ref' adapter copy are in use")
    else:
        use_base_model_as_reference(trainer)
        cut = count_prompt_truncations(trainer.train_dataset, settings.max_seq_length)
        log_rank0(f"{cut['prompt_truncated']} of {cut['pairs']} training pairs have prompts cut from the left to "
                  f"fit max_seq_length={settings.max_seq_length}; {cut['completion_truncated']} have a completion "
                  f"longer than that (cut from the right); longest pair {cut['max_pair_length']} tokens")
    params = parameter_report(trainer)
    log_rank0(f"parameters: base {params['base']:,}, LoRA {params['lora_default']:,}, 'ref' adapter "
              f"{params['lora_ref']:,}, separate reference model {params['ref_model']:,}")
    runtime = None
    if dynamic:
        from opensloth.dpo.trainer import attach_dynamic_beta

        runtime = attach_dynamic_beta(trainer, dynamic_cfg,
                                      margins_log_path=os.path.join(margins_dir, "margins.jsonl"))
    if env.is_main:
        write_settings(run_dir, settings, dynamic_cfg)
    log_rank0("applied patches:\n  " + "\n  ".join(str(p) for p in applied_patches()))

    # --- train ---
    resume = settings.resume_from_checkpoint
    resume = True if resume == "last" else resume
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - start

    # --- save ---
    trainer.save_state()
    if trainer.is_world_process_zero():
        model.save_pretrained(run_dir)
        tokenizer.save_pretrained(run_dir)
        if runtime is not None:
            runtime.save(run_dir)
    beta_note = f"; final beta {runtime.beta:.6g}" if runtime is not None else ""
    log_rank0(f"trained {trainer.state.global_step} steps in {elapsed:.1f}s{beta_note}; adapter saved to {run_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
