"""scripts/sanity_report.py passes matching curves and exits 1 on a deviating one."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def _write_run(root, name, losses, betas=None):
    run = root / name
    run.mkdir(parents=True)
    history = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    history.append({"step": len(losses), "eval_loss": losses[-1] + 0.1})
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    if betas is not None:
        (run / "logs" / "margins").mkdir(parents=True)
        (run / "logs" / "margins" / "margins.jsonl").write_text(
            "".join(json.dumps({"type": "step", "step": i, "beta_used": b}) + "\n" for i, b in enumerate(betas)))


def _report(root, *extra):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "sanity_report.py"), "--root", str(root), *extra],
                          capture_output=True, text=True)


def test_matching_curves_pass(tmp_path):
    _write_run(tmp_path, "sft_plain_ws1_nopatches", [2.0, 1.5, 1.2])  # the folder of a --no_patches run
    _write_run(tmp_path, "sft_patched_ws2", [2.0, 1.5 + 1e-6, 1.2])
    proc = _report(tmp_path, "--tasks", "sft", "--tolerance", "1e-3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| sft | patched_ws2 | plain_ws1 | 3 |" in proc.stdout


def test_deviating_loss_or_beta_fails(tmp_path):
    _write_run(tmp_path, "dpo_plain_ws1_nopatches", [0.69, 0.68])
    _write_run(tmp_path, "dpo_patched_ws1", [0.69, 0.67], betas=[0.1, 0.11])
    _write_run(tmp_path, "dpo_patched_ws2", [0.69, 0.67], betas=[0.1, 0.12])  # beta trajectory differs
    _write_run(tmp_path, "dpo_plain_ws4_nopatches", [0.69, 0.70])             # loss differs
    proc = _report(tmp_path, "--tasks", "dpo", "--tolerance", "1e-3")
    assert proc.returncode == 1
    assert "dpo_patched_ws2: beta deviates" in proc.stderr
    assert "dpo_plain_ws4: loss deviates" in proc.stderr


import pytest  # noqa: E402


@pytest.mark.slow
@pytest.mark.heavy
def test_sanity_matrix_script_passes(tmp_path):
    """The full matrix (SFT + DPO, 1/2/4 ranks, the reference config), short: exits 0 and draws the figure."""
    from helpers import clean_env

    env = clean_env(OUT=str(tmp_path / "sanity"), STEPS="5", PNG=str(tmp_path / "sanity.png"),
                    PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/sanity_check_training.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and (tmp_path / "sanity.png").exists()
    for row in ("| sft | patched_ws4 |", "| dpo | patched_ws4 |", "| dpo | plain_ws4 |", "| dporef | reference_ws2 |"):
        assert row in proc.stdout
