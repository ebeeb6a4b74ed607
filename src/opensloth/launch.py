"""Launch glue shared by every training entry point: setup, model loading, run dir, train and save.

The scripts under ``train_scripts/`` read top to bottom and call these
helpers, in this order::

    launch = setup_run(settings, data=...)           # checks, pre-flight, Unsloth first, ddp_patch(), run dir
    model, tokenizer = load_model_and_tokenizer(...) # base model + LoRA, same seed on every rank
    config = SFTConfig(**training_args_kwargs(...), ...)   # or DPOConfig: one builder for both
    train_and_save(trainer, model, tokenizer, launch.run_dir,
                   resume_from_checkpoint=launch.resume_from_checkpoint)   # complete checkpoints only

Nothing runs at import time and nothing heavy is imported until a function
needs it (Unsloth must be imported before transformers and TRL).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from opensloth.checkpoint import MARKER_FILE, checkpoint_dir, is_complete, remove_marker, resolve_resume, write_marker
from opensloth.config import setting
from opensloth.distributed import DistEnv, barrier, distributed_env, launcher_problem
from opensloth.errors import UserInputError, same_on_every_rank
from opensloth.log import log_rank0, warn_rank0
from opensloth.patches.ddp import ddp_patch
from opensloth.preflight import DataCheck, Plan, check_model_source, human_bytes, run_preflight, share_verdict
from opensloth.summary import RunSummary, loss_endpoints, next_commands_for, render, total_tokens

DEFAULT_MODEL = "data/tiny-qwen3"
DEFAULT_SFT_DATASET = "data/sft"
DEFAULT_PREFERENCE_DATASET = "data/preference"
BACKENDS = ("auto", "unsloth", "hf")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# transformers' SchedulerType values (TrainingArguments.lr_scheduler_type), listed here so that no settings
# module imports transformers.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
EVAL_STRATEGIES = ("steps", "epoch")
# Help texts of the optimizer settings SFTSettings and DPORunSettings share (TrainingArguments names and defaults).
MAX_GRAD_NORM_HELP = "clip the global gradient norm to this value each optimizer step (0: no clipping; TRL default)"
WEIGHT_DECAY_HELP = "AdamW weight decay (transformers leaves biases and norm weights undecayed; TRL default 0)"
LR_SCHEDULER_HELP = "learning-rate schedule after the warmup, a transformers SchedulerType name (TRL default linear)"
FSDP_HELP = ("shard parameters, gradients and optimizer state over the ranks with FSDP2 (torchrun, >= 2 "
             "processes): Unsloth's native FSDP2 on the unsloth backend (also on a gloo CPU mesh), the Trainer's "
             "FSDP2 on hf (CUDA); see TRAINING_README 'FSDP'")
MIXED_PRECISION_HELP = ("autocast: auto follows the weights dtype (bf16 weights -> bf16 autocast); bf16 / fp16 "
                        "autocast over float32 weights; no: none")


def _is_shipped(path: str, shipped: str) -> bool:
    """Whether ``path`` is the shipped folder ``shipped`` (``data/...``), seen from the working directory or
    from the checkout this package runs from (an editable install)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for candidate in (shipped, os.path.join(repo, shipped)):
        try:
            if os.path.isdir(path) and os.path.samefile(path, candidate):
                return True
        except OSError:
            continue
    return False


def is_embedded_model(model_name: str) -> bool:
    """Whether ``model_name`` is the shipped :data:`DEFAULT_MODEL` folder."""
    return _is_shipped(model_name, DEFAULT_MODEL)


def is_embedded_sft_data(dataset: str) -> bool:
    """Whether ``dataset`` is the shipped :data:`DEFAULT_SFT_DATASET` folder."""
    return _is_shipped(dataset, DEFAULT_SFT_DATASET)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA defaults of the original OpenSloth guide: q/k/v/o, r=8, alpha=16 (DPO, rollouts; SFT's own
    defaults are ``SFTSettings.lora``: all seven linear layers)."""

    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = setting(0.0, "dropout on the LoRA input")
    target_modules: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "o_proj"),
                                              "modules the adapter wraps")

    def __post_init__(self):
        for name in ("r", "alpha"):
            if getattr(self, name) < 1:
                raise UserInputError(f"lora.{name}={getattr(self, name)} must be an integer >= 1")
        if not self.target_modules:
            raise UserInputError("lora.target_modules must be a non-empty list of module names")


def check_optimizer_settings(settings) -> None:
    """Raise UserInputError for a negative ``max_grad_norm`` / ``weight_decay`` or an unknown schedule."""
    for name in ("max_grad_norm", "weight_decay"):
        value = getattr(settings, name)
        if not value >= 0:  # also NaN
            raise UserInputError(f"{name}={value} must be >= 0 (0 turns it off)")
    if settings.lr_scheduler_type not in LR_SCHEDULERS:
        raise UserInputError(f"lr_scheduler_type={settings.lr_scheduler_type!r} is not one of {LR_SCHEDULERS}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on", "native")


def check_fsdp(settings, env: DistEnv, backend: str) -> bool:
    """Decide whether this launch shards with FSDP2, before Unsloth is imported. Returns True if it does.

    ``--fsdp`` (or ``UNSLOTH_FSDP2=1`` / an ``accelerate launch`` FSDP config in
    the environment) needs several ranks. On the unsloth backend it sets
    ``UNSLOTH_FSDP2=1`` so that Unsloth shards the model inside
    ``Trainer.__init__``; Unsloth's model code imports its GPU kernels, so the
    ``triton`` package must be importable (it imports on CPU machines too).

    Raises:
        UserInputError: one process, or the unsloth backend without triton.
    """
    requested = (bool(getattr(settings, "fsdp", False)) or _env_true("ACCELERATE_USE_FSDP")
                 or (backend == "unsloth" and _env_true("UNSLOTH_FSDP2")))
    if not requested:
        return False
    if env.world_size < 2:
        raise UserInputError("--fsdp shards over ranks: launch with torchrun --nproc_per_node >= 2 (or accelerate "
                             "launch --config_file examples/fsdp.yaml); one process trains unsharded")
    if backend == "unsloth":
        if importlib.util.find_spec("triton") is None:
            raise UserInputError("--fsdp on the unsloth backend uses Unsloth's native FSDP2, whose model code imports "
                                 "triton; pip install triton (it imports on CPU too), or use --backend hf on GPUs")
        if not _env_true("ACCELERATE_USE_FSDP"):
            os.environ["UNSLOTH_FSDP2"] = "1"  # read by `import unsloth` and its Trainer.__init__ wrapper
    return True


def fsdp_trainer_kwargs(settings, backend: str) -> dict:
    """``TrainingArguments`` keywords of the Trainer's own FSDP2 (hf backend with ``--fsdp``), else ``{}``.

    Unsloth's native FSDP2 needs none (it shards inside ``Trainer.__init__``),
    and an ``accelerate launch`` FSDP config brings its own plugin.
    """
    if backend != "hf":
        return {}
    if _env_true("ACCELERATE_USE_FSDP"):  # the accelerate config's plugin (and activation checkpointing) apply
        return {"gradient_checkpointing": False}
    if not getattr(settings, "fsdp", False):
        return {}
    return dict(
        fsdp="full_shard auto_wrap",
        fsdp_config={"fsdp_version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                     "activation_checkpointing": not settings.no_gradient_checkpointing,
                     "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False},
        gradient_checkpointing=False,  # FSDP2 checkpoints activations itself (activation_checkpointing)
    )


def model_is_sharded(model) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors): saving is then a collective."""
    if not hasattr(model, "parameters"):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def resolve_backend(name: str) -> str:
    """Map ``auto|unsloth|hf`` to the backend that will run.

    ``auto`` picks Unsloth when it is installed. Asking for ``unsloth`` when it
    is not installed is a user error.
    """
    if name not in BACKENDS:
        raise UserInputError(f"--backend {name!r} is not one of {BACKENDS}")
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if name == "auto":
        return "unsloth" if has_unsloth else "hf"
    if name == "unsloth" and not has_unsloth:
        raise UserInputError(
            "--backend unsloth but the unsloth package is not installed; run scripts/setup_env.sh "
            "(installs it without CUDA extras) or use --backend hf"
        )
    return name


def import_backend(backend: str) -> None:
    """Import Unsloth first when it is the backend, so it can patch transformers/TRL."""
    if backend == "unsloth":
        import unsloth  # noqa: F401


def resolve_per_device_batch(
    per_device_batch_size: int | None, global_batch_size: int | None, grad_accum: int, world_size: int
) -> int:
    """Per-device batch size from the flags; ``global = per_device * grad_accum * world_size``."""
    if grad_accum < 1:
        raise UserInputError(f"--grad_accum {grad_accum} must be >= 1")
    if global_batch_size is not None:
        if global_batch_size < 1:
            raise UserInputError(f"--global_batch_size {global_batch_size} must be >= 1")
        denom = grad_accum * world_size
        if global_batch_size % denom:
            raise UserInputError(
                f"--global_batch_size {global_batch_size} is not divisible by grad_accum x world_size = "
                f"{grad_accum} x {world_size}; pick a multiple of {denom}"
            )
        derived = global_batch_size // denom
        if per_device_batch_size is not None and per_device_batch_size != derived:
            raise UserInputError(
                f"--per_device_batch_size {per_device_batch_size} contradicts --global_batch_size "
                f"{global_batch_size} (which gives {derived} on {world_size} rank(s)); pass only one"
            )
        return derived
    if per_device_batch_size is None:
        return 8
    if per_device_batch_size < 1:
        raise UserInputError(
            f"--per_device_batch_size {per_device_batch_size} must be >= 1 (or pass --global_batch_size)"
        )
    return per_device_batch_size


NO_PATCHES_SUFFIX = "_nopatches"
# What a run leaves in its folder that a new run would overwrite: the adapter and the trainer state.
RUN_OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json")


def run_dir_for(output_dir: str, experiment_name: str, world_size: int, no_patches: bool = False) -> str:
    """``<output_dir>/<experiment_name>_ws<world_size>[_nopatches]``.

    Runs on different world sizes never share a folder, and neither do the
    patched and unpatched runs of one experiment (the original OpenSloth's
    ``_nopatches`` suffix).
    """
    return os.path.join(output_dir, f"{experiment_name}_ws{world_size}{NO_PATCHES_SUFFIX if no_patches else ''}")


def run_outputs(run_dir: str) -> list[str]:
    """The adapter, trainer state and ``checkpoint-*`` folders already in ``run_dir`` (sorted names)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(name for name in os.listdir(run_dir)
                  if name in RUN_OUTPUT_FILES or (name.startswith("checkpoint-")
                                                  and os.path.isdir(os.path.join(run_dir, name))))


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def claim_run_dir(output_dir: str, experiment_name: str, world_size: int, *, no_patches: bool = False,
                  resume_from_checkpoint: str | None = None) -> str:
    """The run directory of this launch, refusing to write over another run's adapter or state.

    The folder is :func:`run_dir_for`'s. It may hold outputs of an earlier
    run only when this launch resumes that run: ``resume_from_checkpoint`` is
    ``"last"`` or a checkpoint inside the folder. Every rank calls this before
    the process group exists, so no rank has written anything yet and all of
    them decide alike.

    Raises:
        UserInputError: the folder already holds an adapter, a trainer state or
            checkpoints, and this launch does not resume from it.
    """
    run_dir = run_dir_for(output_dir, experiment_name, world_size, no_patches)
    held = run_outputs(run_dir)
    if not held:
        return run_dir
    if resume_from_checkpoint == "last" or (resume_from_checkpoint and _inside(resume_from_checkpoint, run_dir)):
        return run_dir
    shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    raise UserInputError(
        f"run dir {run_dir} already holds a run ({shown}); a new run would overwrite it. Pass another "
        f"--experiment_name or --output_dir, --resume_from_checkpoint last to continue that run, or delete the folder"
    )


def torch_dtype(name: str, backend: str):
    import torch

    if name not in DTYPES:
        raise UserInputError(f"--dtype {name!r} is not one of {DTYPES}")
    if name == "auto":
        return None if backend == "unsloth" else torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(
    model_name: str,
    *,
    backend: str,
    max_seq_length: int,
    device,
    seed: int,
    dtype: str = "auto",
    lora: LoraSettings = LoraSettings(),
    gradient_checkpointing: bool = True,
    load_in_4bit: bool = False,
    full_finetune: bool = False,
):
    """Load a causal LM and its tokenizer and wrap the model with LoRA adapters (or train every weight).

    Unsloth: ``FastLanguageModel.from_pretrained(..., device_map={"": device})``
    then ``get_peft_model(..., use_gradient_checkpointing="unsloth")``.
    hf: ``AutoModelForCausalLM`` + ``peft.get_peft_model``; gradient
    checkpointing is left to the trainer config (``gradient_checkpointing``).
    ``full_finetune``: no adapters; every weight trains (Unsloth:
    ``from_pretrained(full_finetuning=True)``).

    The seed is set right before the adapters are created, so the LoRA
    initialisation is identical on every rank and every world size.
    """
    from transformers import set_seed

    check_model_source(model_name)
    torch_dt = torch_dtype(dtype, backend)
    device_str = str(device)
    try:
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=model_name,
                max_seq_length=max_seq_length,
                dtype=torch_dt,
                load_in_4bit=load_in_4bit,
                device_map={"": device_str},
                **({"full_finetuning": True} if full_finetune else {}),
            )
            set_seed(seed)
            model = model if full_finetune else FastLanguageModel.get_peft_model(
                model,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                bias="none",
                use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
                random_state=seed,
            )
        else:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_name)
            quant = {}
            if load_in_4bit:
                from transformers import BitsAndBytesConfig

                quant["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
            model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dt, **quant)
            if not load_in_4bit:
                model = model.to(device)
            set_seed(seed)
            if not full_finetune:
                config = LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    bias="none",
                    task_type="CAUSAL_LM",
                )
                model = get_peft_model(model, config)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"could not load --model_name {model_name!r}: {first}. Without network access only local "
            "folders and models already in the Hugging Face cache load; pass a local folder such as "
            "data/tiny-qwen3"
        ) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # safetensors' own error type (a corrupt file)
            raise
        raise UserInputError(f"could not read the weights of --model_name {model_name!r}: {exc}; download or copy "
                             "the model again") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log_rank0(
        f"loaded {model_name} with backend={backend} dtype={next(model.parameters()).dtype} "
        f"trainable={sum(p.numel() for p in model.parameters() if p.requires_grad):,} params"
    )
    return model, tokenizer


def load_frozen_model(model_name: str, *, device, dtype: str, backend: str):
    """A frozen copy of a causal LM (DPO's separate reference): eval mode, no gradients, on ``device``.

    Loaded with transformers on every backend: it only runs forward passes.
    ``dtype`` follows :func:`torch_dtype` (``auto``: float32 for hf; the
    policy's dtype name can be passed to match it).
    """
    from transformers import AutoModelForCausalLM

    check_model_source(model_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype(dtype, "hf"))
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"could not load the reference model {model_name!r}: {first}; pass a local folder "
                             "where there is no network access") from exc
    model = model.to(device).eval()
    model.requires_grad_(False)
    log_rank0(f"loaded frozen reference {model_name} dtype={next(model.parameters()).dtype} "
              f"params={sum(p.numel() for p in model.parameters()):,}")
    return model


def model_dtype_name(model) -> str:
    """``"float32"``, ``"bfloat16"``, ...: the dtype the model's weights were loaded in."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Launch:
    """What the setup of a training process decided.

    Attributes:
        env: the validated torchrun environment.
        backend: ``"unsloth"`` or ``"hf"`` (``auto`` resolved).
        device: this rank's ``torch.device`` (from :func:`ddp_patch`).
        run_dir: ``<output_dir>/<experiment_name>_ws<world_size>[_nopatches]`` (training runs only;
            :func:`claim_run_dir`).
        per_device: samples (or pairs) per micro-batch per rank (training runs only).
        fsdp: the model is sharded with FSDP2 (:func:`check_fsdp`).
        resume_from_checkpoint: the checkpoint folder to resume from (``last``
            resolved by global rank 0 during the pre-flight), or None.
    """

    env: DistEnv
    backend: str
    device: Any
    run_dir: str | None = None
    per_device: int | None = None
    fsdp: bool = False
    resume_from_checkpoint: str | None = None

    @property
    def world_size(self) -> int:
        return self.env.world_size


def setup_backend(backend: str = "auto") -> Launch:
    """Resolve the backend, import Unsloth first when it is the backend, then :func:`ddp_patch`.

    Call before anything imports transformers or TRL. Raises UserInputError
    (bad torchrun variables, ``--backend unsloth`` without Unsloth) before any
    heavy import.
    """
    env = distributed_env()
    backend = resolve_backend(backend)
    import_backend(backend)
    device = ddp_patch()
    return Launch(env=env, backend=backend, device=device)


def setup_run(settings, unit: str = "samples", *, data: Sequence[DataCheck] = (),
              resume_files: Sequence[str] = (), lora: LoraSettings | None = LoraSettings()) -> Launch:
    """:func:`setup_backend` for a training run, between the checks that need no model.

    ``settings`` has ``model_name``, ``backend``, ``per_device_batch_size``,
    ``global_batch_size``, ``grad_accum``, ``output_dir``, ``experiment_name``
    and optionally ``resume_from_checkpoint``, ``no_patches`` and ``fsdp``
    (:class:`opensloth.sft.SFTSettings`, :class:`opensloth.dpo.DPORunSettings`).
    ``data`` lists the splits the run reads, ``resume_files`` what a checkpoint
    must hold besides the Trainer's files, ``lora`` the adapter (None: full
    fine-tune) for the checkpoint size.

    Order: the launcher, the model path, the batch arithmetic, the FSDP checks
    and the run dir (:func:`claim_run_dir`) on every rank (a second, nothing
    imported); the pre-flight of :mod:`opensloth.preflight` (model files, data,
    checkpoint, output folder) on local rank 0 of each node, still before
    Unsloth and torch are imported; then Unsloth, ``ddp_patch()`` and the
    process group, over which the verdict is shared so that every rank stops
    on the same error (printed once, by rank 0).

    Raises:
        UserInputError: marked ``every_rank``; the first problem found.
    """
    env = distributed_env()
    with same_on_every_rank():
        problem = launcher_problem()
        if problem:
            raise UserInputError(problem)
        check_model_source(settings.model_name)
        backend = resolve_backend(settings.backend)
        per_device = resolve_per_device_batch(settings.per_device_batch_size, settings.global_batch_size,
                                              settings.grad_accum, env.world_size)
        fsdp = check_fsdp(settings, env, backend)
        # Before the process group exists: no rank has written to the run dir yet, so all ranks agree.
        run_dir = claim_run_dir(settings.output_dir, settings.experiment_name, env.world_size,
                                no_patches=getattr(settings, "no_patches", False),
                                resume_from_checkpoint=getattr(settings, "resume_from_checkpoint", None))
    plan = Plan(model_name=settings.model_name, run_dir=run_dir, data=tuple(data),
                resume_from_checkpoint=getattr(settings, "resume_from_checkpoint", None),
                resume_files=tuple(resume_files), lora_r=lora.r if lora is not None else None,
                lora_targets=tuple(lora.target_modules) if lora is not None else ())
    verdict = error = None
    if env.is_local_main:
        try:
            verdict = run_preflight(plan)
        except UserInputError as exc:
            if not env.is_distributed:
                exc.every_rank = True
                raise
            error = exc  # raised on every rank below, once they can talk
    launch = setup_backend(settings.backend)
    with same_on_every_rank():
        if fsdp and launch.backend == "hf" and launch.device.type == "cpu":
            raise UserInputError("--fsdp --backend hf uses the Trainer's FSDP2 (accelerate), which does not run on a "
                                 "CPU launch (accelerate would train plain DDP); on CPU use --backend unsloth "
                                 "(Unsloth's native FSDP2 shards on a gloo mesh), on GPUs keep --backend hf")
    verdict = share_verdict(env, verdict, error)
    for note in verdict.notes:
        warn_rank0(note)
    resume = verdict.resume_from_checkpoint
    if fsdp:
        log_rank0(f"FSDP2: {'Unsloth native (UNSLOTH_FSDP2=1)' if launch.backend == 'unsloth' else 'the Trainer'}"
                  f" shards the model over {env.world_size} ranks")
    log_rank0(
        f"effective global batch = {per_device} {unit} per device x {settings.grad_accum} accum x "
        f"{env.world_size} rank(s) = {per_device * settings.grad_accum * env.world_size}; run dir {run_dir}"
        + (f"; resuming from {resume}" if resume else "")
    )
    return Launch(env=env, backend=launch.backend, device=launch.device, run_dir=run_dir, per_device=per_device,
                  fsdp=fsdp, resume_from_checkpoint=resume)


# --------------------------------------------------------------------------- trainer arguments, train, save


def training_args_kwargs(settings, *, run_dir: str, per_device: int, world_size: int, backend: str, dtype: str,
                         has_eval: bool, warmup_steps: int) -> dict:
    """The ``TrainingArguments`` keywords SFT and DPO share: fixed seeds, TensorBoard, optimizer and schedule.

    ``settings`` has ``eval_batch_size``, ``grad_accum``, ``learning_rate``,
    ``num_epochs``, ``max_steps``, ``logging_steps``, ``eval_steps``,
    ``save_steps``, ``seed`` and ``no_gradient_checkpointing``; optionally
    ``max_grad_norm``, ``weight_decay``, ``lr_scheduler_type``,
    ``mixed_precision`` and ``eval_strategy`` (TRL's defaults when absent).
    ``SFTConfig`` and ``DPOConfig`` add their own keys to the result.
    """
    amp = getattr(settings, "mixed_precision", "auto")
    if amp == "auto":
        amp = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")
    eval_strategy = getattr(settings, "eval_strategy", "steps") if has_eval else "no"
    return dict(
        output_dir=run_dir,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=settings.eval_batch_size or per_device,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=getattr(settings, "lr_scheduler_type", "linear"),
        warmup_steps=warmup_steps,
        num_train_epochs=settings.num_epochs,
        max_steps=settings.max_steps,
        logging_steps=settings.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=(settings.eval_steps or settings.logging_steps * 5) if eval_strategy == "steps" else None,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=amp == "bf16",
        fp16=amp == "fp16",
        # Unsloth applies its own checkpointing in get_peft_model.
        gradient_checkpointing=not settings.no_gradient_checkpointing and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=["tensorboard"],
        ddp_find_unused_parameters=False if world_size > 1 else None,
        dataloader_num_workers=0,
        optim="adamw_torch",
        weight_decay=getattr(settings, "weight_decay", 0.0),
        max_grad_norm=getattr(settings, "max_grad_norm", 1.0),
    ) | fsdp_trainer_kwargs(settings, backend)


def add_checkpoint_marker(trainer) -> None:
    """Make every checkpoint of ``trainer`` carry :data:`opensloth.checkpoint.MARKER_FILE`, written last.

    The callback goes last in the list (after the dynamic-beta state is
    written); its ``on_save`` waits for every rank (each writes its RNG state)
    before global rank 0 writes the marker atomically. Before a step's
    checkpoint is written (again), its old marker is removed.
    """
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and args.should_save:
                remove_marker(checkpoint_dir(args.output_dir, state.global_step))

        def on_save(self, args, state, control, **kwargs):
            barrier()
            if args.should_save:
                write_marker(checkpoint_dir(args.output_dir, state.global_step), state.global_step, args.world_size)

    for callback in list(trainer.callback_handler.callbacks):
        if type(callback).__name__ == CheckpointMarker.__name__:
            trainer.remove_callback(callback)
    trainer.add_callback(CheckpointMarker())


_WRITE_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS)


def _write_failure(exc: BaseException) -> str | None:
    """The reason when ``exc`` means a file could not be written (full disk, quota, read-only), else None."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter failed" in text):
        return " ".join(text.split())[:200]  # torch.save's zip writer on a full disk
    return None


@contextlib.contextmanager
def _writes_reported(trainer, run_dir: str):
    """Turn a failed checkpoint / adapter write into one line that says how to go on."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        step = trainer.state.global_step
        folder = checkpoint_dir(run_dir, step)
        where = folder if os.path.isdir(folder) and not is_complete(folder) else run_dir
        try:
            free = f"; {human_bytes(shutil.disk_usage(where).free)} free there"
        except OSError:
            free = ""
        raise UserInputError(
            f"could not write {where} at step {step} ({reason}{free}). A checkpoint cut short has no {MARKER_FILE}, "
            "so '--resume_from_checkpoint last' skips it: free space, then rerun with --resume_from_checkpoint last"
        ) from exc


def train_and_save(trainer, model, tokenizer, run_dir: str, *, resume_from_checkpoint=None,
                   save_extra: Callable[[str], Any] | None = None) -> float:
    """Train, save the trainer state, and on rank 0 the adapter, the tokenizer and any side files.

    Args:
        trainer: a built trainer.
        model, tokenizer: what ``save_pretrained`` writes to ``run_dir``
            (the PEFT model: only the adapter is saved).
        resume_from_checkpoint: a checkpoint folder, ``"last"`` (the last
            complete checkpoint of the run dir; see :mod:`opensloth.checkpoint`)
            or None. The scripts pass the folder the pre-flight resolved.
        save_extra: called with ``run_dir`` on rank 0 after the adapter is
            saved (e.g. the dynamic-beta controller state).

    Returns:
        The seconds ``trainer.train`` took.

    Raises:
        UserInputError: the checkpoint is missing or incomplete, or a checkpoint
            or the adapter could not be written (full disk, read-only folder).
    """
    resume, note = resolve_resume(resume_from_checkpoint, run_dir)
    if note:
        warn_rank0(note)
    add_checkpoint_marker(trainer)
    with _writes_reported(trainer, run_dir):
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        elapsed = time.perf_counter() - start
        trainer.save_state()
        sharded = model_is_sharded(getattr(trainer, "model", model))
        if sharded:  # FSDP2: gathering the full weights is a collective; the Trainer's save_model does it
            trainer.save_model(run_dir)
        if trainer.is_world_process_zero():
            if not sharded:
                model.save_pretrained(run_dir)
            tokenizer.save_pretrained(run_dir)
            if save_extra is not None:
                save_extra(run_dir)
    barrier()  # no rank moves on (merges, evaluates, exits) before rank 0 has written the adapter
    return elapsed


def finish_run(trainer, launch: Launch, *, task: str, seconds: float, unit: str = "samples", adapter: bool = True,
               heldout: tuple[dict | None, dict | None] = (None, None), heldout_what: str = "",
               lines: Sequence[tuple[str, str]] = (), example_prompt: str | None = None) -> RunSummary:
    """The end-of-run summary (:mod:`opensloth.summary`), printed by global rank 0 and returned on every rank.

    Args:
        trainer: the trained trainer (its ``log_history`` gives the losses and token counts).
        launch: what :func:`setup_run` decided (run dir, world size, micro-batch).
        task: ``"SFT"`` or ``"DPO"`` (the header).
        seconds: what :func:`train_and_save` returned.
        unit: ``"samples"`` or ``"pairs"``.
        adapter: the run dir holds a LoRA adapter (else a full model).
        heldout: the held-out evaluation before and after training
            (:func:`opensloth.sft.eval.evaluate_heldout` results), or Nones.
        heldout_what: what was evaluated ("200 conversations of data/sft/test.jsonl").
        lines: extra rows, e.g. ``("final beta", "0.093")``.
        example_prompt: the prompt of the suggested chat command.
    """
    history = list(trainer.state.log_history)
    first, last, window = loss_endpoints(history)
    steps = int(trainer.state.global_step)
    args = trainer.args
    per_step = launch.per_device * args.gradient_accumulation_steps * launch.world_size if launch.per_device else None
    before, after = heldout
    rows = list(lines)
    if before and after and before.get("exact_match") is not None and after.get("exact_match") is not None:
        what = f"{after['n_exact']} held-out prompts" + (f" of task {after['task']}" if after.get("task") else "")
        rows.insert(0, ("exact match", f"{before['exact_match']:.0%} -> {after['exact_match']:.0%} ({what})"))
    tb_dir = getattr(args, "logging_dir", None) or os.path.join(launch.run_dir, "runs")
    has_tb = os.path.isdir(tb_dir) or "tensorboard" in (getattr(args, "report_to", None) or [])
    summary = RunSummary(
        task=task, run_dir=launch.run_dir, world_size=launch.world_size, steps=steps, seconds=seconds, unit=unit,
        samples=steps * per_step if per_step else None, tokens=total_tokens(history),
        first_loss=first, last_loss=last, last_loss_window=window,
        eval_before=(before or {}).get("loss"), eval_after=(after or {}).get("loss"), eval_what=heldout_what,
        lines=rows, saved="LoRA adapter, PEFT format" if adapter else "full model, safetensors",
        tensorboard_dir=tb_dir if has_tb else None,
        next_commands=next_commands_for(launch.run_dir, adapter=adapter, has_tensorboard=has_tb,
                                        prompt=example_prompt),
    )
    if launch.env.is_main:
        print(render(summary), flush=True)
    return summary


def read_log_history(run_dir: str) -> list[dict]:
    """The ``log_history`` of ``<run_dir>/trainer_state.json`` (per-step losses)."""
    with open(os.path.join(run_dir, "trainer_state.json")) as fh:
        return json.load(fh)["log_history"]


def step_losses(run_dir: str, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` for training ``loss`` (or ``eval_loss``) from a run directory."""
    return {rec["step"]: rec[key] for rec in read_log_history(run_dir) if key in rec}
