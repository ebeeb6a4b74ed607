"""Load the policy that generates: a model folder, optionally with a LoRA adapter on top.

The policy is built the way the trainers build it
(:func:`opensloth.launch.load_model_and_tokenizer`: base weights plus a
fresh LoRA adapter with the project's LoRA settings) and then, when an
adapter checkpoint is given, the adapter's weights are loaded into that fresh
adapter. So the object that generates is the object DPO then trains, on the
Unsloth and on the transformers + PEFT backend alike.
"""

from __future__ import annotations

import json
import os

from opensloth.errors import UserInputError
from opensloth.launch import LoraSettings, load_model_and_tokenizer

ADAPTER_CONFIG = "adapter_config.json"


def describe_checkpoint(path: str, flag: str = "--model", allow_hub: bool = True) -> tuple[str, str, str | None]:
    """What a checkpoint folder holds: ``("full", path, None)`` or ``("adapter", base, path)``.

    With ``allow_hub``, a name of the form ``owner/name`` that is not a local
    path is taken as a hub id of a full model.

    Raises:
        UserInputError: a local path that does not exist, or a folder with
            neither ``config.json`` nor ``adapter_config.json``.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            with open(os.path.join(path, ADAPTER_CONFIG)) as fh:
                base = json.load(fh).get("base_model_name_or_path")
            if not base:
                raise UserInputError(f"{flag} {path!r}: {ADAPTER_CONFIG} names no base_model_name_or_path")
            return "adapter", base, path
        if os.path.isfile(os.path.join(path, "config.json")):
            return "full", path, None
        raise UserInputError(f"{flag} {path!r} holds neither config.json (a model) nor {ADAPTER_CONFIG} "
                             "(a LoRA adapter); pass a folder written by save_pretrained")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path)
    if looks_local or not allow_hub:
        raise UserInputError(f"{flag} {path!r} does not exist; pass a model or LoRA adapter folder "
                             "(e.g. the run directory of train_scripts/train_configurable.py)")
    return "full", path, None


def load_adapter_weights(model, adapter_dir: str) -> None:
    """Load the LoRA weights saved in ``adapter_dir`` into ``model``'s ``default`` adapter.

    Raises:
        UserInputError: the adapter's rank, alpha or target modules differ
            from the model's adapter, or its weights do not fit it.
    """
    from peft import set_peft_model_state_dict

    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as fh:
        saved = json.load(fh)
    current = model.peft_config["default"]
    mismatched = []
    if saved.get("r") != current.r:
        mismatched.append(f"r {saved.get('r')} vs {current.r}")
    if saved.get("lora_alpha") != current.lora_alpha:
        mismatched.append(f"lora_alpha {saved.get('lora_alpha')} vs {current.lora_alpha}")
    if set(saved.get("target_modules") or []) != set(current.target_modules or []):
        mismatched.append(f"target_modules {sorted(saved.get('target_modules') or [])} vs "
                          f"{sorted(current.target_modules or [])}")
    if mismatched:
        raise UserInputError(f"adapter {adapter_dir!r} does not match the LoRA settings of this run "
                             f"({'; '.join(mismatched)})")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        import torch

        legacy = os.path.join(adapter_dir, "adapter_model.bin")
        if not os.path.isfile(legacy):
            raise UserInputError(f"adapter {adapter_dir!r} has no adapter_model.safetensors")
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if ".lora_" in k and ".default" in k]
    if unexpected or missing:
        raise UserInputError(f"adapter {adapter_dir!r} does not fit the model: unexpected keys {unexpected[:3]}, "
                             f"missing LoRA keys {missing[:3]}")


def load_policy(model_path: str, *, adapter: str | None, backend: str, device, seed: int, dtype: str = "auto",
                max_seq_length: int = 2048, gradient_checkpointing: bool = True, lora=None):
    """The trainable policy: ``model_path`` + LoRA, with ``adapter``'s weights when given.

    Args:
        lora: :class:`opensloth.launch.LoraSettings` (default: the project's q/k/v/o, r=8, alpha=16).

    Returns ``(model, tokenizer)``.
    """

    model, tokenizer = load_model_and_tokenizer(
        model_path, backend=backend, max_seq_length=max_seq_length, device=device, seed=seed, dtype=dtype,
        lora=lora or LoraSettings(), gradient_checkpointing=gradient_checkpointing,
    )
    if adapter is not None:
        load_adapter_weights(model, adapter)
    return model, tokenizer
