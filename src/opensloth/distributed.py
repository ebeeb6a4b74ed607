"""The torchrun environment of this process, and the process-group helpers built on it.

:func:`distributed_env` is the single place where opensloth reads and
validates ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``LOCAL_WORLD_SIZE``
when set); every other module calls it. Backend rule: nccl when CUDA is
available, gloo otherwise. The process group is created only when
``WORLD_SIZE > 1``. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from opensloth.errors import UserInputError
from opensloth.log import log_all_ranks

__all__ = [
    "DistEnv",
    "DistributedEnvError",
    "all_gather_object_list",
    "barrier",
    "distributed_env",
    "ensure_process_group",
    "gather_checked",
    "preferred_backend",
]


class DistributedEnvError(UserInputError):
    """A torchrun environment variable is missing, non-integer or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """The validated launch environment of this process."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def _read_int(env: dict, name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise DistributedEnvError(
            f"environment variable {name}={raw!r} is not an integer; "
            f"unset it for a single process, or launch with torchrun which sets it"
        ) from None
    if value < 0:
        raise DistributedEnvError(f"environment variable {name}={value} is negative; it must be >= 0")
    return value


def distributed_env(env: dict | None = None) -> DistEnv:
    """Read and validate the torchrun variables.

    Args:
        env: mapping to read (defaults to ``os.environ``).

    Returns:
        A :class:`DistEnv`. All variables missing means one process.

    Raises:
        DistributedEnvError: a value is not an integer, is negative, or the
            values contradict each other (e.g. ``RANK >= WORLD_SIZE``). The
            message names the variable.
    """
    env = os.environ if env is None else env
    rank = _read_int(env, "RANK")
    local_rank = _read_int(env, "LOCAL_RANK")
    world_size = _read_int(env, "WORLD_SIZE")
    local_world_size = _read_int(env, "LOCAL_WORLD_SIZE")

    if world_size is None:
        if rank not in (None, 0):
            raise DistributedEnvError(
                f"RANK={rank} is set but WORLD_SIZE is not; set WORLD_SIZE (torchrun does) or unset RANK"
            )
        world_size = 1
    if world_size == 0:
        raise DistributedEnvError("WORLD_SIZE=0 is invalid; it must be >= 1")
    if rank is None:
        if world_size > 1:
            raise DistributedEnvError(
                f"WORLD_SIZE={world_size} but RANK is not set; launch with torchrun, which sets both"
            )
        rank = 0
    if local_rank is None:
        local_rank = rank if world_size == 1 or local_world_size is None else rank % local_world_size
    if local_world_size is None:
        # Without LOCAL_WORLD_SIZE we cannot know the node size; assume one node.
        local_world_size = world_size
    if rank >= world_size:
        raise DistributedEnvError(f"RANK={rank} must be smaller than WORLD_SIZE={world_size}")
    if local_world_size > world_size:
        raise DistributedEnvError(
            f"LOCAL_WORLD_SIZE={local_world_size} must not exceed WORLD_SIZE={world_size}"
        )
    if local_rank >= local_world_size:
        raise DistributedEnvError(
            f"LOCAL_RANK={local_rank} must be smaller than LOCAL_WORLD_SIZE={local_world_size} "
            f"(WORLD_SIZE={world_size})"
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world_size)


# The name older code (and user scripts) import; same function.
_check_distributed_environment = distributed_env


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

    env = env or distributed_env()
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


def gather_checked(payload, error: str | None) -> list:
    """All-gather ``payload`` from every rank; if any rank reports ``error``, raise it on every rank.

    So a user error on one rank (a judge returning garbage) stops every rank
    instead of leaving the others waiting in the next collective.

    Raises:
        UserInputError: the first error of any rank.
    """
    gathered = all_gather_object_list({"payload": payload, "error": error})
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        raise UserInputError(errors[0])
    return [g["payload"] for g in gathered]


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group exists; a no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
