"""The torchrun environment of this process, and the process-group helpers built on it.

:func:`distributed_env` is the single place where opensloth reads and
validates ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``LOCAL_WORLD_SIZE``
when set); every other module calls it. Backend rule: nccl when CUDA is
available, gloo otherwise (or when ``OPENSLOTH_SHARE_DEVICE=1`` puts several
ranks on one GPU). The process group is created only when
``WORLD_SIZE > 1``. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

from opensloth.errors import UserInputError
from opensloth.log import log_all_ranks

__all__ = [
    "DistEnv",
    "DistributedEnvError",
    "all_gather_object_list",
    "barrier",
    "destroy_process_group",
    "distributed_env",
    "ensure_process_group",
    "gather_checked",
    "launcher_problem",
    "preferred_backend",
    "SHARE_DEVICE_ENV",
    "share_device_requested",
]


class DistributedEnvError(UserInputError, RuntimeError):
    """A torchrun environment variable is missing, non-integer or inconsistent.

    Also a ``RuntimeError``: the original OpenSloth's ``_check_distributed_environment``
    raised that, so old ``except RuntimeError`` blocks still catch it.
    """


@dataclass(frozen=True)
class DistEnv:
    """The validated launch environment of this process.

    It also unpacks as the tuple the original OpenSloth's
    ``_check_distributed_environment()`` returned, in that order:
    ``local_rank, world_size, global_rank = distributed_env()``.
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    def _legacy_tuple(self) -> tuple[int, int, int]:
        return (self.local_rank, self.world_size, self.rank)

    def __iter__(self):
        return iter(self._legacy_tuple())

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index):
        return self._legacy_tuple()[index]

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


def launcher_problem(env: dict | None = None) -> str | None:
    """Why this process is alone although its launcher was asked for several, or None.

    ``accelerate launch --num_processes N`` without ``--multi_gpu`` (and without
    several GPUs that make accelerate switch it on) runs its simple launcher:
    ONE process, with ``MASTER_ADDR``/``MASTER_PORT`` set for N but no
    ``WORLD_SIZE``/``RANK``. Training would silently run on one rank. Seen with
    accelerate 1.x: the simple launcher sets ``MASTER_ADDR`` only when asked for
    more than one process or machine, and every ``accelerate launch`` sets
    ``ACCELERATE_DYNAMO_BACKEND``.
    """
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") or not env.get("MASTER_ADDR") or "ACCELERATE_DYNAMO_BACKEND" not in env:
        return None
    return ("accelerate launch was asked for several processes (it set MASTER_ADDR) but started only this one: "
            "without --multi_gpu its simple launcher runs one process unless the machine has several GPUs. Use "
            "'accelerate launch --multi_gpu --num_processes N script.py' (on CPU too) or 'torchrun "
            "--nproc_per_node N script.py'; for a single process, unset MASTER_ADDR")


# The original OpenSloth's name (user scripts import it); same function. Its result unpacks as
# the original's ``(local_rank, world_size, global_rank)``. The checks are stricter than the
# original's: e.g. WORLD_SIZE=2 without RANK is an error here, rank 0 there.
_check_distributed_environment = distributed_env


SHARE_DEVICE_ENV = "OPENSLOTH_SHARE_DEVICE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def share_device_requested(environ=None) -> bool:
    """True when ``OPENSLOTH_SHARE_DEVICE`` asks ranks to share GPUs.

    Testing override: several ranks share the visible GPUs (rank r on
    ``cuda:{LOCAL_RANK % device_count}``) and talk over gloo, since NCCL refuses
    two ranks on one device. It lets a one-GPU machine run a 2-rank job to
    check multi-rank behaviour; it is slower than one rank.

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
        if current == "nccl" and share_device_requested():
            raise RuntimeError(
                f"{SHARE_DEVICE_ENV}=1 puts several ranks on one GPU, which nccl refuses; let opensloth "
                "create the process group (call ddp_patch() before anything else initialises it)"
            )
        return True
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend)
    # Tear the group down before the interpreter does: a gloo group left to the interpreter's exit can
    # abort the process ("terminate called without an active exception", SIGABRT) after a finished run,
    # which torchrun then reports as a failure (seen once on 2 CPU ranks).
    atexit.register(destroy_process_group)
    log_all_ranks(f"process group initialised: backend={backend} world_size={env.world_size}")
    return True


def destroy_process_group() -> None:
    """Destroy the default process group if one exists (idempotent; registered at exit by opensloth)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
