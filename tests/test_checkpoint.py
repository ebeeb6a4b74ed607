"""opensloth.checkpoint: complete checkpoints are told apart, and what --resume_from_checkpoint means."""

from __future__ import annotations

import json
import os

import pytest

from opensloth.checkpoint import (MARKER_FILE, checkpoint_dirs, is_complete, last_complete_checkpoint, remove_marker,
                                  resolve_resume, write_marker)
from opensloth.errors import UserInputError

FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def _ckpt(run, step, complete=True, files=FILES):
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("x")
    if complete:
        write_marker(str(path), step, world_size=2)
    return str(path)


def test_last_is_the_highest_complete_step(tmp_path):
    _ckpt(tmp_path, 9)
    ten = _ckpt(tmp_path, 10)  # numeric order, not text order
    _ckpt(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-13").write_text("a file, not a folder")
    assert [s for s, _ in checkpoint_dirs(str(tmp_path))] == [9, 10, 12]
    assert last_complete_checkpoint(str(tmp_path)) == ten
    assert resolve_resume("last", str(tmp_path)) == (ten, "")
    assert resolve_resume(None, str(tmp_path)) == (None, "")


def test_marker_must_name_its_own_step(tmp_path):
    path = _ckpt(tmp_path, 4)
    marker = json.loads(open(os.path.join(path, MARKER_FILE)).read())
    assert marker["step"] == 4 and marker["world_size"] == 2 and "optimizer.pt" in marker["files"]
    os.rename(path, tmp_path / "checkpoint-6")  # a marker copied along with another step's folder
    assert not is_complete(str(tmp_path / "checkpoint-6"))
    remove_marker(str(tmp_path / "checkpoint-6"))
    remove_marker(str(tmp_path / "checkpoint-6"))  # idempotent
    assert not os.path.exists(tmp_path / "checkpoint-6" / MARKER_FILE)


def test_explicit_folders(tmp_path):
    foreign = _ckpt(tmp_path / "other", 3, complete=False)  # e.g. written by plain transformers
    path, note = resolve_resume(foreign, str(tmp_path))
    assert path == foreign and MARKER_FILE in note
    partial = _ckpt(tmp_path / "partial", 3, complete=False, files=("optimizer.pt",))
    with pytest.raises(UserInputError, match=r"incomplete .*'trainer_state.json', 'scheduler.pt'"):
        resolve_resume(partial, str(tmp_path))
    with pytest.raises(UserInputError, match="is not a folder"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    done = _ckpt(tmp_path / "dpo", 5)
    with pytest.raises(UserInputError, match="dynamic_beta_state.json.*dynamic-beta run"):
        resolve_resume(done, str(tmp_path), required_files=("dynamic_beta_state.json",))


def test_last_without_a_complete_checkpoint(tmp_path):
    with pytest.raises(UserInputError, match="folder does not exist"):
        resolve_resume("last", str(tmp_path / "run"))
    _ckpt(tmp_path / "run", 2, complete=False)
    with pytest.raises(UserInputError, match=f"only checkpoint-2, without {MARKER_FILE}"):
        resolve_resume("last", str(tmp_path / "run"))
