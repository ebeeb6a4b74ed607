"""DPO launch glue: run settings (flags + YAML), the DPOConfig, and trainer construction.

``train_scripts/train_dpo.py`` reads top to bottom and calls these helpers.
The settings live in two frozen dataclasses, :class:`DPORunSettings` and
:class:`opensloth.dpo.controller.DynamicBetaConfig`; :data:`SECTIONS` maps a
YAML file onto them (run keys at the top level, controller keys under
``dynamic_beta:``) and CLI flags override the YAML (:mod:`opensloth.config`).
Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from opensloth.atomic import write_json_atomic
from opensloth.config import Section, load_yaml, resolve, setting
from opensloth.dpo.collator import LeftTruncatingPreferenceCollator, drop_identical_pairs
from opensloth.dpo.controller import STATE_FILE, DynamicBetaConfig
from opensloth.dpo.reference_config import is_reference_config, translate_reference_config
from opensloth.errors import UserInputError
from opensloth.launch import (FSDP_HELP, BACKENDS, DEFAULT_MODEL, DEFAULT_PREFERENCE_DATASET, DTYPES, EVAL_STRATEGIES,
                              LR_SCHEDULER_HELP, LR_SCHEDULERS, MAX_GRAD_NORM_HELP, MIXED_PRECISION,
                              MIXED_PRECISION_HELP, WEIGHT_DECAY_HELP, check_optimizer_settings, training_args_kwargs)
from opensloth.log import log_rank0, warn_rank0
from opensloth.preflight import DataCheck

BETA_MODES = ("fixed", "dynamic")
HH_PARSERS = ("shared_prefix", "reference")
REFERENCE_VARIANTS = ("auto", "dynamic_beta", "dynamic-dpo-v1")
DYNAMIC_SECTION = "dynamic_beta"
SETTINGS_FILE = "opensloth_dpo_settings.json"


@dataclass(frozen=True)
class DPORunSettings:
    """Everything a DPO run needs besides the controller settings."""

    model_name: str = setting(DEFAULT_MODEL, "local model folder or hub id")
    dataset: str = setting(DEFAULT_PREFERENCE_DATASET, "preference data (prompt/chosen/rejected pairs, Anthropic HH transcripts, judged rollouts, chat-message pairs, or a folder from precompute_dataset.py): folder with train.jsonl/test.jsonl, a JSON/JSONL/Parquet file, or a hub id")
    train_split: str = setting("train", "split of --dataset to train on; slicing like train[:10%] works")
    test_split: str = setting("test", "split for evaluation (skipped when --test_samples 0 and --val_ratio 0)")
    val_ratio: float = setting(0.0, "hold out this fraction of the parsed training pairs for evaluation (seeded by "
                                    "--split_seed; replaces --test_split); 0: off")
    split_seed: int = setting(42, "seed of the --val_ratio split")
    hh_parser: str = setting("shared_prefix", "Anthropic HH transcripts: shared_prefix (prompt = the shared "
                                              "conversation up to the last common Assistant turn) or reference (the "
                                              "dynamic-DPO repositories' parser: last Assistant turn of chosen, "
                                              "rejected must start with it, identical answers kept)",
                             choices=HH_PARSERS)
    chat_template: bool = setting(False, "render pairs with the tokenizer's chat template (HH and judged "
                                         "transcripts are parsed into turns); default: plain text")
    train_samples: int | None = setting(None, "use the first N training pairs (default: all)")
    test_samples: int = setting(0, "evaluate on the first N test pairs (0: no evaluation)")
    max_seq_length: int = setting(512, "token budget of prompt + completion; longer prompts are cut from the left")
    max_steps: int = setting(-1, "optimizer steps; -1 means use --num_epochs")
    num_epochs: float = setting(1.0, "epochs (ignored when --max_steps > 0)")
    learning_rate: float = setting(1e-4, "peak learning rate (decayed by --lr_scheduler_type)")
    lr_warmup_steps: int = setting(0, "linear learning-rate warmup steps (not the beta warmup)")
    lr_scheduler_type: str = setting("linear", LR_SCHEDULER_HELP, choices=LR_SCHEDULERS)
    weight_decay: float = setting(0.0, WEIGHT_DECAY_HELP)
    max_grad_norm: float = setting(1.0, MAX_GRAD_NORM_HELP)
    per_device_batch_size: int | None = setting(None, "pairs per micro-batch per rank (default 8, or derived from --global_batch_size)")
    global_batch_size: int | None = setting(None, "pairs per optimizer step over all ranks; per-device size = global / (world_size x grad_accum)")
    grad_accum: int = setting(1, "gradient accumulation steps")
    logging_steps: int = setting(1, "log every N optimizer steps")
    eval_steps: int | None = setting(None, "evaluate every N steps (default: --logging_steps x 5)")
    eval_strategy: str = setting("steps", "evaluate every --eval_steps, or at the end of each epoch",
                                 choices=EVAL_STRATEGIES)
    eval_batch_size: int | None = setting(
        None, "per-device eval batch (default: the train one); 1 makes eval_loss independent of the world size "
        "(Trainer averages per-batch means)")
    save_steps: int = setting(0, "save a checkpoint every N steps (0: only the final adapter)")
    seed: int = setting(3407, "seed of LoRA init and data order (same on every rank)")
    beta_mode: str = setting("dynamic", "fixed: stock TRL beta; dynamic: opensloth's dynamic-beta controller", choices=BETA_MODES)
    beta: float = setting(0.1, "beta of --beta_mode fixed (dynamic mode starts at dynamic_beta.beta_0)")
    no_patches: bool = setting(False, "stock TRL DPO: no dynamic-beta patch (fixed beta only), TRL's own collator and 'ref' adapter; ddp_patch() still applies")
    experiment_name: str = setting("dpo", "run name; the run dir is <output_dir>/<name>_ws<world_size>")
    output_dir: str = setting("outputs", "parent folder of run directories")
    backend: str = setting("auto", "unsloth (FastLanguageModel), hf (transformers + PEFT), or auto (unsloth if installed)", choices=BACKENDS)
    dtype: str = setting("auto", "weights dtype; auto = Unsloth's choice (bf16 on CPU) or float32 for hf", choices=DTYPES)
    mixed_precision: str = setting("auto", MIXED_PRECISION_HELP, choices=MIXED_PRECISION)
    full_finetune: bool = setting(False, "train every weight (no LoRA) against a separate frozen reference model "
                                         "(--ref_model, default the --model_name checkpoint)")
    ref_model: str | None = setting(None, "--full_finetune: the frozen reference model (local folder or hub id; "
                                          "default --model_name)")
    load_in_4bit: bool = setting(False, "4-bit base weights (needs bitsandbytes and CUDA)")
    no_gradient_checkpointing: bool = setting(False, "turn gradient checkpointing off")
    fsdp: bool = setting(False, FSDP_HELP)
    precompute_ref_log_probs: bool = setting(False, "compute reference log-probs once before training (TRL option)")
    resume_from_checkpoint: str | None = setting(None, "checkpoint folder to resume from, or 'last' for the last complete checkpoint in the run dir")
    margins_log_dir: str | None = setting(None, "folder of the margins JSONL (default <run_dir>/logs/margins)")
    reference_logs: bool = setting(False, "also write the dynamic-DPO repositories' logs into the margins folder: "
                                          "margins_log.jsonl, epoch_XXX/step_XXXXX.npy, risk_test_and_beta_log.jsonl "
                                          "and risk.log ('risk/fail' lines)")
    reference_log_sample: int = setting(0, "length of 'sample' in margins_log.jsonl (0: every margin)")
    reference_variant: str = setting("auto", "a --config in the format of a dynamic-DPO repository: which one "
                                             "(auto: from its keys)", choices=REFERENCE_VARIANTS)

    def __post_init__(self):
        if self.beta_mode not in BETA_MODES:
            raise UserInputError(f"beta_mode={self.beta_mode!r} is not one of {BETA_MODES}")
        if self.beta_mode == "dynamic" and self.no_patches:
            raise UserInputError("--beta_mode dynamic needs opensloth's DPO patch; drop --no_patches or use --beta_mode fixed")
        if self.max_seq_length < 8:
            raise UserInputError(f"max_seq_length={self.max_seq_length} is too small; use at least 8")
        if self.beta <= 0:
            raise UserInputError(f"beta={self.beta} must be > 0")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise UserInputError(f"learning_rate={self.learning_rate} must be a number > 0 (e.g. 1e-4)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserInputError(f"max_steps={self.max_steps} must be -1 (use num_epochs) or >= 1")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise UserInputError(f"num_epochs={self.num_epochs} must be > 0 when max_steps is -1")
        for name in ("logging_steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("save_steps", "test_samples", "lr_warmup_steps", "reference_log_sample"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 0")
        if self.train_samples is not None and self.train_samples < 1:
            raise UserInputError(f"train_samples={self.train_samples} must be >= 1")
        if not 0 <= self.val_ratio < 1:
            raise UserInputError(f"val_ratio={self.val_ratio} must lie in [0, 1) (0: no split)")
        check_optimizer_settings(self)
        if self.ref_model is not None and not self.full_finetune:
            raise UserInputError("ref_model is the frozen reference of --full_finetune; with LoRA the reference is "
                                 "the base model with the adapter off. Add --full_finetune or drop ref_model")
        if self.full_finetune and self.load_in_4bit:
            raise UserInputError("--full_finetune trains every weight, which 4-bit weights cannot; drop "
                                 "--load_in_4bit (or train LoRA)")


# --------------------------------------------------------------------------- flags + YAML

SECTIONS = (Section(None, DPORunSettings), Section(DYNAMIC_SECTION, DynamicBetaConfig))


def resolve_settings(args) -> tuple[DPORunSettings, DynamicBetaConfig]:
    """Defaults < YAML (``args.config``) < the flags given on the command line.

    A ``--config`` in the layout of the dynamic-DPO reference repositories
    (``policy_name``, ``dpo_training:``, ``risk_test:``, ...) is translated
    first (:mod:`opensloth.dpo.reference_config`); what it ignores or maps in
    part is logged, one line per key.

    Raises UserInputError for unknown YAML keys (listing the known ones) or invalid values.
    """
    values = vars(args) if not isinstance(args, dict) else args
    path = values.get("config")
    data = load_yaml(path) if path else None
    if data is not None and is_reference_config(data):
        translation = translate_reference_config(data, path, DPORunSettings,
                                                 values.get("reference_variant", "auto"))
        for note in translation.notes:
            log_rank0(note)
        data = translation.values
    settings, dynamic = resolve(args, SECTIONS, yaml_values=data)
    return settings, dynamic


def data_checks(settings: DPORunSettings) -> tuple[DataCheck, ...]:
    """The splits a DPO run reads, for the pre-flight (:func:`opensloth.launch.setup_run`)."""
    checks = [DataCheck(settings.dataset, settings.train_split, "preference")]
    if settings.test_samples:
        checks.append(DataCheck(settings.dataset, settings.test_split, "preference"))
    return tuple(checks)


def resume_files(settings: DPORunSettings) -> tuple[str, ...]:
    """What a checkpoint must hold to resume this run: the controller state in dynamic mode."""
    return (STATE_FILE,) if settings.beta_mode == "dynamic" else ()


def settings_dict(settings: DPORunSettings, dynamic: DynamicBetaConfig) -> dict:
    """The resolved settings as one YAML-shaped mapping (written into the run dir)."""
    out = dataclasses.asdict(settings)
    out[DYNAMIC_SECTION] = dataclasses.asdict(dynamic)
    return out


# --------------------------------------------------------------------------- trainer


def make_dpo_config(settings: DPORunSettings, dynamic: DynamicBetaConfig, *, run_dir: str, per_device: int,
                    world_size: int, backend: str, dtype: str, has_eval: bool):
    """A fresh ``DPOConfig`` for one run: the shared training arguments, sigmoid loss, left-truncation."""
    from trl import DPOConfig

    beta = settings.beta if settings.beta_mode == "fixed" else dynamic.beta_0
    return DPOConfig(
        **training_args_kwargs(settings, run_dir=run_dir, per_device=per_device, world_size=world_size,
                               backend=backend, dtype=dtype, has_eval=has_eval,
                               warmup_steps=settings.lr_warmup_steps),
        beta=beta,
        loss_type=["sigmoid"],
        # opensloth's collator fits pairs into max_seq_length (prompt cut from the left); TRL must then
        # neither truncate nor drop pairs. --no_patches keeps TRL's own truncation (keep_start).
        max_length=settings.max_seq_length if settings.no_patches else None,
        precompute_ref_log_probs=settings.precompute_ref_log_probs,
    )


def dpo_trainer_class(*, dynamic: bool, backend: str):
    """The DPOTrainer class in use, patched for dynamic beta when asked.

    On a GPU machine with Unsloth, ``unsloth.PatchDPOTrainer()`` runs first
    when Unsloth exports it (its CPU fallback does not).
    """
    if backend == "unsloth":
        import unsloth

        patch = getattr(unsloth, "PatchDPOTrainer", None)
        if patch is not None:
            patch()
    import trl

    cls = trl.DPOTrainer
    if dynamic:
        from opensloth.patches.dpo_dynamic_beta import patch_dpo_trainer_dynamic_beta

        cls = patch_dpo_trainer_dynamic_beta(cls)
    log_rank0(f"DPOTrainer class in use: {cls.__module__}.{cls.__qualname__}")
    return cls


def build_dpo_trainer(trainer_cls, model, tokenizer, train_dataset, eval_dataset, base_config, *,
                      left_truncate_to: int | None = None, ref_model=None):
    """Construct ``trainer_cls`` with its own copy of ``base_config`` (never mutated).

    ``ref_model`` None with a LoRA policy: the reference is the policy with its
    adapter disabled. Full fine-tuning passes the frozen reference model (or
    None with ``precompute_ref_log_probs``: TRL then computes the reference
    log-probs with the policy before its first step). With
    ``left_truncate_to`` the collator fits every pair into that many tokens,
    cutting the prompt from the left
    (:class:`opensloth.dpo.collator.LeftTruncatingPreferenceCollator`); otherwise
    TRL's own collator and ``base_config.max_length`` apply.
    """
    args = dataclasses.replace(base_config)  # TRL may write into its args; keep the caller's config intact
    collator = None
    if left_truncate_to is not None:
        collator = LeftTruncatingPreferenceCollator(pad_token_id=tokenizer.pad_token_id, max_length=left_truncate_to)
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    # TRL tokenized the pairs; drop those that became identical token sequences (margin 0, no gradient).
    fit = left_truncate_to if left_truncate_to is not None else args.max_length
    for split in ("train", "eval"):
        data = getattr(trainer, f"{split}_dataset")
        if data is None or isinstance(data, dict) or "prompt_ids" not in getattr(data, "column_names", ()):
            continue
        total = len(data)
        data, dropped = drop_identical_pairs(data, fit, left_truncate=left_truncate_to is not None)
        if dropped:
            if not len(data):
                raise UserInputError(f"every {split} pair has identical chosen and rejected tokens once fitted into "
                                     f"max_seq_length={fit}; nothing to learn from. Raise --max_seq_length")
            warn_rank0(f"{dropped} of {total} {split} pairs have identical chosen and rejected tokens once fitted "
                       f"into max_seq_length={fit} (they differ only beyond it: margin 0, no gradient); dropped. "
                       "Raise --max_seq_length to keep them")
            setattr(trainer, f"{split}_dataset", data)
    return trainer


def reference_model_source(settings: DPORunSettings) -> str | None:
    """Which checkpoint to load as the separate frozen reference, or None.

    None for LoRA (the adapter-disabled policy is the reference) and for full
    fine-tuning with ``precompute_ref_log_probs`` against the starting policy
    (TRL computes them with the policy before it trains).
    """
    if not settings.full_finetune:
        return None
    source = settings.ref_model or settings.model_name
    if settings.precompute_ref_log_probs and source == settings.model_name:
        return None
    return source


def write_settings(run_dir: str, settings: DPORunSettings, dynamic: DynamicBetaConfig) -> str:
    """Write the resolved settings to ``<run_dir>/opensloth_dpo_settings.json`` (atomic); returns the path."""
    path = os.path.join(run_dir, SETTINGS_FILE)
    write_json_atomic(path, settings_dict(settings, dynamic))
    return path


def dpo_summary_lines(log_history: list[dict], runtime=None) -> list[tuple[str, str]]:
    """Rows of the end-of-run summary a DPO user acts on: reward accuracy, eval loss, the beta trajectory.

    Read from the trainer's ``log_history`` (TRL's ``rewards/*`` and ``eval_*``
    keys, the dynamic-beta ``dynamic_beta/beta`` scalar) and, for the final
    beta, the dynamic-beta runtime when there is one.
    """

    def series(key: str) -> list[float]:
        return [float(r[key]) for r in log_history if isinstance(r.get(key), (int, float))]

    def mean_tail(values: list[float]) -> float:
        tail = values[-max(1, len(values) // 10):]
        return sum(tail) / len(tail)

    rows = []
    acc = series("rewards/accuracies")
    if acc:
        rows.append(("reward accuracy", f"{acc[0]:.0%} (first step) -> {mean_tail(acc):.0%} (last steps, train)"))
    eval_loss, eval_acc = series("eval_loss"), series("eval_rewards/accuracies")
    if eval_loss:
        text = f"{eval_loss[0]:.4g} -> {eval_loss[-1]:.4g}" if len(eval_loss) > 1 else f"{eval_loss[-1]:.4g}"
        if eval_acc:
            text += f" (reward accuracy {eval_acc[-1]:.0%})"
        rows.append(("eval loss", text))
    betas = series("dynamic_beta/beta")
    if runtime is not None:
        start = f"{betas[0]:.4g} -> " if betas else ""
        where = getattr(runtime, "margins_log_path", None) or "TensorBoard, dynamic_beta/"
        rows.append(("beta", f"{start}{runtime.beta:.4g} (dynamic; per step: {where})"))
    return rows
