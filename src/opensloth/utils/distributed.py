"""Process-group helpers shared by training, DPO and rollouts.

Backend rule: nccl when CUDA is available, gloo otherwise. The process group
is created only when WORLD_SIZE > 1.
"""

from __future__ import annotations

from opensloth.log import log_all_ranks
from opensloth.utils.dataset_cache import DistEnv, _check_distributed_environment


def preferred_backend() -> str:
    """nccl on CUDA machines, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


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
