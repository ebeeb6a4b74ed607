"""DPO launch glue: run settings, YAML + CLI, data, DPOConfig and trainer construction.

``train_scripts/train_dpo.py`` reads top to bottom and calls these helpers.
The settings live in two frozen dataclasses, :class:`DPORunSettings` and
:class:`opensloth.dpo.controller.DynamicBetaConfig`; a YAML file maps onto them
(run keys at the top level, controller keys under ``dynamic_beta:``) and CLI
flags override the YAML. Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields

from opensloth.dpo.controller import DynamicBetaConfig
from opensloth.errors import UserInputError
from opensloth.log import log_rank0

BETA_MODES = ("fixed", "dynamic")
DYNAMIC_SECTION = "dynamic_beta"


def _f(default, help_text, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class DPORunSettings:
    """Everything a DPO run needs besides the controller settings."""

    model_name: str = _f("data/tiny-qwen3", "local model folder or hub id")
    dataset: str = _f("data/preference", "preference pairs (prompt/chosen/rejected): folder with train.jsonl/test.jsonl, a JSON/JSONL/Parquet file, or a hub id")
    train_split: str = _f("train", "split of --dataset to train on; slicing like train[:10%] works")
    test_split: str = _f("test", "split for evaluation (skipped when --test_samples 0)")
    train_samples: int | None = _f(None, "use the first N training pairs (default: all)", type=int)
    test_samples: int = _f(0, "evaluate on the first N test pairs (0: no evaluation)")
    max_seq_length: int = _f(512, "token budget of prompt + completion; longer prompts are cut from the left")
    max_steps: int = _f(-1, "optimizer steps; -1 means use --num_epochs")
    num_epochs: float = _f(1.0, "epochs (ignored when --max_steps > 0)")
    learning_rate: float = _f(1e-4, "peak learning rate (linear decay)")
    lr_warmup_steps: int = _f(0, "linear learning-rate warmup steps (not the beta warmup)")
    per_device_batch_size: int | None = _f(None, "pairs per micro-batch per rank (default 8, or derived from --global_batch_size)", type=int)
    global_batch_size: int | None = _f(None, "pairs per optimizer step over all ranks; per-device size = global / (world_size x grad_accum)", type=int)
    grad_accum: int = _f(1, "gradient accumulation steps")
    logging_steps: int = _f(1, "log every N optimizer steps")
    eval_steps: int | None = _f(None, "evaluate every N steps (default: --logging_steps x 5)", type=int)
    eval_batch_size: int | None = _f(
        None, "per-device eval batch (default: the train one); 1 makes eval_loss independent of the world size "
        "(Trainer averages per-batch means)", type=int)
    save_steps: int = _f(0, "save a checkpoint every N steps (0: only the final adapter)")
    seed: int = _f(3407, "seed of LoRA init and data order (same on every rank)")
    beta_mode: str = _f("dynamic", "fixed: stock TRL beta; dynamic: opensloth's dynamic-beta controller", choices=BETA_MODES)
    beta: float = _f(0.1, "beta of --beta_mode fixed (dynamic mode starts at dynamic_beta.beta_0)")
    no_patches: bool = _f(False, "stock TRL DPO: no dynamic-beta patch (fixed beta only), TRL's own collator and 'ref' adapter; ddp_patch() still applies")
    experiment_name: str = _f("dpo", "run name; the run dir is <output_dir>/<name>_ws<world_size>")
    output_dir: str = _f("outputs", "parent folder of run directories")
    backend: str = _f("auto", "unsloth (FastLanguageModel), hf (transformers + PEFT), or auto (unsloth if installed)", choices=("auto", "unsloth", "hf"))
    dtype: str = _f("auto", "weights dtype; auto = Unsloth's choice (bf16 on CPU) or float32 for hf", choices=("auto", "float32", "bfloat16", "float16"))
    load_in_4bit: bool = _f(False, "4-bit base weights (needs bitsandbytes and CUDA)")
    no_gradient_checkpointing: bool = _f(False, "turn gradient checkpointing off")
    precompute_ref_log_probs: bool = _f(False, "compute reference log-probs once before training (TRL option)")
    resume_from_checkpoint: str | None = _f(None, "checkpoint folder to resume from, or 'last' for the newest in the run dir", type=str)
    margins_log_dir: str | None = _f(None, "folder of the margins JSONL (default <run_dir>/logs/margins)", type=str)

    def __post_init__(self):
        if self.beta_mode not in BETA_MODES:
            raise UserInputError(f"beta_mode={self.beta_mode!r} is not one of {BETA_MODES}")
        if self.beta_mode == "dynamic" and self.no_patches:
            raise UserInputError("--beta_mode dynamic needs opensloth's DPO patch; drop --no_patches or use --beta_mode fixed")
        if self.max_seq_length < 8:
            raise UserInputError(f"max_seq_length={self.max_seq_length} is too small; use at least 8")
        if self.beta <= 0:
            raise UserInputError(f"beta={self.beta} must be > 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserInputError(f"max_steps={self.max_steps} must be -1 (use num_epochs) or >= 1")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise UserInputError(f"num_epochs={self.num_epochs} must be > 0 when max_steps is -1")
        for name in ("logging_steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("save_steps", "test_samples", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name}={getattr(self, name)} must be >= 0")
        if self.train_samples is not None and self.train_samples < 1:
            raise UserInputError(f"train_samples={self.train_samples} must be >= 1")


# --------------------------------------------------------------------------- YAML + CLI


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One ``--<prefix><field>`` flag per dataclass field, help and default from the field.

    Flags default to "not given", so YAML values survive unless a flag overrides them.
    """
    for f in fields(cls):
        flag = f"--{prefix}{f.name}"
        dest = (prefix.replace(".", "__") + f.name) if prefix else f.name
        default_note = f" (default: {f.default})"
        help_text = (f.metadata.get("help", "") + default_note).replace("%", "%%")  # argparse formats help with %
        kwargs = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if not isinstance(f.default, bool):
            kwargs["metavar"] = f.name.upper()
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        kind = f.metadata.get("type") or type(f.default)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, type=kind, **kwargs)


def load_yaml(path: str) -> dict:
    """Read a YAML config file (a mapping); raises UserInputError naming the file."""
    import yaml

    if not os.path.isfile(path):
        raise UserInputError(f"--config {path!r} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise UserInputError(f"--config {path!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def resolve_settings(args: argparse.Namespace) -> tuple[DPORunSettings, DynamicBetaConfig]:
    """YAML (``args.config``) overlaid with the flags given on the command line.

    Raises UserInputError for unknown YAML keys (listing the known ones) or invalid values.
    """
    given = vars(args)
    yaml_values = load_yaml(given["config"]) if given.get("config") else {}
    dynamic_yaml = yaml_values.pop(DYNAMIC_SECTION, None) or {}
    run_keys = {f.name for f in fields(DPORunSettings)}
    unknown = sorted(set(yaml_values) - run_keys)
    if unknown:
        raise UserInputError(f"unknown keys {unknown} in --config; known: {sorted(run_keys)} and a "
                             f"'{DYNAMIC_SECTION}:' section")
    run_values = {**yaml_values, **{k: v for k, v in given.items() if k in run_keys}}
    prefix = DYNAMIC_SECTION + "__"
    dynamic_values = {**dynamic_yaml, **{k[len(prefix):]: v for k, v in given.items() if k.startswith(prefix)}}
    try:
        dynamic = DynamicBetaConfig.from_dict(dynamic_values)
    except (TypeError, ValueError) as exc:
        raise UserInputError(str(exc)) from exc
    return DPORunSettings(**run_values), dynamic


def settings_dict(settings: DPORunSettings, dynamic: DynamicBetaConfig) -> dict:
    """The resolved settings as one YAML-shaped mapping (written into the run dir)."""
    out = dataclasses.asdict(settings)
    out[DYNAMIC_SECTION] = dataclasses.asdict(dynamic)
    return out


# --------------------------------------------------------------------------- data


def load_preference_splits(settings: DPORunSettings):
    """``(train, eval_or_None)`` datasets with ``prompt``/``chosen``/``rejected`` columns."""
    from opensloth.data import load_records

    def check(ds, split):
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in ds.column_names]
        if missing:
            raise UserInputError(
                f"dataset {settings.dataset!r} split {split!r} lacks columns {missing} (has {ds.column_names}); "
                "preference data needs prompt, chosen and rejected"
            )
        if len(ds) == 0:
            raise UserInputError(f"dataset {settings.dataset!r} split {split!r} is empty")
        return ds

    train = check(load_records(settings.dataset, settings.train_split), settings.train_split)
    if settings.train_samples is not None:
        train = train.select(range(min(settings.train_samples, len(train))))
    val = None
    if settings.test_samples:
        val = check(load_records(settings.dataset, settings.test_split), settings.test_split)
        val = val.select(range(min(settings.test_samples, len(val))))
    return train, val


# --------------------------------------------------------------------------- trainer


def make_dpo_config(settings: DPORunSettings, dynamic: DynamicBetaConfig, *, run_dir: str, per_device: int,
                    world_size: int, backend: str, dtype: str, has_eval: bool):
    """A fresh ``DPOConfig`` for one run: fixed seeds, TensorBoard, sigmoid loss, left-truncation."""
    from trl import DPOConfig

    beta = settings.beta if settings.beta_mode == "fixed" else dynamic.beta_0
    return DPOConfig(
        output_dir=run_dir,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=settings.eval_batch_size or per_device,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=settings.lr_warmup_steps,
        num_train_epochs=settings.num_epochs,
        max_steps=settings.max_steps,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(settings.eval_steps or settings.logging_steps * 5) if has_eval else None,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        seed=settings.seed,
        data_seed=settings.seed,
        beta=beta,
        loss_type=["sigmoid"],
        # opensloth's collator fits pairs into max_seq_length (prompt cut from the left); TRL must then
        # neither truncate nor drop pairs. --no_patches keeps TRL's own truncation (keep_start).
        max_length=settings.max_seq_length if settings.no_patches else None,
        precompute_ref_log_probs=settings.precompute_ref_log_probs,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        # Unsloth applies its own checkpointing in get_peft_model.
        gradient_checkpointing=not settings.no_gradient_checkpointing and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=["tensorboard"],
        ddp_find_unused_parameters=False if world_size > 1 else None,
        dataloader_num_workers=0,
        optim="adamw_torch",
        weight_decay=0.0,
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
        from opensloth.dpo.trainer import patch_dpo_trainer_dynamic_beta

        cls = patch_dpo_trainer_dynamic_beta(cls)
    log_rank0(f"DPOTrainer class in use: {cls.__module__}.{cls.__qualname__}")
    return cls


def build_dpo_trainer(trainer_cls, model, tokenizer, train_dataset, eval_dataset, base_config, *,
                      left_truncate_to: int | None = None):
    """Construct ``trainer_cls`` with its own copy of ``base_config`` (never mutated).

    ``ref_model`` is None: the reference is the policy with its adapter
    disabled. With ``left_truncate_to`` the collator fits every pair into that
    many tokens, cutting the prompt from the left
    (:class:`opensloth.dpo.data.LeftTruncatingPreferenceCollator`); otherwise
    TRL's own collator and ``base_config.max_length`` apply.
    """
    args = dataclasses.replace(base_config)  # TRL may write into its args; keep the caller's config intact
    collator = None
    if left_truncate_to is not None:
        from opensloth.dpo.data import LeftTruncatingPreferenceCollator

        collator = LeftTruncatingPreferenceCollator(pad_token_id=tokenizer.pad_token_id, max_length=left_truncate_to)
    return trainer_cls(
        model=model,
        ref_model=None,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def write_settings(run_dir: str, settings: DPORunSettings, dynamic: DynamicBetaConfig) -> str:
    """Write the resolved settings to ``<run_dir>/opensloth_dpo_settings.json``; returns the path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "opensloth_dpo_settings.json")
    with open(path, "w") as fh:
        json.dump(settings_dict(settings, dynamic), fh, indent=1, sort_keys=True)
    return path
