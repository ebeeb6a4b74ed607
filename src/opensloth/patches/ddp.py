"""``ddp_patch()``: make an Unsloth/TRL script correct under ``torchrun``.

Call it once per process, right after ``import unsloth`` (or right after
importing transformers when Unsloth is not used)::

    import unsloth  # noqa: F401  (first, so Unsloth can patch transformers)
    from opensloth.patches.ddp import ddp_patch
    device = ddp_patch()

It does three things and returns the device of this rank:

1. Reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` through
   :func:`opensloth.distributed.distributed_env` (the one
   place that validates them) and pins ``cuda:{LOCAL_RANK}`` when CUDA is
   present, CPU otherwise. Logs rank and device once per rank.
2. When ``WORLD_SIZE > 1``, makes sure the default process group exists with
   nccl on CUDA and gloo on CPU (accelerate then reuses it).
3. Patches ``transformers.Trainer.compute_loss`` so that the cross-rank loss
   scaling (``loss *= num_processes``, applied when
   ``average_tokens_across_devices`` is on) happens out of place. With
   Unsloth's fused/chunked cross-entropy the loss is a view produced by a
   custom autograd function, and the in-place form raises
   ``RuntimeError: Output 0 of ... is a view and is being modified inplace``.
4. On CUDA-less machines, makes every ``TrainingArguments`` set
   ``use_cpu=True`` (gloo). Otherwise transformers silently builds a
   non-distributed state under torchrun on CPU: each rank trains on the full
   data and gradients are never synchronised.
5. Routes TRL's Triton-only fused LM-head log-probs to a torch implementation
   on CPU (see :mod:`opensloth.patches.trl_cpu_logprobs`), unless Unsloth's
   CPU backend already did.
6. On CUDA-less machines, lets a resume load the optimizer state on ``cpu:<N>``
   ranks (see :mod:`opensloth.patches.resume_map_location`).

``OPENSLOTH_SHARE_DEVICE=1`` (testing override) puts every rank on
``cuda:{LOCAL_RANK % device_count}`` with a gloo process group, so a
one-GPU machine can run ``torchrun --nproc_per_node=2`` (NCCL refuses two
ranks on one device). It also sets ``ACCELERATE_BYPASS_DEVICE_MAP=true`` so
accelerate wraps DDP without ``device_ids=[LOCAL_RANK]``, and makes every
``TrainingArguments`` default to ``ddp_backend="gloo"`` so accelerate's state
matches the gloo group (patch ``training_args_shared_device_gloo``).

Calling it again is a no-op that returns the same device.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re

from opensloth.distributed import distributed_env, ensure_process_group, preferred_backend, share_device_requested
from opensloth.log import log_all_ranks
from opensloth.patches.registry import PatchTargetError, record_patch, require_attr, swap_method
from opensloth.patches.resume_map_location import patch_trainer_resume_map_location
from opensloth.patches.trl_cpu_logprobs import patch_trl_cpu_logprobs

__all__ = [
    "CPU_DDP_PATCH",
    "CPU_DDP_WRITTEN_FOR",
    "LOSS_SCALE_PATCH",
    "LOSS_SCALE_WRITTEN_FOR",
    "SHARED_DEVICE_PATCH",
    "ddp_patch",
    "patch_trainer_loss_scaling",
    "patch_training_args_cpu_ddp",
    "patch_training_args_shared_device",
]

LOSS_SCALE_PATCH = "trainer_loss_scale_out_of_place"
LOSS_SCALE_WRITTEN_FOR = "transformers 5.0-5.17 (Trainer.compute_loss with average_tokens_across_devices)"

_STATE: dict = {}


def _compute_loss_source() -> str:
    """Source of ``compute_loss`` as defined in ``transformers/trainer.py``.

    Read from the module file, not from the live attribute, because Unsloth's
    GPU path replaces the method with an ``exec``-built copy that has no source.
    """
    import transformers.trainer as trainer_module

    src = inspect.getsource(trainer_module)
    match = re.search(r"\n    def compute_loss\(.*?(?=\n    def |\n    @)", src, flags=re.S)
    if match is None:
        raise PatchTargetError(
            f"opensloth patch '{LOSS_SCALE_PATCH}' (written for {LOSS_SCALE_WRITTEN_FOR}) cannot find "
            "`def compute_loss` in transformers/trainer.py; pin a supported transformers version."
        )
    return match.group(0)


def _check_loss_scale_target() -> None:
    src = _compute_loss_source()
    needed = ["average_tokens_across_devices", "num_items_in_batch is not None", "num_processes"]
    missing = [s for s in needed if s not in src]
    scales = re.search(r"loss\s*\*=|loss\s*=\s*loss\s*\*", src)
    if missing or scales is None:
        raise PatchTargetError(
            f"opensloth patch '{LOSS_SCALE_PATCH}' (written for {LOSS_SCALE_WRITTEN_FOR}): "
            f"Trainer.compute_loss no longer scales the loss by the number of processes the way the patch "
            f"expects (missing: {missing or ['loss scaling statement']}). The installed transformers changed; "
            "pin transformers<=5.17.0 or update the patch."
        )


def _loss_scale(trainer) -> int:
    """The factor transformers applies: processes // tp_size, or n_gpu under DataParallel."""
    scale = trainer.accelerator.num_processes
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None:
        scale //= pc.tp_size
    return scale if trainer.args.n_gpu <= 1 else trainer.args.n_gpu


def _make_out_of_place_compute_loss(original):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        scales_here = (
            getattr(self.args, "average_tokens_across_devices", False)
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        )
        if not scales_here:
            return original(self, model, inputs, return_outputs=return_outputs,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        # Switch off transformers' own (in-place) scaling for this call only and
        # apply the same factor out of place. The flag is read only by that
        # branch of compute_loss; the token count itself is already global.
        self.args.average_tokens_across_devices = False
        try:
            result = original(self, model, inputs, return_outputs=return_outputs,
                              num_items_in_batch=num_items_in_batch, **kwargs)
        finally:
            self.args.average_tokens_across_devices = True
        factor = _loss_scale(self)
        if return_outputs:
            loss, outputs = result
            return loss * factor, outputs
        return result * factor

    return compute_loss


def patch_trainer_loss_scaling() -> bool:
    """Apply the out-of-place loss-scaling fix to ``transformers.Trainer``.

    Returns True if the patch was applied by this call, False if it was
    already in place. Raises :class:`PatchTargetError` if the installed
    transformers no longer matches what the patch was written for.
    """
    from transformers import Trainer

    require_attr(Trainer, "compute_loss", LOSS_SCALE_PATCH, LOSS_SCALE_WRITTEN_FOR)
    _check_loss_scale_target()
    return swap_method(
        Trainer,
        "compute_loss",
        _make_out_of_place_compute_loss,
        name=LOSS_SCALE_PATCH,
        written_for=LOSS_SCALE_WRITTEN_FOR,
        description="cross-rank `loss *= num_processes` done out of place (Unsloth fused loss returns a view)",
    )


CPU_DDP_PATCH = "training_args_cpu_ddp"
CPU_DDP_WRITTEN_FOR = "transformers 5.0-5.17 (TrainingArguments.__post_init__ / use_cpu)"


def _make_cpu_ddp_post_init(original):
    def __post_init__(self, *args, **kwargs):
        import torch

        # Without use_cpu, transformers builds a non-distributed state on a
        # CUDA-less machine even under torchrun: every rank then trains on the
        # full data with no gradient sync. use_cpu=True gives MULTI_CPU (gloo).
        if not torch.cuda.is_available():
            self.use_cpu = True
            if getattr(self, "ddp_backend", None) is None and distributed_env().is_distributed:
                self.ddp_backend = "gloo"
        return original(self, *args, **kwargs)

    return __post_init__


def patch_training_args_cpu_ddp() -> bool:
    """Make ``TrainingArguments`` distributed (MULTI_CPU, gloo) on CUDA-less machines.

    Returns True if applied by this call, False if already in place.
    """
    from transformers import TrainingArguments

    require_attr(TrainingArguments, "__post_init__", CPU_DDP_PATCH, CPU_DDP_WRITTEN_FOR)
    if not hasattr(TrainingArguments, "use_cpu") and "use_cpu" not in getattr(
        TrainingArguments, "__dataclass_fields__", {}
    ):
        raise PatchTargetError(
            f"opensloth patch '{CPU_DDP_PATCH}' (written for {CPU_DDP_WRITTEN_FOR}): TrainingArguments has no "
            "`use_cpu` field in the installed transformers; pin transformers<=5.17.0"
        )
    return swap_method(
        TrainingArguments,
        "__post_init__",
        _make_cpu_ddp_post_init,
        name=CPU_DDP_PATCH,
        written_for=CPU_DDP_WRITTEN_FOR,
        description="use_cpu=True and gloo on CUDA-less machines, so torchrun ranks really run DDP",
    )


SHARED_DEVICE_PATCH = "training_args_shared_device_gloo"
SHARED_DEVICE_WRITTEN_FOR = "transformers 5.0-5.17 (TrainingArguments.ddp_backend) + accelerate 1.x (PartialState)"


def _make_shared_device_post_init(original):
    def __post_init__(self, *args, **kwargs):
        # accelerate picks nccl for CUDA unless told otherwise and then gathers with
        # all_gather_into_tensor, which the gloo group of shared-device ranks lacks; naming gloo here
        # makes PartialState match the process group ddp_patch() created.
        if (share_device_requested() and getattr(self, "ddp_backend", None) is None
                and distributed_env().is_distributed):
            self.ddp_backend = "gloo"
        return original(self, *args, **kwargs)

    return __post_init__


def patch_training_args_shared_device() -> bool:
    """``ddp_backend="gloo"`` for every ``TrainingArguments`` while ``OPENSLOTH_SHARE_DEVICE=1``.

    Returns True if applied by this call, False if already in place.
    """
    from transformers import TrainingArguments

    require_attr(TrainingArguments, "__post_init__", SHARED_DEVICE_PATCH, SHARED_DEVICE_WRITTEN_FOR)
    if "ddp_backend" not in getattr(TrainingArguments, "__dataclass_fields__", {}):
        raise PatchTargetError(
            f"opensloth patch '{SHARED_DEVICE_PATCH}' (written for {SHARED_DEVICE_WRITTEN_FOR}): TrainingArguments "
            "has no `ddp_backend` field in the installed transformers; pin transformers<=5.17.0"
        )
    return swap_method(
        TrainingArguments,
        "__post_init__",
        _make_shared_device_post_init,
        name=SHARED_DEVICE_PATCH,
        written_for=SHARED_DEVICE_WRITTEN_FOR,
        description="ddp_backend='gloo' while OPENSLOTH_SHARE_DEVICE=1 (ranks share a GPU; nccl refuses that)",
    )


def _pin_device(local_rank: int):
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if share_device_requested():
            # Ranks share the GPUs (gloo, see preferred_backend). accelerate would wrap DDP with
            # device_ids=[LOCAL_RANK], a device this rank's model is not on; without device_ids DDP
            # uses the module's own device.
            index = local_rank % count
            os.environ.setdefault("ACCELERATE_BYPASS_DEVICE_MAP", "true")
            torch.cuda.set_device(index)
            return torch.device(f"cuda:{index}")
        if local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible; launch with "
                f"--nproc_per_node<={count} or fix CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_device(local_rank)
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def ddp_patch(*, patch_loss_scaling: bool = True):
    """Prepare this process for DDP training and return its ``torch.device``.

    Args:
        patch_loss_scaling: apply the out-of-place loss-scaling fix (default).

    Raises:
        opensloth.distributed.DistributedEnvError: a torchrun variable
            is non-integer or inconsistent (the message names it).
        PatchTargetError: the installed transformers moved the patched code.
    """
    if "device" in _STATE:
        if patch_loss_scaling:
            patch_trainer_loss_scaling()
        return _STATE["device"]

    env = distributed_env()
    device = _pin_device(env.local_rank)
    if device.type == "cpu":
        patch_training_args_cpu_ddp()
        patch_trainer_resume_map_location()
    elif env.is_distributed and share_device_requested():
        patch_training_args_shared_device()
    if env.is_distributed:
        ensure_process_group(env)
        record_patch(
            "process_group_backend",
            "torch.distributed default group",
            "torch>=2.4",
            f"default process group initialised with {preferred_backend()} before accelerate",
        )
    if patch_loss_scaling:
        patch_trainer_loss_scaling()
    if importlib.util.find_spec("trl") is not None:
        patch_trl_cpu_logprobs()
    log_all_ranks(
        f"ddp_patch: rank {env.rank}/{env.world_size} local_rank {env.local_rank} -> device {device}"
    )
    _STATE["device"] = device
    _STATE["env"] = env
    return device
