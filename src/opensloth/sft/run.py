"""SFT glue: run settings (flags + YAML), chat splits, the SFTConfig and the trainer factory.

``train_scripts/train_configurable.py`` reads top to bottom and calls these
helpers. :class:`SFTSettings` is the one place the SFT flags are defined:
``--config run.yaml`` maps a YAML file onto it and flags override the YAML
(:mod:`opensloth.config`), exactly as for DPO. ``build_sft_trainer`` has the
factory signature the dataset cache wrapper expects:
``(model, tokenizer, train_dataset, val_dataset, world_size, settings, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import math
import os
import time

from opensloth.cache.wrapper import DATA_REPORT, sft_dataset_kwargs
from opensloth.cache.coordination import BUILDER_MODES
from opensloth.config import Section, resolve, setting
from opensloth.data.chat import count_truncated
from opensloth.distributed import distributed_env
from opensloth.errors import UserInputError
from opensloth.launch import (FSDP_HELP, BACKENDS, DEFAULT_MODEL, DEFAULT_SFT_DATASET, DTYPES, LR_SCHEDULER_HELP,
                              LR_SCHEDULERS, MAX_GRAD_NORM_HELP, WEIGHT_DECAY_HELP, LoraSettings, check_model_source,
                              check_optimizer_settings, is_embedded_model, is_embedded_sft_data, model_dtype_name,
                              training_args_kwargs)
from opensloth.log import log_rank0
from opensloth.preflight import DataCheck
from opensloth.sft.eval import evaluate_heldout
from opensloth.tasks import TASK_KINDS
from opensloth.patches.batch_samples import PATCH_NAME as BATCH_PATCH
from opensloth.patches.unsloth_compat import check_trainer_patched

PACKING_LAYOUTS = ("auto", "varlen", "rows4d", "padded")
# LoRA on all seven linear layers, as Unsloth's notebooks do (the original OpenSloth used q/k/v/o): on the
# embedded model they teach the negate task of the default run half again as well as q/k/v/o (data/README.md).
SFT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 2e-4 is the usual LoRA rate for real models; the embedded model (378k parameters, hidden size 64) needs a
# step 50x larger to learn the negate task of its SFT data in the default 125 steps.
SFT_LEARNING_RATE = 2e-4
EMBEDDED_SFT_LEARNING_RATE = 1e-2
EMBEDDED_HELDOUT_TASK = "negate"  # the kind only the shipped SFT data teaches


def default_sft_learning_rate(model_name: str) -> float:
    """The learning rate of a run that names none: 1e-2 for the embedded tiny model, else 2e-4."""
    return EMBEDDED_SFT_LEARNING_RATE if is_embedded_model(model_name) else SFT_LEARNING_RATE


@dataclass(frozen=True)
class SFTSettings:
    """Everything an SFT run needs: the flags of ``train_configurable.py`` and the keys of its YAML."""

    model_name: str = setting(DEFAULT_MODEL, "local model folder or hub id")
    dataset: str = setting(DEFAULT_SFT_DATASET, "chat data: folder with train.jsonl/test.jsonl, a JSON/JSONL/Parquet "
                                                "file, or a hub id")
    train_split: str = setting("train", "split of --dataset to train on; slicing like train[:1%] works")
    test_split: str = setting("test", "split for evaluation (skipped when --test_samples 0)")
    max_seq_length: int = setting(1024, "truncate samples to this many tokens")
    num_epochs: float = setting(1.0, "epochs (ignored when --max_steps > 0)")
    max_steps: int = setting(-1, "optimizer steps; -1 means use --num_epochs")
    train_samples: int | None = setting(None, "use the first N training records")
    test_samples: int = setting(0, "evaluate on the first N test records (0: no eval)")
    eval_steps: int | None = setting(None, "evaluate every N steps (default: --logging_steps x 5)")
    eval_batch_size: int | None = setting(None, "per-device eval batch (default: the train one); 1 makes eval_loss "
                                                "independent of the world size, since Trainer averages per-batch means")
    learning_rate: float | None = setting(None, "peak learning rate (decayed by --lr_scheduler_type). Default: "
                                                f"{SFT_LEARNING_RATE:g}, the usual LoRA rate for real models; "
                                                f"{EMBEDDED_SFT_LEARNING_RATE:g} for the embedded {DEFAULT_MODEL} "
                                                "(hidden size 64), which learns next to nothing in 125 steps at "
                                                f"{SFT_LEARNING_RATE:g}")
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: int = setting(16, "LoRA alpha (the update is scaled by alpha / r)")
    lora_target_modules: tuple[str, ...] = setting(SFT_LORA_TARGETS, "linear layers that get LoRA adapters: all "
                                                   "seven by default, as in Unsloth's notebooks (the original "
                                                   "OpenSloth used q_proj k_proj v_proj o_proj)")
    warmup_steps: int = setting(0, "linear warmup steps")
    lr_scheduler_type: str = setting("linear", LR_SCHEDULER_HELP, choices=LR_SCHEDULERS)
    weight_decay: float = setting(0.0, WEIGHT_DECAY_HELP)
    max_grad_norm: float = setting(1.0, MAX_GRAD_NORM_HELP)
    per_device_batch_size: int | None = setting(None, "micro-batch per rank (default 8)")
    global_batch_size: int | None = setting(None, "derive the per-device size as global / (world_size x grad_accum)")
    grad_accum: int = setting(1, "gradient accumulation steps")
    logging_steps: int = setting(1, "log the loss every N steps")
    save_steps: int = setting(0, "save a checkpoint every N steps (0: only at the end)")
    seed: int = setting(3407, "seed for LoRA init and data order (same on all ranks)")
    no_patches: bool = setting(False, "disable the optional speed patches (batch repacking / cross-rank balancing); "
                                      "the run dir gets the suffix _nopatches")
    use_patches: bool = setting(False, "accepted for the original OpenSloth's command lines: the patches are on "
                                       "unless --no_patches, which wins when both are given")
    packing_layout: str = setting("auto", "micro-batch layout of the batch patch: padding-free varlen rows, packed "
                                          "rows with a 4D block mask, or padded rows (auto picks for the attention "
                                          "backend)", choices=PACKING_LAYOUTS)
    debug_dataloader: bool = setting(False, "write an HTML preview of the first batches (trained/masked tokens, "
                                            "boundaries) to .log/")
    experiment_name: str = setting("sft", "run name; the run dir is <output_dir>/<name>_ws<N>[_nopatches]")
    output_dir: str = setting("outputs", "parent folder of run directories")
    backend: str = setting("auto", "unsloth (FastLanguageModel), hf (transformers + PEFT), or auto (unsloth if "
                                   "installed)", choices=BACKENDS)
    dtype: str = setting("auto", "weights dtype; auto = Unsloth's choice (bf16 on CPU) or float32 for hf",
                         choices=DTYPES)
    load_in_4bit: bool = setting(False, "4-bit base weights (needs bitsandbytes and CUDA)")
    assistant_only_loss: bool = setting(False, "train only on assistant turns (needs {% generation %} markers in "
                                               "the chat template)")
    no_gradient_checkpointing: bool = setting(False, "turn gradient checkpointing off")
    fsdp: bool = setting(False, FSDP_HELP)
    skip_prepare: bool = setting(False, "train from a tokenized dataset written by precompute_dataset.py")
    prepared_dataset_path: str | None = setting(None, "folder with train/ (and val/) from precompute_dataset.py; "
                                                      "needs --skip_prepare")
    cache_dir: str | None = setting(None, "tokenized-dataset cache shared by all ranks and later launches (default: "
                                          "$OPENSLOTH_CACHE_DIR, else ~/.cache/opensloth/datasets; '' disables it)")
    cache_builder: str = setting("global", "who tokenizes into --cache_dir: global rank 0 ('global': the folder "
                                           "must be on a filesystem every node sees) or local rank 0 of each node "
                                           "('local': node-local folders, one build per node)",
                                 choices=BUILDER_MODES)
    resume_from_checkpoint: str | None = setting(None, "checkpoint folder to resume from, or 'last' for the last "
                                                       "complete checkpoint in the run dir")
    heldout_samples: int = setting(200, "held-out loss before and after training on the first N conversations of "
                                        "the test split, when --dataset is a local folder or file that has one "
                                        "(0: off)")
    heldout_exact: int = setting(48, "greedy exact-match before and after training on the first N held-out prompts "
                                     "whose task opensloth.tasks can check (0: off)")
    heldout_task: str | None = setting(None, "only count held-out prompts of this task kind for exact-match "
                                             "(default: every kind opensloth.tasks recognises; 'negate' on the "
                                             "shipped data/sft, the kind its base model never learned)")

    def __post_init__(self):
        if self.max_seq_length < 8:
            raise UserInputError(f"--max_seq_length {self.max_seq_length} is too small; use at least 8")
        if self.learning_rate is None:  # the model's default (frozen dataclass: set once, here)
            object.__setattr__(self, "learning_rate", default_sft_learning_rate(self.model_name))
        if self.heldout_task is None and is_embedded_sft_data(self.dataset):
            # The shipped data's new skill (the base model was never taught it): what the summary shows learned.
            object.__setattr__(self, "heldout_task", EMBEDDED_HELDOUT_TASK)
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise UserInputError(f"--learning_rate {self.learning_rate} must be a number > 0 (e.g. 2e-4)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserInputError(f"--max_steps {self.max_steps} must be -1 (use --num_epochs) or >= 1")
        if self.max_steps == -1 and not self.num_epochs > 0:
            raise UserInputError(f"--num_epochs {self.num_epochs} must be > 0 when --max_steps is -1")
        if self.grad_accum < 1:
            raise UserInputError(f"--grad_accum {self.grad_accum} must be >= 1")
        for name in ("warmup_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise UserInputError(f"--{name} {getattr(self, name)} must be >= 0")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise UserInputError(f"--eval_steps {self.eval_steps} must be >= 1")
        if self.skip_prepare and not self.prepared_dataset_path:
            raise UserInputError("--skip_prepare needs --prepared_dataset_path outputs/precomputed/<name>")
        if self.prepared_dataset_path and not self.skip_prepare:
            raise UserInputError("--prepared_dataset_path is only read with --skip_prepare; add --skip_prepare")
        for name in ("train_samples", "test_samples", "heldout_samples", "heldout_exact"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserInputError(f"--{name} {value} must be >= 0")
        if self.logging_steps < 1:
            raise UserInputError(f"--logging_steps {self.logging_steps} must be >= 1")
        if self.heldout_task is not None and self.heldout_task not in TASK_KINDS:
            raise UserInputError(f"--heldout_task {self.heldout_task!r} is not a task kind; choose one of "
                                 f"{', '.join(TASK_KINDS)}")
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} {getattr(self, name)} must be an integer >= 1")
        if not self.lora_target_modules:
            raise UserInputError("--lora_target_modules is empty; name layers such as q_proj k_proj v_proj o_proj")
        check_optimizer_settings(self)

    @property
    def lora(self) -> LoraSettings:
        """The adapter these settings describe."""
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, target_modules=self.lora_target_modules)


SECTIONS = (Section(None, SFTSettings),)


def resolve_settings(args) -> SFTSettings:
    """Defaults < YAML (``args.config``) < the flags given on the command line; the model path is checked.

    A run without a learning rate gets :func:`default_sft_learning_rate` of its final model
    (:class:`SFTSettings` resolves it when built).
    """
    (settings,) = resolve(args, SECTIONS)
    check_model_source(settings.model_name)
    return settings


def data_checks(settings: SFTSettings) -> tuple[DataCheck, ...]:
    """The splits an SFT run reads, for the pre-flight (:func:`opensloth.launch.setup_run`)."""
    if settings.skip_prepare:
        return (DataCheck(settings.prepared_dataset_path, kind="prepared", flag="--prepared_dataset_path"),)
    checks = [DataCheck(settings.dataset, settings.train_split, "chat")]
    if settings.test_samples:
        checks.append(DataCheck(settings.dataset, settings.test_split, "chat"))
    return tuple(checks)


def heldout_path(settings: SFTSettings) -> str | None:
    """The local file of the test split that the held-out evaluation reads, or None (hub id, no such split)."""
    if settings.skip_prepare or not (settings.heldout_samples or settings.heldout_exact):
        return None
    if os.path.isfile(settings.dataset):
        return None  # one file is the training data itself; nothing held out
    path = os.path.join(settings.dataset, f"{settings.test_split}.jsonl")
    return path if os.path.isfile(path) else None


def evaluate_heldout_for_summary(model, tokenizer, settings: SFTSettings, path: str | None) -> dict | None:
    """:func:`opensloth.sft.eval.evaluate_heldout` with the run's settings, on every rank (each scores a share)."""
    if path is None:
        return None
    start = time.perf_counter()
    result = evaluate_heldout(model, tokenizer, path, n_loss=settings.heldout_samples,
                              n_exact=settings.heldout_exact, task=settings.heldout_task,
                              max_length=settings.max_seq_length)
    exact = "" if result["exact_match"] is None else f", exact-match {result['exact_match']:.0%} of {result['n_exact']}"
    loss = "" if result["loss"] is None else f"loss {result['loss']:.4f} on {result['n']} conversations"
    log_rank0(f"held-out {path}: {loss}{exact} ({time.perf_counter() - start:.1f}s; --heldout_samples 0 "
              "--heldout_exact 0 skip it)")
    return result


def make_sft_config(settings: SFTSettings, *, run_dir: str, per_device: int, world_size: int, backend: str,
                    dtype: str, has_eval: bool, dataset_kwargs: dict | None = None):
    """An ``SFTConfig`` for a run: the shared training arguments plus TRL's SFT data options.

    ``dataset_kwargs={"skip_prepare_dataset": True}`` when the data is already
    tokenized (dataset cache or ``precompute_dataset.py``).
    """
    from trl import SFTConfig

    return SFTConfig(
        **training_args_kwargs(settings, run_dir=run_dir, per_device=per_device, world_size=world_size,
                               backend=backend, dtype=dtype, has_eval=has_eval, warmup_steps=settings.warmup_steps),
        max_length=settings.max_seq_length,
        dataset_text_field="text",
        dataset_kwargs=dataset_kwargs,
        assistant_only_loss=settings.assistant_only_loss,
        packing=False,
        # Explicit, never None: Unsloth's SFTTrainer (GPU path, unsloth/trainer.py) auto-enables
        # padding-free when `padding_free` is None and it tokenizes raw data itself (clearing
        # `max_length` as TRL demands), but turns it off when handed tokenized rows ("dataset is
        # already tokenized"). The dataset cache's builder and readers would then disagree (seen on an
        # H200, docs/benchmarks.md), and 1 rank would not train like N. An explicit False stops the
        # auto choice (`_should_auto_padding_free` needs None); opensloth's batch patch does the packing.
        padding_free=False,
        dataset_num_proc=None,
    )


def build_sft_trainer(model, tokenizer, train_dataset, val_dataset, world_size: int, settings: SFTSettings, *,
                      run_dir: str, per_device: int, backend: str):
    """Create the SFTTrainer in use (Unsloth's when Unsloth is imported, else stock TRL).

    Tokenized data (``input_ids``: the cache or a precomputed folder) is
    handed to TRL with ``skip_prepare_dataset``.
    """
    import trl

    report = None
    if "input_ids" not in train_dataset.column_names and distributed_env().is_main:
        # Raw data: TRL will cut conversations longer than max_length; count them once (on rank 0,
        # or on the cache builder, whose count the cache hands to later launches).
        report = count_truncated(train_dataset, tokenizer, settings.max_seq_length)
    config = make_sft_config(settings, run_dir=run_dir, per_device=per_device, world_size=world_size,
                             backend=backend, dtype=model_dtype_name(model), has_eval=val_dataset is not None,
                             dataset_kwargs=sft_dataset_kwargs(train_dataset))
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        processing_class=tokenizer,
    )
    log_rank0(f"SFTTrainer class in use: {type(trainer).__module__}.{type(trainer).__qualname__}")
    check_trainer_patched(trainer, "get_batch_samples", BATCH_PATCH)  # the class Unsloth rebound, not a stale one
    if report is not None:
        setattr(trainer, DATA_REPORT, report)  # the dataset cache records it with the tokenized data
    return trainer
