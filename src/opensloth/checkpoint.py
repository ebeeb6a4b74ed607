"""Checkpoints that can be told apart when incomplete, and which one ``--resume_from_checkpoint`` means.

The Trainer writes ``<run_dir>/checkpoint-<step>/`` file by file (adapter,
``optimizer.pt``, ``scheduler.pt``, one ``rng_state_<rank>.pth`` per rank,
``trainer_state.json``, then the dynamic-beta state). A run killed or out of
disk space in the middle leaves a folder that looks like a checkpoint. So
opensloth writes :data:`MARKER_FILE` into the folder last, atomically, once
every rank has written its files (:class:`opensloth.launch` adds the callback
that does it), and removes it before a folder of the same step is written
again. A checkpoint is *complete* when its marker is there and names its step.

``--resume_from_checkpoint last`` is the complete checkpoint with the highest
step; ``--resume_from_checkpoint PATH`` is that folder, which must be
complete (or, written by another tool, hold every file a resume reads).

Standard library only (layer 1); the callback itself lives in :mod:`opensloth.launch`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re

from opensloth.atomic import write_json_atomic
from opensloth.errors import UserInputError

__all__ = [
    "CHECKPOINT_PREFIX",
    "MARKER_FILE",
    "checkpoint_dir",
    "checkpoint_dirs",
    "is_complete",
    "last_complete_checkpoint",
    "remove_marker",
    "resolve_resume",
    "write_marker",
]

CHECKPOINT_PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-"
MARKER_FILE = "opensloth_checkpoint.json"
LAST = "last"
# What Trainer.train(resume_from_checkpoint=...) reads; without the optimizer or the scheduler it
# silently starts them afresh, and the resumed run no longer equals the uninterrupted one.
_RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin")
_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dir(run_dir: str, step: int) -> str:
    """``<run_dir>/checkpoint-<step>``."""
    return os.path.join(run_dir, f"{CHECKPOINT_PREFIX}{step}")


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``run_dir``, by step."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, n)) for n in names if (m := _STEP.match(n))]
    return sorted((s, p) for s, p in found if os.path.isdir(p))


def _marker(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MARKER_FILE), encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_complete(path: str) -> bool:
    """Whether ``path`` holds the marker of a finished save of its own step."""
    match = _STEP.match(os.path.basename(os.path.normpath(path)))
    marker = _marker(path)
    return marker is not None and (match is None or marker.get("step") == int(match.group(1)))


def write_marker(path: str, step: int, world_size: int) -> str:
    """Mark ``path`` complete (atomic; call after every rank wrote its files). Returns the marker path."""
    marker = os.path.join(path, MARKER_FILE)
    write_json_atomic(marker, {
        "step": step,
        "world_size": world_size,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(n for n in os.listdir(path) if n != MARKER_FILE),
    })
    return marker


def remove_marker(path: str) -> None:
    """Unmark ``path`` before it is written again (a crash in between then leaves it incomplete)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, MARKER_FILE))


def last_complete_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint of ``run_dir`` with the highest step, or None."""
    complete = [path for _, path in checkpoint_dirs(run_dir) if is_complete(path)]
    return complete[-1] if complete else None


def _missing_resume_files(path: str, required: tuple[str, ...]) -> list[str]:
    names = set(os.listdir(path))
    missing = [n for n in (*_RESUME_FILES, *required) if n not in names]
    if not names & set(_WEIGHT_FILES):
        missing.append("adapter_model.safetensors")
    return missing


def resolve_resume(value: str | None, run_dir: str, required_files: tuple[str, ...] = ()) -> tuple[str | None, str]:
    """The checkpoint folder ``--resume_from_checkpoint value`` means, and a note for the log.

    Args:
        value: None or ``""`` (no resume), ``"last"``, or a checkpoint folder.
        run_dir: where ``last`` looks.
        required_files: files the run needs besides the Trainer's own
            (``dynamic_beta_state.json`` for dynamic-beta DPO).

    Returns:
        ``(path_or_None, note)``; the note is empty or says why a folder without
        a marker was accepted.

    Raises:
        UserInputError: ``last`` finds no complete checkpoint, or the folder
            does not exist, is incomplete, or lacks a required file.
    """
    if not value:
        return None, ""
    if value == LAST:
        path = last_complete_checkpoint(run_dir)
        if path is None:
            partial = [os.path.basename(p) for _, p in checkpoint_dirs(run_dir)]
            seen = (f"; only {', '.join(partial)}, without {MARKER_FILE} (cut short while saving)" if partial
                    else "" if os.path.isdir(run_dir) else " (the folder does not exist)")
            raise UserInputError(
                f"--resume_from_checkpoint last: no complete checkpoint in {run_dir}{seen}; start without "
                "--resume_from_checkpoint, or pass a checkpoint folder")
    else:
        path = value
        if not os.path.isdir(path):
            raise UserInputError(f"--resume_from_checkpoint {path!r} is not a folder; pass a checkpoint-<step> "
                                 f"folder of a run, or 'last' (the last complete one in {run_dir})")
    note = ""
    missing = _missing_resume_files(path, required_files)
    if not is_complete(path):
        if missing:
            raise UserInputError(
                f"--resume_from_checkpoint {path}: the checkpoint is incomplete (no {MARKER_FILE}; missing "
                f"{missing}), probably cut short while saving; resume from an earlier checkpoint or 'last'")
        note = f"{path} has no {MARKER_FILE} (written by another tool?) but holds every file a resume reads"
    elif missing:
        raise UserInputError(f"--resume_from_checkpoint {path} lacks {missing}; "
                             + ("it was not written by a dynamic-beta run, so beta cannot be restored; "
                                "resume a dynamic-beta checkpoint or start afresh"
                                if any(m in required_files for m in missing) else "resume another checkpoint"))
    return path, note
