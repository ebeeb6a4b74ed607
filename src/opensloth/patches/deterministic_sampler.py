"""``patch_trainer_deterministic_sampler()``: the SFTTrainer in use reads its data in dataset order.

The original OpenSloth shipped this as a debugging aid (compare runs sample by
sample): it replaced ``trl.SFTTrainer`` by a subclass whose train and eval
samplers are ``SequentialSampler``. This version swaps the two sampler
methods on the class in use instead (``trl.SFTTrainer`` at call time, which
Unsloth rebinds), so a script that imported ``SFTTrainer`` before the call is
covered too, and a second call changes nothing.

It turns shuffling off: every epoch visits the training set in the same order.
Under torchrun, accelerate still deals the sequential batches out to the
ranks (``BatchSamplerShard``), so each rank sees different samples.
transformers >= 5 offers the same without a patch:
``SFTConfig(train_sampling_strategy="sequential")`` (train only).
"""

from __future__ import annotations

from opensloth.log import warn_rank0
from opensloth.patches.registry import record_patch, require_attr, swap_method, unpatch

__all__ = ["PATCH_NAME", "WRITTEN_FOR", "patch_trainer_deterministic_sampler",
           "unpatch_trainer_deterministic_sampler"]

PATCH_NAME = "trainer_deterministic_sampler"
WRITTEN_FOR = "transformers 5.17.0 (Trainer._get_train_sampler/_get_eval_sampler), trl 1.15.0"
_METHODS = ("_get_train_sampler", "_get_eval_sampler")


def _sequential(original, default_attr: str):
    def sampler(self, dataset=None, *args, **kwargs):
        from torch.utils.data import SequentialSampler

        from transformers.trainer_utils import has_length

        data = getattr(self, default_attr) if dataset is None else dataset
        if data is None or not has_length(data):  # iterable datasets have no order to fix
            return original(self, dataset, *args, **kwargs)
        return SequentialSampler(data)

    return sampler


def _trainer_class(trainer_cls):
    if trainer_cls is not None:
        return trainer_cls
    import trl

    return require_attr(trl, "SFTTrainer", PATCH_NAME, WRITTEN_FOR)


def patch_trainer_deterministic_sampler(trainer_cls: type | None = None) -> type:
    """Make the SFTTrainer in use sample train and eval data sequentially (no shuffling).

    Call it after ``import unsloth`` and before building the trainer.
    Idempotent; listed by ``opensloth.patches.applied_patches()``.

    Args:
        trainer_cls: the class to patch; default ``trl.SFTTrainer`` as bound now.

    Returns:
        The patched class.

    Raises:
        PatchTargetError: the class has no ``_get_train_sampler`` or
            ``_get_eval_sampler`` (the installed transformers changed).
    """
    trainer_cls = _trainer_class(trainer_cls)
    for attr in _METHODS:  # check both targets before swapping either
        require_attr(trainer_cls, attr, PATCH_NAME, WRITTEN_FOR)
    description = "SequentialSampler for train and eval data: no shuffling (debugging aid)"
    swapped = False
    for attr, default in zip(_METHODS, ("train_dataset", "eval_dataset")):
        swapped |= swap_method(
            trainer_cls, attr, lambda original, default=default: _sequential(original, default),
            name=PATCH_NAME, written_for=WRITTEN_FOR, description=description,
        )
    # One record for the pair (swap_method recorded each method under the same name).
    record_patch(PATCH_NAME, f"{trainer_cls.__module__}.{trainer_cls.__qualname__}.{{{','.join(_METHODS)}}}",
                 WRITTEN_FOR, description)
    if swapped:
        warn_rank0(
            f"patch_trainer_deterministic_sampler: {trainer_cls.__module__}.{trainer_cls.__qualname__} now reads "
            "train and eval data in dataset order; shuffling is off for every epoch (a debugging aid, not for "
            "real training)"
        )
    return trainer_cls


def unpatch_trainer_deterministic_sampler(trainer_cls: type | None = None) -> bool:
    """Restore the shuffling samplers (tests, or to turn the patch off in-process)."""
    trainer_cls = _trainer_class(trainer_cls)
    restored = [unpatch(trainer_cls, attr, PATCH_NAME) for attr in _METHODS]
    return any(restored)
