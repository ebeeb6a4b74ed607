"""Process-group helpers shared by training, DPO and rollouts.

Backend rule: nccl when CUDA is available, gloo otherwise. The process group
is created only when WORLD_SIZE > 1.

``OPENSLOTH_SHARE_DEVICE=1`` (testing override): several ranks share the
visible GPUs (rank r on ``cuda:{LOCAL_RANK % device_count}``) and talk over
gloo, since NCCL refuses two ranks on one device. It lets a one-GPU machine
run a 2-rank job to check multi-rank behaviour; it is slower than one rank.
"""

from __future__ import annotations

import os

from opensloth.errors import UserInputError
from opensloth.log import log_all_ranks
from opensloth.utils.dataset_cache import DistEnv, _check_distributed_environment

SHARE_DEVICE_ENV = "OPENSLOTH_SHARE_DEVICE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def share_device_requested(environ=None) -> bool:
    """True when ``OPENSLOTH_SHARE_DEVICE`` asks ranks to share GPUs (see module docstring).

    Raises:
        UserInputError: the variable is set to something other than 0/1/true/false/yes/no/on/off.
    """
    value = (os.environ if environ is None else environ).get(SHARE_DEVICE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UserInputError(f"{SHARE_DEVICE_ENV}={value!r}: use 1 (ranks share the GPUs, gloo) or 0 (one GPU per rank)")


def preferred_backend() -> str:
    """nccl on CUDA machines, gloo on CPU or when ranks share a GPU (``OPENSLOTH_SHARE_DEVICE=1``)."""
    import torch

    if not torch.cuda.is_available() or share_device_requested():
        return "gloo"
    return "nccl"


def ensure_process_group(env: DistEnv | None = None) -> bool:
    """Initialise the default process group when WORLD_SIZE > 1.

    Returns True when a process group exists after the call. If one already
    exists with a backend that cannot serve this device (nccl without CUDA),
    raises a RuntimeError naming the backend and the fix.
    """
    import torch
    import torch.distributed as dist

    env = env or _check_distributed_environment()
    if not env.is_distributed:
        return dist.is_available() and dist.is_initialized()
    backend = preferred_backend()
    if dist.is_initialized():
        current = dist.get_backend()
        if current == "nccl" and not torch.cuda.is_available():
            raise RuntimeError(
                "the process group uses nccl but this machine has no CUDA device; "
                "initialise it with backend='gloo' (opensloth does this when it creates the group)"
            )
        if current == "nccl" and share_device_requested():
            raise RuntimeError(
                f"{SHARE_DEVICE_ENV}=1 puts several ranks on one GPU, which nccl refuses; let opensloth "
                "create the process group (call ddp_patch() before anything else initialises it)"
            )
        return True
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend)
    log_all_ranks(f"process group initialised: backend={backend} world_size={env.world_size}")
    return True


def all_gather_object_list(obj) -> list:
    """Gather one picklable object from every rank (a single-item list without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
