"""Resume on several CPU ranks: load ``optimizer.pt`` to ``cpu``, not to ``cpu:<rank>``.

transformers 5.17 ``Trainer._load_optimizer_and_scheduler`` loads the
optimizer state with ``map_location=self.args.device`` when ``world_size > 1``.
On CPU ranks (gloo) that device is ``cpu:<N>``, and ``torch.load`` refuses it:
``RuntimeError: don't know how to restore data location of
torch.storage.UntypedStorage (tagged with cpu:0)``. So every multi-rank resume
on CPU failed. The patch wraps the method: while it runs on a ``cpu:<N>``
device, ``torch.load`` maps ``cpu:<N>`` to ``cpu`` (the same memory). CUDA
devices (``cuda:<N>``) and one-process runs (``map_location="cpu"``) are left
alone. With it, resumed runs equal uninterrupted ones exactly on 1 and 2 CPU
ranks (``tests/test_resume.py``).
"""

from __future__ import annotations

import contextlib

from opensloth.patches.registry import require_attr, require_source_contains, swap_method

__all__ = ["RESUME_MAP_LOCATION_PATCH", "WRITTEN_FOR", "patch_trainer_resume_map_location", "torch_load_to_plain_cpu"]

RESUME_MAP_LOCATION_PATCH = "trainer_resume_cpu_map_location"
WRITTEN_FOR = "transformers 5.0-5.17 (Trainer._load_optimizer_and_scheduler: map_location=args.device)"
_SOURCE_SNIPPETS = ['map_location = self.args.device if self.args.world_size > 1 else "cpu"', "torch.load("]


def _indexed_cpu(location) -> bool:
    """``cpu:0`` / ``torch.device("cpu", 0)``: a CPU location torch.load cannot restore to."""
    import torch

    if isinstance(location, str):
        return location.startswith("cpu:")
    return isinstance(location, torch.device) and location.type == "cpu" and location.index is not None


@contextlib.contextmanager
def torch_load_to_plain_cpu():
    """Inside the block, ``torch.load(..., map_location=cpu:<N>)`` loads to ``cpu``."""
    import torch

    original = torch.load

    def load(*args, **kwargs):
        if _indexed_cpu(kwargs.get("map_location")):
            kwargs["map_location"] = "cpu"
        elif len(args) > 1 and _indexed_cpu(args[1]):
            args = (args[0], "cpu", *args[2:])
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _make_load_optimizer_and_scheduler(original):
    def _load_optimizer_and_scheduler(self, checkpoint):
        device = getattr(self.args, "device", None)
        if checkpoint is None or not _indexed_cpu(device):
            return original(self, checkpoint)
        with torch_load_to_plain_cpu():
            return original(self, checkpoint)

    return _load_optimizer_and_scheduler


def patch_trainer_resume_map_location() -> bool:
    """Make ``Trainer`` resume on ``cpu:<N>`` devices. Returns True when applied by this call (idempotent).

    Raises:
        PatchTargetError: ``Trainer._load_optimizer_and_scheduler`` is missing or
            no longer maps the optimizer state to ``args.device``.
    """
    from transformers import Trainer

    method = require_attr(Trainer, "_load_optimizer_and_scheduler", RESUME_MAP_LOCATION_PATCH, WRITTEN_FOR)
    require_source_contains(method, _SOURCE_SNIPPETS, RESUME_MAP_LOCATION_PATCH, WRITTEN_FOR)
    return swap_method(
        Trainer,
        "_load_optimizer_and_scheduler",
        _make_load_optimizer_and_scheduler,
        name=RESUME_MAP_LOCATION_PATCH,
        written_for=WRITTEN_FOR,
        description="resume on cpu:<N> ranks loads optimizer.pt to cpu (torch.load cannot restore to cpu:N)",
    )
