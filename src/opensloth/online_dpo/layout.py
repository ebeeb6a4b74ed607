"""Where an OaK-DPO run keeps its files, and which iterations are complete. Pure filesystem logic.

An iteration is complete when ``<output>/dpo/iter_<k>/iteration_complete.json``
exists: it is written last, atomically (temporary file + ``os.replace``), so a
loop killed at any point leaves either a complete iteration or none. On
restart the loop continues at the first incomplete iteration and clears the
leftovers of that iteration first.
"""

from __future__ import annotations

import json
import os
import shutil

from opensloth.atomic import write_json_atomic

MARKER = "iteration_complete.json"
RUN_FILE = "oak_run.json"


def dpo_dir(output: str, iteration: int) -> str:
    """``<output>/dpo/iter_<k>``: adapter and trainer state of iteration k (1-based)."""
    return os.path.join(output, "dpo", f"iter_{iteration}")


def rollout_dir(output: str, iteration: int) -> str:
    """``<output>/rollout_output/iter_<k>``: rollouts, judged records, pairs and manifest of iteration k."""
    return os.path.join(output, "rollout_output", f"iter_{iteration}")


def marker_path(output: str, iteration: int) -> str:
    return os.path.join(dpo_dir(output, iteration), MARKER)


def read_marker(output: str, iteration: int) -> dict | None:
    """The completion record of an iteration, or ``None`` when it did not complete."""
    path = marker_path(output, iteration)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        record = json.load(fh)
    if record.get("iteration") != iteration:
        raise ValueError(f"{path} records iteration {record.get('iteration')}, expected {iteration}")
    return record


def write_marker(output: str, iteration: int, record: dict) -> str:
    """Mark iteration k complete (atomic; call after everything else of the iteration is written)."""
    path = marker_path(output, iteration)
    write_json_atomic(path, {**record, "iteration": iteration})
    return path


def completed_iterations(output: str) -> list[int]:
    """The complete iterations 1, 2, ... up to the first gap, in order."""
    done, k = [], 1
    while read_marker(output, k) is not None:
        done.append(k)
        k += 1
    return done


def next_iteration(output: str) -> int:
    """The iteration to run next: one after the last complete one."""
    done = completed_iterations(output)
    return done[-1] + 1 if done else 1


def clear_partial(output: str, iteration: int) -> list[str]:
    """Remove what an interrupted run left of an incomplete iteration. Returns the removed folders.

    Raises:
        ValueError: the iteration is complete (its files are never removed).
    """
    if read_marker(output, iteration) is not None:
        raise ValueError(f"iteration {iteration} in {output} is complete; refusing to remove it")
    removed = []
    for folder in (dpo_dir(output, iteration), rollout_dir(output, iteration)):
        if os.path.isdir(folder):
            shutil.rmtree(folder)
            removed.append(folder)
    return removed
