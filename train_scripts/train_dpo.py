"""DPO with a fixed or a dynamic beta, LoRA or full fine-tuning, on 1 or N ranks (Unsloth or transformers + PEFT).

    torchrun --nproc_per_node=2 train_scripts/train_dpo.py                      # embedded default, dynamic beta
    torchrun --nproc_per_node=2 train_scripts/train_dpo.py --config examples/config_dpo.yaml
    torchrun --nproc_per_node=2 train_scripts/train_dpo.py --beta_mode fixed --beta 0.1
    python train_scripts/train_dpo.py --max_steps 8 --dynamic_beta.warmup_steps 2 --dynamic_beta.alpha 0.5
    python train_scripts/train_dpo.py --resume_from_checkpoint outputs/dpo_ws1/checkpoint-4
    torchrun --nproc_per_node=2 train_scripts/train_dpo.py --save_steps 50 --resume_from_checkpoint last
    python train_scripts/train_configurable.py --task dpo ...                  # same script, via the SFT entry point
    python train_scripts/train_dpo.py --full_finetune --ref_model M            # every weight, frozen reference M
    python train_scripts/train_dpo.py --config their/config_dpo.yaml           # a dynamic-DPO repository's config

Steps: flags (+ YAML; a dynamic-DPO repository's config is translated) ->
pre-flight (model files, data, checkpoint, output folder: opensloth.preflight)
-> import Unsloth (first) -> ddp_patch() -> load model + LoRA (or every weight
with --full_finetune, plus a separate frozen reference model) -> load
preference pairs -> DPOTrainer (patched for dynamic beta) -> train -> save
adapter (or model), trainer state and controller state to
``<output_dir>/<experiment_name>_ws<world_size>``.

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

# Light imports only (none imports torch, transformers or TRL): Unsloth must come first, in setup_run.
from opensloth.config import ArgumentParser, add_config_flags
from opensloth.data.preference import load_preference_splits
from opensloth.dpo.collator import count_prompt_truncations
from opensloth.dpo.lora_reference import parameter_report, use_base_model_as_reference
from opensloth.dpo.run import (SECTIONS, build_dpo_trainer, data_checks, dpo_summary_lines, dpo_trainer_class,
                               make_dpo_config, reference_model_source, resolve_settings, resume_files,
                               write_settings)
from opensloth.errors import run_cli
from opensloth.launch import (LoraSettings, finish_run, load_frozen_model, load_model_and_tokenizer,
                              model_dtype_name, setup_run, train_and_save)
from opensloth.log import log_rank0
from opensloth.patches import applied_patches


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --config, then --model_name, --dataset, --max_steps, --beta_mode, ... and --dynamic_beta.alpha, ...
    add_config_flags(p, SECTIONS, config_help="YAML file with these settings (dynamic-beta keys under "
                                              "'dynamic_beta:'); flags override it")
    return p


def main(argv: list[str] | None = None) -> None:
    settings, dynamic_cfg = resolve_settings(build_parser().parse_args(argv))
    dynamic = settings.beta_mode == "dynamic"

    # --- setup: pre-flight (model files, data, checkpoint, output folder), Unsloth first, then ddp_patch ---
    launch = setup_run(settings, unit="pairs", data=data_checks(settings), resume_files=resume_files(settings),
                       lora=None if settings.full_finetune else LoraSettings())
    log_rank0(f"beta_mode={settings.beta_mode}")

    # --- model ---
    model, tokenizer = load_model_and_tokenizer(
        settings.model_name, backend=launch.backend, max_seq_length=settings.max_seq_length, device=launch.device,
        seed=settings.seed, dtype=settings.dtype, lora=LoraSettings(),
        gradient_checkpointing=not settings.no_gradient_checkpointing, load_in_4bit=settings.load_in_4bit,
        full_finetune=settings.full_finetune,
    )
    ref_source = reference_model_source(settings)
    ref_model = (load_frozen_model(ref_source, device=launch.device, dtype=model_dtype_name(model),
                                   backend=launch.backend) if ref_source else None)
    if settings.full_finetune and ref_model is None:
        log_rank0("full fine-tuning: reference log-probs are precomputed with the starting policy (no second copy)")

    # --- data: pairs, HH transcripts, judged rollouts, chat pairs or a prepared folder -> prompt/chosen/rejected ---
    train_ds, val_ds = load_preference_splits(
        settings.dataset, train_split=settings.train_split, test_split=settings.test_split,
        train_samples=settings.train_samples, test_samples=settings.test_samples, val_ratio=settings.val_ratio,
        split_seed=settings.split_seed, hh_parser=settings.hh_parser, as_messages=settings.chat_template)

    # --- trainer ---
    dpo_config = make_dpo_config(settings, dynamic_cfg, run_dir=launch.run_dir, per_device=launch.per_device,
                                 world_size=launch.world_size, backend=launch.backend,
                                 dtype=model_dtype_name(model), has_eval=val_ds is not None)
    trainer_cls = dpo_trainer_class(dynamic=dynamic, backend=launch.backend)
    trainer = build_dpo_trainer(trainer_cls, model, tokenizer, train_ds, val_ds, dpo_config,
                                left_truncate_to=None if settings.no_patches else settings.max_seq_length,
                                ref_model=ref_model)
    if settings.no_patches:
        log_rank0("--no_patches: TRL's own truncation (keep_start) and its 'ref' adapter copy are in use")
    else:
        if not settings.full_finetune:
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
        from opensloth.patches.dpo_dynamic_beta import attach_dynamic_beta  # imports transformers: after setup

        margins_dir = settings.margins_log_dir or os.path.join(launch.run_dir, "logs", "margins")
        writer = None
        if settings.reference_logs:  # the dynamic-DPO repositories' file names and keys, beside ours
            from opensloth.dpo.reference_logs import ReferenceLogWriter

            newer = dynamic_cfg.preset == "reference_v1" or settings.reference_variant == "dynamic-dpo-v1"
            writer = ReferenceLogWriter(margins_dir, sample_size=settings.reference_log_sample,
                                        fail_rule="p_hat_above_delta" if newer else "risk_over")
        runtime = attach_dynamic_beta(trainer, dynamic_cfg, on_update=writer,
                                      margins_log_path=os.path.join(margins_dir, "margins.jsonl"))
    if launch.env.is_main:
        write_settings(launch.run_dir, settings, dynamic_cfg)
    log_rank0("applied patches:\n  " + "\n  ".join(str(p) for p in applied_patches()))

    # --- train and save (adapter, tokenizer, trainer state, controller state) ---
    elapsed = train_and_save(trainer, model, tokenizer, launch.run_dir,
                             resume_from_checkpoint=launch.resume_from_checkpoint,
                             save_extra=runtime.save if runtime is not None else None)
    finish_run(trainer, launch, task="DPO", seconds=elapsed, unit="pairs", adapter=not settings.full_finetune,
               lines=dpo_summary_lines(trainer.state.log_history, runtime))


if __name__ == "__main__":
    sys.exit(run_cli(main))
