"""Living beside Unsloth's own multi-GPU code on its GPU path (written for Unsloth 2026.10.9).

Unsloth 2026.10 ships pieces that overlap opensloth's patches. What each side
does, and who acts when both are on:

============================================  ==========================================  =========================
Unsloth 2026.10.9 (GPU path)                  opensloth                                   when both are on
============================================  ==========================================  =========================
``patch_gradient_accumulation_fix`` (run by   ``trainer_loss_scale_out_of_place``         the same fix; the outer
``FastLanguageModel.from_pretrained``)        (``ddp_patch``)                             wrapper switches the inner
rewrites ``Trainer.compute_loss`` with                                                    one's scaling off, so the
``loss = loss *`` (out of place)                                                          factor is applied once;
                                                                                          :func:`loss_scaling_owner`
                                                                                          says which is outermost
``UNSLOTH_TOKEN_BALANCE=1``: a                ``optimize_sft_trainer_batch_samples``      opensloth's plan; Unsloth's
``TokenBalancedSampler`` reorders each step   packs and balances the same step window     sampler is bypassed with a
window (equal rows per rank, padding-free)                                                one-line warning
``_ddp_defaults``: ``find_unused_parameters   ``make_sft_config``:                        they agree
=False`` for LoRA under checkpointing         ``ddp_find_unused_parameters=False``
``PatchFastRL`` rebinds ``trl.SFTTrainer`` /  patches target ``trl.X`` as bound at call   :func:`check_trainer_patched`
``trl.DPOTrainer`` to compiled classes in     time (after ``import unsloth``)             refuses a trainer built
``unsloth_compiled_cache/``                                                               from an unpatched class
compiled-cache writes: a ``FileLock`` per     nothing to add (ranks may share the         --
file, atomic ``os.replace``, rank 0           folder); :func:`compiled_cache_digest`
generates once a process group exists         lets a check compare two caches
``UNSLOTH_FSDP2=1``, context parallelism      DDP only                                    not combined: the batch
                                                                                          patch refuses loaders it
                                                                                          cannot replay
============================================  ==========================================  =========================

How a user chooses between the two balancers: opensloth's is on when
``patch_optimize_sft_trainer_batch_samples()`` is called (train scripts: unless
``--no_patches``); Unsloth's is on with ``UNSLOTH_TOKEN_BALANCE=1`` and the batch
patch off. Nothing here imports torch, TRL or Unsloth at import time.
"""

from __future__ import annotations

import hashlib
import os

from opensloth.log import warn_rank0
from opensloth.patches.ddp import LOSS_SCALE_PATCH
from opensloth.patches.registry import PatchTargetError, is_applied, is_patched, record_patch

WRITTEN_FOR = "unsloth 2026.10.9 (utils/token_budget.py, models/_utils.py, models/rl.py)"
TOKEN_BALANCE_ENV = "UNSLOTH_TOKEN_BALANCE"
TOKEN_BALANCE_BYPASS = "unsloth_token_balance_bypassed"
_TRUE = ("1", "true", "yes", "on")  # the values Unsloth's install_token_budget accepts


def unsloth_token_balance_requested(environ=None) -> bool:
    """True when ``UNSLOTH_TOKEN_BALANCE`` is on, parsed the way Unsloth parses it."""
    return (os.environ if environ is None else environ).get(TOKEN_BALANCE_ENV, "0").lower() in _TRUE


def is_unsloth_token_balanced_sampler(sampler) -> bool:
    """True for Unsloth's ``TokenBalancedSampler`` (matched by class and module, no Unsloth import)."""
    cls = type(sampler)
    return cls.__name__ == "TokenBalancedSampler" and (cls.__module__ or "").startswith("unsloth")


def bypass_unsloth_token_balance(sampler):
    """The sampler the batch patch should replay: Unsloth's ``TokenBalancedSampler`` unwrapped.

    Unsloth's sampler only permutes indices inside each step window
    (``batch x accum x world_size`` samples); opensloth re-plans that same
    window, so the permutation is wasted work and would be undone. Warns once
    per process and records the decision in ``applied_patches()``. Any other
    sampler is returned unchanged.

    Raises:
        PatchTargetError: the sampler looks like Unsloth's but has no inner ``sampler``.
    """
    if not is_unsloth_token_balanced_sampler(sampler):
        return sampler
    inner = sampler.__dict__.get("sampler")
    if inner is None:
        raise PatchTargetError(
            f"opensloth ({WRITTEN_FOR}): Unsloth's TokenBalancedSampler no longer keeps its inner sampler in "
            "`.sampler`; run with UNSLOTH_TOKEN_BALANCE unset or without the batch patch (--no_patches)"
        )
    if not is_applied(TOKEN_BALANCE_BYPASS):
        warn_rank0(
            "UNSLOTH_TOKEN_BALANCE=1 and opensloth's batch patch are both on: opensloth's packing plan is used "
            "and Unsloth's TokenBalancedSampler is bypassed. To use Unsloth's instead, run without the batch patch "
            "(--no_patches); unset UNSLOTH_TOKEN_BALANCE to silence this."
        )
        record_patch(TOKEN_BALANCE_BYPASS, "unsloth.utils.token_budget.TokenBalancedSampler (in the train loader)",
                     WRITTEN_FOR, "not patched: bypassed, opensloth's step plan covers the same window")
    return inner


def loss_scaling_owner() -> str:
    """Which wrapper is outermost on ``transformers.Trainer.compute_loss``.

    ``"opensloth"`` (``trainer_loss_scale_out_of_place``), ``"unsloth"``
    (``_unsloth_pre_compute_loss`` over Unsloth's out-of-place rewrite, installed
    by ``FastLanguageModel.from_pretrained`` on its GPU path), or
    ``"transformers"`` (neither: the in-place ``loss *=`` of the stock method).
    Either wrapper keeps the cross-rank factor out of place; ``ddp_patch()``
    called again re-wraps Unsloth's, which is harmless.
    """
    from transformers import Trainer

    current = Trainer.compute_loss
    if is_patched(current, LOSS_SCALE_PATCH):
        return "opensloth"
    if getattr(current, "__name__", "") == "_unsloth_pre_compute_loss" and hasattr(Trainer, "_old_compute_loss"):
        return "unsloth"
    return "transformers"


def check_trainer_patched(trainer, attr: str, patch_name: str) -> None:
    """Refuse a trainer whose class misses a patch that was applied to another class.

    Unsloth rebinds ``trl.SFTTrainer`` / ``trl.DPOTrainer`` to compiled classes
    when it is imported; a class bound before that (``from trl import
    SFTTrainer`` above ``import unsloth``), or a patch applied before the
    rebinding, leaves the trainer in use unpatched and the run silently stock.

    Raises:
        PatchTargetError: ``patch_name`` is applied in this process but
            ``type(trainer).<attr>`` is not its replacement.
    """
    if not is_applied(patch_name):
        return
    cls = type(trainer)
    current = getattr(cls, attr, None)
    if not is_patched(current, patch_name):
        import sys

        trl = sys.modules.get("trl")
        bound = {name: getattr(trl, name, None) for name in ("SFTTrainer", "DPOTrainer")} if trl else {}
        hint = ", ".join(f"trl.{k} is {v.__module__}.{v.__qualname__}" for k, v in bound.items() if v is not None)
        raise PatchTargetError(
            f"opensloth patch '{patch_name}' is applied, but the trainer in use ({cls.__module__}.{cls.__qualname__})"
            f" does not carry it ({hint}). Import unsloth first, then apply the patch, then build the trainer from "
            f"the class the patch returned (or trl.<Trainer> looked up after the patch)."
        )


def compiled_cache_digest(folder: str) -> dict[str, str]:
    """``{file name: sha256}`` of the ``.py`` files Unsloth wrote to ``folder`` (its compiled cache).

    Two caches built from the same versions hold the same bytes; a torn or
    interleaved write by two ranks shows up as a differing digest.
    """
    out = {}
    if not os.path.isdir(folder):
        return out
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".py") and os.path.isfile(path):
            with open(path, "rb") as fh:
                out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def unsloth_parallel_env(environ=None) -> dict[str, str]:
    """The Unsloth switches that change batching or parallelism, as set in the environment."""
    env = os.environ if environ is None else environ
    keys = ("UNSLOTH_TOKEN_BALANCE", "UNSLOTH_TOKEN_BUDGET", "UNSLOTH_FSDP2", "UNSLOTH_COMPILE_LOCATION",
            "UNSLOTH_COMPILE_DISABLE", "UNSLOTH_PADDING_CHOICE")
    return {k: env[k] for k in keys if k in env}
