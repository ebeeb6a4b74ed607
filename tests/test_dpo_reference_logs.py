"""The dynamic-DPO repositories' log files (opensloth.dpo.reference_logs), fed by the real controller."""

from __future__ import annotations

import ast
import json
import re

import numpy as np

from helpers import REFERENCE_MARGIN_STREAM
from opensloth.dpo.controller import DynamicBetaConfig, DynamicBetaController
from opensloth.dpo.reference_logs import MARGINS_LOG, RISK_FAIL_LOG, RISK_LOG, ReferenceLogWriter

STREAM = REFERENCE_MARGIN_STREAM
# The regular expression of dynamic-dpo-v1's fail_rate_from_running_logs notebook.
FAIL = re.compile(r"""['"]risk/fail['"]\s*[:=]\s*(-?\d+(?:\.\d+)?)""")


def _run(tmp_path, **writer_kw):
    config = DynamicBetaConfig(warmup_steps=2, alpha=0.5, risk_rule="hoeffding")
    controller = DynamicBetaController(config)
    writer = ReferenceLogWriter(str(tmp_path), **writer_kw)
    for update, margins in enumerate(STREAM):
        beta_old = controller.beta
        records = controller.observe_step(margins)
        writer(epoch=0, index=update, update=update, margins=margins, records=records, beta_old=beta_old,
               config=config, epoch_float=(update + 1) / 5)
    writer.close()
    return controller


def test_the_three_reference_files_and_the_fail_lines(tmp_path):
    controller = _run(tmp_path)
    lines = [json.loads(line) for line in open(tmp_path / MARGINS_LOG)]
    assert [list(r) for r in lines[:1]] == [["epoch", "step", "batch_size", "mean", "std", "min", "p10", "median",
                                              "p90", "max", "pos_frac", "npy", "sample"]]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4] and lines[2]["sample"] == STREAM[2]
    assert lines[2]["p90"] == 2.65 and lines[0]["pos_frac"] == 5 / 8  # linear quantile; share strictly > 0
    assert lines[0]["std"] == np.std(np.array(STREAM[0]))  # population std
    for rec, margins in zip(lines, STREAM):
        assert rec["npy"].endswith(f"epoch_000/step_{rec['step']:05d}.npy")
        saved = np.load(rec["npy"])
        assert saved.dtype == np.float32 and saved.tolist() == margins

    risk = [json.loads(line) for line in open(tmp_path / RISK_LOG)]
    assert risk[0] == {"type": "warmup_end", "tau_0": 1.25, "beta_0": 0.1, "warmup_steps": 2, "global_margin_n": 16}
    steps = risk[1:]
    assert [r["step"] for r in steps] == [2, 3, 4]  # no record during warmup; counts updates from 0
    assert set(steps[0]) == {"step", "tau", "p_hat", "risk_over", "beta", "beta_old", "beta_new", "u_k", "s_k",
                             "alpha", "global_margin_n"}
    assert [r["p_hat"] for r in steps] == [0.375, 0.0, 0.25]
    assert steps[0]["beta_old"] == 0.1 and all(r["beta"] == r["beta_new"] for r in steps)
    assert [r["beta_old"] for r in steps[1:]] == [r["beta_new"] for r in steps[:-1]]
    assert steps[-1]["beta_new"] == controller.beta

    text = open(tmp_path / RISK_FAIL_LOG).read().splitlines()
    assert len(text) == 5 and [FAIL.search(t) is not None for t in text] == [False, False, True, True, True]
    last = ast.literal_eval(text[-1])
    assert list(last) == ["dpo/beta", "dpo/margin_mean", "dpo/loss", "risk/p_hat", "risk/tau", "risk/fail",
                          "risk/u_k", "risk/s_k", "epoch"]
    assert last["risk/fail"] == 0 and last["epoch"] == 1.0


def test_newer_repository_fail_flag_and_sample_size(tmp_path):
    _run(tmp_path, sample_size=3, fail_rule="p_hat_above_delta")
    fails = [int(FAIL.search(t).group(1)) for t in open(tmp_path / RISK_FAIL_LOG) if FAIL.search(t)]
    assert fails == [1, 0, 1]  # p_hat 0.375, 0.0, 0.25 against delta 0.1
    assert all(len(json.loads(line)["sample"]) == 3 for line in open(tmp_path / MARGINS_LOG))
