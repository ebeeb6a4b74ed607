"""train_dpo.py end to end: 1 rank x accum 2 == 2 ranks x accum 1, and resume == uninterrupted on 1 and 2 ranks.

Four launches of the real script (backend auto: Unsloth when installed),
float32, warmup 2 steps and a large alpha with the z-score rule so beta
visibly moves within 6 steps:

- ``one``: 1 process, per-device batch 4, grad_accum 2 (global batch 8), checkpoint every 3 steps;
- ``two``: ``torchrun --nproc_per_node=2``, per-device batch 4, grad_accum 1 (global batch 8);
- ``resumed``: 1 process resumed from ``one``'s checkpoint-3;
- ``two`` again, 2 ranks, ``--resume_from_checkpoint last`` in its own run dir after
  ``checkpoint-6`` lost its completion marker (as if the run died while writing it):
  resumes from ``checkpoint-3`` and must rewrite steps 4-6 exactly, with one
  margins record per step.

Every rank also checks at every step that all ranks hold the same controller
state (the run fails otherwise), so a finished 2-rank run means bit-identical
beta, tau and p_hat on both ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import PREF_DATA, REPO, TINY_MODEL, clean_env, torchrun_cmd

from opensloth.checkpoint import MARKER_FILE

pytestmark = pytest.mark.slow

SCRIPT = str(REPO / "train_scripts" / "train_dpo.py")
COMMON = [
    "--backend", "auto", "--dtype", "float32", "--max_steps", "6", "--per_device_batch_size", "4",
    "--max_seq_length", "64", "--train_samples", "64", "--save_steps", "3", "--learning_rate", "1e-2",
    "--dynamic_beta.warmup_steps", "2", "--dynamic_beta.alpha", "0.5", "--dynamic_beta.risk_rule", "zscore",
]

if not (TINY_MODEL.is_dir() and PREF_DATA.is_dir()):
    pytest.skip("embedded tiny model / preference data missing", allow_module_level=True)


def _launch(args, nproc: int, log_path):
    """Start the script (torchrun for nproc > 1) in the background; two launches share the 2 cores."""
    return subprocess.Popen(torchrun_cmd(nproc, SCRIPT, *args), cwd=REPO, env=clean_env(TQDM_DISABLE=1),
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _wait(proc, log_path, timeout=600):
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        tail = open(log_path).read()[-4000:]
        pytest.fail(f"{' '.join(proc.args)} exited with {rc}:\n{tail}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_runs")
    base = [*COMMON, "--output_dir", str(out)]
    one = _launch([*base, "--grad_accum", "2", "--experiment_name", "one"], 1, out / "one.log")
    _wait(one, out / "one.log")
    # The 2-rank run and the resumed run are independent: run them side by side.
    two = _launch([*base, "--grad_accum", "1", "--experiment_name", "two"], 2, out / "two.log")
    resumed = _launch([*base, "--grad_accum", "2", "--experiment_name", "resumed",
                       "--resume_from_checkpoint", str(out / "one_ws1" / "checkpoint-3")], 1, out / "resumed.log")
    _wait(two, out / "two.log")
    _wait(resumed, out / "resumed.log")
    # `two` once more, as if it had died while writing checkpoint-6: `last` must skip that one.
    first = out / "two_first"
    first.mkdir()
    for name in ("trainer_state.json", "logs/margins/margins.jsonl"):
        shutil.copy(out / "two_ws2" / name, first / os.path.basename(name))
    os.remove(out / "two_ws2" / "checkpoint-6" / MARKER_FILE)
    again = _launch([*base, "--grad_accum", "1", "--experiment_name", "two", "--resume_from_checkpoint", "last"], 2,
                    out / "two_again.log")
    _wait(again, out / "two_again.log")
    runs = {name: out / f"{name}_ws{ws}" for name, ws in (("one", 1), ("two", 2), ("resumed", 1))}
    return {**runs, "two_first": first, "two_again_log": out / "two_again.log"}


def _records(run_dir, kind="step"):
    path = run_dir / "logs" / "margins" / "margins.jsonl"
    if not path.exists():
        path = run_dir / "margins.jsonl"  # the copy kept in two_first
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == kind]


def _losses(run_dir):
    state = json.load(open(run_dir / "trainer_state.json"))
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _trajectory(records):
    return [(r["global_step"], r["beta_used"], r["beta_next"], r["tau"], r["p_hat"], r["risk_over"]) for r in records]


def _assert_same_trajectory(a, b, rel):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            if x is None or isinstance(x, (bool, int)):
                assert x == y, (ra, rb)
            else:
                assert x == pytest.approx(y, rel=rel, abs=1e-12), (ra, rb)


def test_one_rank_with_accumulation_equals_two_ranks(runs):
    one, two = _records(runs["one"]), _records(runs["two"])
    assert [r["global_step"] for r in one] == list(range(1, 7))
    assert [r["margins"]["n"] for r in two] == [8] * 6  # global batch: both ranks, all micro-batches
    betas = [r["beta_next"] for r in one]
    assert betas[:2] == [0.1, 0.1] and len(set(betas)) > 2  # warmup holds beta, then it moves
    _assert_same_trajectory(_trajectory(one), _trajectory(two), rel=1e-6)
    assert _records(runs["one"], "warmup_end")[0]["global_step"] == 2
    assert _records(runs["two"], "warmup_end")[0]["tau_0"] == pytest.approx(
        _records(runs["one"], "warmup_end")[0]["tau_0"], rel=1e-6)
    l1, l2 = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(l1) == list(range(1, 7))
    assert [l1[s] for s in sorted(l1)] == pytest.approx([l2[s] for s in sorted(l1)], rel=1e-5)


def test_resumed_run_continues_the_same_beta_trajectory(runs):
    state = json.load(open(runs["one"] / "checkpoint-3" / "dynamic_beta_state.json"))
    assert state["step"] == 3 and state["phase"] == "dynamic"
    resume_marks = [r for r in map(json.loads, open(runs["resumed"] / "logs" / "margins" / "margins.jsonl"))
                    if r["type"] == "resume"]
    assert resume_marks and resume_marks[0]["step"] == 3
    full, resumed = _trajectory(_records(runs["one"])), _trajectory(_records(runs["resumed"]))
    assert [r[0] for r in resumed] == [4, 5, 6]
    _assert_same_trajectory(resumed, full[3:], rel=1e-9)
    l_full, l_res = _losses(runs["one"]), _losses(runs["resumed"])
    assert [l_res[s] for s in (4, 5, 6)] == pytest.approx([l_full[s] for s in (4, 5, 6)], rel=1e-6)


def test_plot_margins_renders_a_png(runs, tmp_path):
    out = tmp_path / "m.png"
    subprocess.run([sys.executable, str(REPO / "scripts" / "plot_margins.py"), str(runs["resumed"]),
                    "--out", str(out)], check=True, cwd=REPO)
    assert out.stat().st_size > 10_000


def test_two_ranks_resume_last_skips_the_incomplete_checkpoint_and_logs_each_step_once(runs):
    """Losses, beta trajectory and margins log of the resumed 2-rank run equal the uninterrupted one."""
    log = open(runs["two_again_log"]).read()
    assert f"resuming from {runs['two'] / 'checkpoint-3'}" in log
    assert "dropped 3 records of steps after 3" in log  # the first run's steps 4-6, redone now
    before, after = _records(runs["two_first"]), _records(runs["two"])
    assert [r["global_step"] for r in after] == list(range(1, 7))  # no duplicate step
    _assert_same_trajectory(_trajectory(after), _trajectory(before), rel=0)
    assert [r["step"] for r in _records(runs["two"], "resume")] == [3]
    assert _losses(runs["two"]) == _losses(runs["two_first"])  # 2 ranks, dynamic beta: bit for bit
