"""opensloth.patches.resume_map_location: optimizer state of a checkpoint loads on ``cpu:<N>`` ranks.

The multi-rank resume itself (equal losses on 2 CPU ranks) is ``tests/test_resume.py``.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from opensloth.patches import applied_patches
from opensloth.patches.registry import PatchTargetError, is_patched


def _saved() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({"state": {0: {"exp_avg": torch.arange(3.0)}}}, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("location", [torch.device("cpu", 1), "cpu:0"])
def test_torch_refuses_an_indexed_cpu_location_and_the_context_maps_it(location):
    from opensloth.patches.resume_map_location import torch_load_to_plain_cpu

    buf = _saved()
    with pytest.raises(RuntimeError, match="don't know how to restore data location"):
        torch.load(buf, map_location=location, weights_only=True)  # what transformers does on cpu:N
    buf.seek(0)
    with torch_load_to_plain_cpu():
        state = torch.load(buf, map_location=location, weights_only=True)
    assert torch.equal(state["state"][0]["exp_avg"], torch.arange(3.0))
    assert torch.load.__module__.startswith("torch")  # restored after the block


def test_patch_swaps_the_trainer_method_once():
    from transformers import Trainer

    from opensloth.patches.resume_map_location import RESUME_MAP_LOCATION_PATCH, patch_trainer_resume_map_location

    patch_trainer_resume_map_location()
    method = Trainer._load_optimizer_and_scheduler
    assert is_patched(method, RESUME_MAP_LOCATION_PATCH)
    assert patch_trainer_resume_map_location() is False and Trainer._load_optimizer_and_scheduler is method
    assert RESUME_MAP_LOCATION_PATCH in {p.name for p in applied_patches()}


@pytest.mark.parametrize("device, mapped", [(torch.device("cpu", 1), True), (torch.device("cpu"), False)])
def test_the_wrapper_maps_only_indexed_cpu_devices(device, mapped):
    """The wrapped method loads as transformers does (``map_location=args.device``); only ``cpu:N`` is remapped."""
    from opensloth.patches.resume_map_location import _make_load_optimizer_and_scheduler

    seen = []

    def original(self, checkpoint):
        seen.append(torch.load.__module__.startswith("torch"))  # False while the wrapper maps locations
        return torch.load(_saved(), map_location=self.args.device, weights_only=True)

    trainer = SimpleNamespace(args=SimpleNamespace(device=device))
    state = _make_load_optimizer_and_scheduler(original)(trainer, "checkpoint-2")
    assert torch.equal(state["state"][0]["exp_avg"], torch.arange(3.0))
    assert seen == [not mapped]
    if mapped:
        with pytest.raises(RuntimeError, match="restore data location"):  # unpatched: the bug
            original(trainer, "checkpoint-2")


def test_patch_refuses_a_changed_target(monkeypatch):
    from opensloth.patches import resume_map_location as mod

    monkeypatch.setattr(mod, "_SOURCE_SNIPPETS", ["map_location = something_else"])
    with pytest.raises(PatchTargetError, match=mod.RESUME_MAP_LOCATION_PATCH):
        mod.patch_trainer_resume_map_location()
