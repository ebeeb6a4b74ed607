"""Launch glue shared by the training scripts: backend choice, model loading, batch arithmetic.

The scripts under ``train_scripts/`` read top to bottom and call these
helpers; nothing here runs at import time and nothing heavy is imported until
a function needs it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from opensloth.errors import UserInputError
from opensloth.log import log_rank0

DEFAULT_MODEL = "data/tiny-qwen3"
DEFAULT_SFT_DATASET = "data/sft"
DEFAULT_PREFERENCE_DATASET = "data/preference"
BACKENDS = ("auto", "unsloth", "hf")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA defaults of the original OpenSloth guide: q/k/v/o, r=8, alpha=16."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))


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


def run_dir_for(output_dir: str, experiment_name: str, world_size: int) -> str:
    """``<output_dir>/<experiment_name>_ws<world_size>``: runs on different world sizes never collide."""
    return os.path.join(output_dir, f"{experiment_name}_ws{world_size}")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def check_model_source(model_name: str) -> str:
    """Validate ``--model_name``: an existing local folder, or a hub id.

    Returns ``"local"`` or ``"hub"``; raises UserInputError for a missing local path.
    """
    if os.path.isdir(model_name):
        if not os.path.exists(os.path.join(model_name, "config.json")):
            raise UserInputError(
                f"--model_name {model_name!r} is a folder without config.json; pass a folder written by "
                "save_pretrained (e.g. data/tiny-qwen3) or a hub id"
            )
        return "local"
    if _looks_like_path(model_name) or os.path.isfile(model_name):
        raise UserInputError(
            f"--model_name {model_name!r} does not exist; pass a local model folder (e.g. data/tiny-qwen3) "
            "or a hub id like Qwen/Qwen3-0.6B"
        )
    return "hub"


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
):
    """Load a causal LM and its tokenizer and wrap the model with LoRA adapters.

    Unsloth: ``FastLanguageModel.from_pretrained(..., device_map={"": device})``
    then ``get_peft_model(..., use_gradient_checkpointing="unsloth")``.
    hf: ``AutoModelForCausalLM`` + ``peft.get_peft_model``; gradient
    checkpointing is left to the trainer config (``gradient_checkpointing``).

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
            )
            set_seed(seed)
            model = FastLanguageModel.get_peft_model(
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
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log_rank0(
        f"loaded {model_name} with backend={backend} dtype={next(model.parameters()).dtype} "
        f"trainable={sum(p.numel() for p in model.parameters() if p.requires_grad):,} params"
    )
    return model, tokenizer


def read_log_history(run_dir: str) -> list[dict]:
    """The ``log_history`` of ``<run_dir>/trainer_state.json`` (per-step losses)."""
    import json

    with open(os.path.join(run_dir, "trainer_state.json")) as fh:
        return json.load(fh)["log_history"]


def step_losses(run_dir: str, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` for training ``loss`` (or ``eval_loss``) from a run directory."""
    return {rec["step"]: rec[key] for rec in read_log_history(run_dir) if key in rec}
