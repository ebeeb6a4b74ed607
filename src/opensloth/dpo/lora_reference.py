"""The reference model of LoRA DPO: the same weights with the adapter switched off.

What TRL 1.15 does with a model that is already a ``PeftModel`` (Unsloth's
``get_peft_model`` returns one) and ``ref_model=None``:

- ``trainer.ref_model`` stays ``None``: no second copy of the base weights.
- It adds a second LoRA adapter named ``"ref"``, a copy of ``"default"``, and
  computes reference log-probs with ``"ref"`` active (``use_adapter``). That is
  right for *re-training* a pretrained adapter (the reference is the starting
  adapter), but for a freshly initialised adapter (``lora_B == 0``) ``"ref"``
  is an exact no-op: it costs a copy of the adapter weights and a LoRA forward
  in every reference pass, and it is saved with every checkpoint.

:func:`use_base_model_as_reference` handles that deliberately: it deletes a
``"ref"`` adapter that copies a zero-initialised ``"default"`` (TRL then falls
back to ``model.disable_adapter()``, i.e. the base model, which is the same
function bit for bit) and keeps it, with a log line, when the adapter was
pretrained. :func:`parameter_report` counts parameters and distinct storages
so tests and the benchmark can show that no second set of base weights exists.
"""

from __future__ import annotations

from opensloth.log import log_rank0

REF_ADAPTER = "ref"


def _peft_model(trainer_or_model):
    """The (unwrapped) model of a trainer, or the model itself."""
    accelerator = getattr(trainer_or_model, "accelerator", None)
    if accelerator is None:
        return trainer_or_model
    return accelerator.unwrap_model(trainer_or_model.model)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapter_is_identity(model, adapter: str = "default") -> bool:
    """True when every ``lora_B`` of ``adapter`` is exactly zero (LoRA adds nothing yet)."""
    found = False
    for name, param in model.named_parameters():
        if f".lora_B.{adapter}." in name or name.endswith(f".lora_B.{adapter}"):
            found = True
            if param.detach().abs().max().item() != 0.0:
                return False
    return found


def parameter_report(trainer_or_model) -> dict:
    """Parameter counts by role and the number of distinct tensor storages.

    Returns ``{"total", "base", "lora_default", "lora_ref", "trainable",
    "storages", "storage_elements", "ref_model"}``: ``storage_elements`` counts
    each underlying storage once (tied embeddings share one), ``ref_model`` is
    the trainer's separate reference model parameter count (0 when none).
    """
    model = _peft_model(trainer_or_model)
    counts = {"total": 0, "base": 0, "lora_default": 0, "lora_ref": 0, "trainable": 0}
    storages = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        n = param.numel()
        if ".lora_" in name and f".{REF_ADAPTER}." in name:
            counts["lora_ref"] += n
        elif ".lora_" in name:
            counts["lora_default"] += n
        else:
            counts["base"] += n
        counts["total"] += n
        if param.requires_grad:
            counts["trainable"] += n
        local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 shard: this rank's storage
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes() // max(local.element_size(), 1)
    for buf in model.buffers():
        storage = buf.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes() // max(buf.element_size(), 1))
    ref = getattr(trainer_or_model, "ref_model", None)
    counts["ref_model"] = 0 if ref is None else sum(p.numel() for p in ref.parameters())
    counts["storages"] = len(storages)
    counts["storage_elements"] = sum(storages.values())
    return counts


def use_base_model_as_reference(trainer) -> str:
    """Make the reference of a fresh LoRA adapter the base model (adapter disabled).

    Call after constructing the DPOTrainer, before ``train()``.

    Returns what was found: ``"not_peft"``, ``"no_ref_adapter"`` (reference is
    already the adapter-disabled model), ``"deleted_ref_adapter"`` (a copy of a
    zero-initialised adapter was removed) or ``"kept_ref_adapter"`` (the
    adapter was pretrained, so its starting copy is the correct reference).

    Raises ValueError when the trainer holds a separate ``ref_model`` next to
    a PEFT policy (a full second copy of the weights).
    """
    model = _peft_model(trainer)
    if not _is_peft(model):
        return "not_peft"
    if getattr(trainer, "ref_model", None) is not None:
        raise ValueError(
            "the DPOTrainer holds a separate ref_model next to a LoRA policy, i.e. a second full copy of "
            "the weights; pass ref_model=None so the reference is the policy with its adapter disabled"
        )
    if REF_ADAPTER not in model.peft_config:
        return "no_ref_adapter"
    if adapter_is_identity(model, "default"):
        model.delete_adapter(REF_ADAPTER)
        log_rank0("DPO reference: removed TRL's 'ref' adapter copy (adapter is fresh, lora_B == 0); "
                  "reference log-probs use the base model with the adapter disabled")
        return "deleted_ref_adapter"
    log_rank0("DPO reference: keeping TRL's 'ref' adapter (a frozen copy of the pretrained starting adapter); "
              "it is the correct reference when re-training an adapter")
    return "kept_ref_adapter"
