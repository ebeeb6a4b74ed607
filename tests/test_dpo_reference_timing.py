"""The reference presets reproduce the published dynamic-beta runs on fixed margin streams.

Two checks per preset, on the stream of section 2.6 of the reference study
(five batches of eight margins, exact in float32):

- against an independent implementation written here from the published
  formulas (numpy's linear quantile, ``>=`` in p_hat, Hoeffding or z-score,
  the tanh / exp update, and each repository's timing): beta, tau, p_hat and the
  per-batch loss agree within 1e-12 (float64 on both sides);
- against the numbers the repositories' own functions printed (float32 quantile
  and comparison, hence the 1e-6 tolerance on tau and the loss; p_hat, u, s and
  beta are identical because no margin lies within float32 rounding of tau).

The default timing (``step``) keeps its meaning: the same betas, one batch later.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import REFERENCE_MARGIN_STREAM
from opensloth.dpo.controller import DynamicBetaConfig
from opensloth.dpo.timing import replay

STREAM = REFERENCE_MARGIN_STREAM


def _loss(margins, beta):
    return float(np.mean([math.log1p(math.exp(-beta * m)) for m in margins]))


def published(stream, *, rule, timing, delta, lam, beta_0, gamma, alpha, warmup, eps0=0.05, beta_min=0.0,
              beta_max=2.0):
    """The reference loops, from their formulas: warmup pools margins for tau_0 = quantile(pool, 1 - delta)."""
    q = 1.0 - delta
    pool, tau, beta, out = [], None, beta_0, []
    for k, m in enumerate(stream):
        n = len(m)
        if k < warmup:
            pool.extend(m)
            if k == warmup - 1:
                tau = float(np.quantile(np.array(pool), q))
            out.append({"beta_used": beta_0, "tau": tau, "p_hat": None, "loss": _loss(m, beta_0)})
            continue
        tau = (1 - lam) * tau + lam * float(np.quantile(np.array(m), q))
        p_hat = sum(x >= tau for x in m) / n
        if rule == "hoeffding":
            eps = math.sqrt(math.log(1 / eps0) / (2 * n))
            u = (p_hat - (delta + eps)) / eps
        else:
            u = (p_hat - delta) / math.sqrt(delta * (1 - delta) / n)
        s = math.tanh(gamma * u)
        old = beta
        beta = max(beta_min, min(beta * math.exp(alpha * s), beta_max))
        used = beta if timing == "same_batch" else old
        out.append({"beta_used": used, "beta_next": beta, "tau": tau, "p_hat": p_hat, "u": u, "s": s,
                    "loss": _loss(m, used)})
    return out


OLD = dict(delta=0.1, lam=0.05, beta_0=0.1, gamma=2.0, alpha=0.5, warmup=2)
NEW = dict(delta=0.1, lam=0.1, beta_0=0.1, gamma=2.0, alpha=0.005, warmup=2)


def _config(preset, p):
    return DynamicBetaConfig(preset=preset, delta=p["delta"], ema_lambda=p["lam"], beta_0=p["beta_0"],
                             gamma=p["gamma"], alpha=p["alpha"], warmup_steps=p["warmup"])


def _compare(ours, theirs, tol):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a["beta_used"] == pytest.approx(b["beta_used"], abs=tol, rel=0)
        assert a["loss"] == pytest.approx(b["loss"], abs=tol, rel=0)
        if b["p_hat"] is not None:
            assert a["p_hat"] == b["p_hat"]
            assert a["tau"] == pytest.approx(b["tau"], abs=tol, rel=0)
            assert a["beta_next"] == pytest.approx(b["beta_next"], abs=tol, rel=0)


@pytest.mark.parametrize("preset, params, rule, timing", [
    ("reference", OLD, "hoeffding", "same_batch"),
    ("reference", {**OLD, "alpha": 0.0015}, "hoeffding", "same_batch"),
    ("reference_v1", NEW, "zscore", "micro_batch"),
])
def test_presets_match_an_independent_implementation(preset, params, rule, timing):
    config = _config(preset, params)
    assert (config.risk_rule, config.beta_timing, config.p_hat_inclusive, config.q) == (rule, timing, True, 0.9)
    _compare(replay(config, STREAM), published(STREAM, rule=rule, timing=timing, **params), 1e-12)


def test_reference_preset_matches_the_repository_numbers():
    """SeanYHan888/dynamic_beta training.py on the stream (alpha 0.5): beta used in the same batch's loss."""
    ours = replay(_config("reference", OLD), STREAM)
    assert [r["phase"] for r in ours] == ["warmup", "warmup", "dynamic", "dynamic", "dynamic"]
    expected_tau = [1.3199999928474426, 1.2702499896287918, 1.292987479418516]
    expected_u = [-0.3644624929704352, -1.231104548010751, -0.6533431779838738]
    expected_s = [-0.6224072266233381, -0.9855709491919415, -0.8634345630551606]
    expected_beta = [0.07325647007580954, 0.044754012167690996, 0.029062939812106794]
    expected_loss = [0.6817725300788879, 0.670086681842804, 0.6508333086967468, 0.695996105670929,
                     0.6814623475074768]
    dynamic = ours[2:]
    assert [r["p_hat"] for r in dynamic] == [0.375, 0.0, 0.25]
    assert [r["u"] for r in dynamic] == pytest.approx(expected_u, abs=1e-12)
    assert [r["s"] for r in dynamic] == pytest.approx(expected_s, abs=1e-12)
    assert [r["beta_used"] for r in dynamic] == pytest.approx(expected_beta, abs=1e-12)
    assert [r["tau"] for r in dynamic] == pytest.approx(expected_tau, abs=1e-6)
    assert [r["loss"] for r in ours] == pytest.approx(expected_loss, abs=1e-6)
    slow = replay(_config("reference", {**OLD, "alpha": 0.0015}), STREAM)[2:]
    assert [r["beta_used"] for r in slow] == pytest.approx(
        [0.099906682483907, 0.09975909391920895, 0.09962997437746088], abs=1e-12)
    assert [r["loss"] for r in slow] == pytest.approx([0.6363062858581543, 0.699639618396759, 0.6541050672531128],
                                                      abs=1e-6)


def test_reference_v1_preset_matches_the_repository_numbers():
    """dynamic-dpo-v1 RiskBetaDPOTrainer.compute_loss: the loss uses the beta from before the micro-batch."""
    ours = replay(_config("reference_v1", NEW), STREAM)
    assert [r["beta_used"] for r in ours] == pytest.approx(
        [0.1, 0.1, 0.1, 0.10050122059878737, 0.10002247662455627], abs=1e-12)
    assert [r["beta_next"] for r in ours[2:]] == pytest.approx(
        [0.10050122059878737, 0.10002247662455627, 0.10052034187203089], abs=1e-12)
    assert [r["u"] for r in ours[2:]] == pytest.approx([2.592724864350674, -0.9428090415820634, 1.414213562373095],
                                                       abs=1e-12)
    assert [r["tau"] for r in ours[2:]] == pytest.approx([1.3899999856948853, 1.2834999799728393, 1.327649960517883],
                                                         abs=1e-6)
    assert [r["loss"] for r in ours] == pytest.approx(
        [0.6817725300788879, 0.670086681842804, 0.636256217956543, 0.6996898055076599, 0.653956949710846], abs=1e-6)


def test_ties_count_with_greater_or_equal():
    """All margins equal tau: the reference counts them (p_hat 1), the default rule does not (p_hat 0)."""
    ties = [[0.25] * 8, [0.25] * 8]
    old = replay(_config("reference", {**OLD, "warmup": 1}), ties)[1]
    assert (old["p_hat"], old["risk_over"]) == (1.0, True)
    assert old["u"] == pytest.approx(1.0799409320967577, abs=1e-12)
    assert old["beta_used"] == pytest.approx(0.16272176951834566, abs=1e-12)
    assert old["loss"] == pytest.approx(0.6730137467384338, abs=1e-6)
    new = replay(_config("reference_v1", {**NEW, "alpha": 0.5, "warmup": 1}), ties)[1]
    assert new["u"] == pytest.approx(8.48528137423857, abs=1e-9)
    assert (new["beta_used"], new["beta_next"]) == pytest.approx((0.1, 0.16487212707001253), abs=1e-12)
    strict = replay(DynamicBetaConfig(warmup_steps=1, alpha=0.5, risk_rule="hoeffding"), ties)[1]
    assert strict["p_hat"] == 0.0


def test_default_timing_uses_the_same_betas_one_step_later():
    step = replay(DynamicBetaConfig(warmup_steps=2, alpha=0.5, risk_rule="hoeffding", p_hat_inclusive=True), STREAM)
    same = replay(_config("reference", OLD), STREAM)
    assert [r["beta_next"] for r in step] == pytest.approx([r["beta_next"] for r in same], abs=1e-15)
    assert [r["beta_used"] for r in step] == pytest.approx(
        [0.1, 0.1, 0.1, 0.07325647007580954, 0.044754012167690996], abs=1e-12)
    assert step[2]["loss"] == pytest.approx(0.6362562711361365, abs=1e-9)


def test_presets_refuse_contradicting_settings():
    with pytest.raises(ValueError, match="contradicts preset 'reference'"):
        DynamicBetaConfig(preset="reference", risk_rule="zscore")
    with pytest.raises(ValueError, match="q=0.8.*contradicts"):
        DynamicBetaConfig(preset="reference", q=0.8)  # delta 0.1 -> q 0.9
    assert DynamicBetaConfig(preset="reference", delta=0.2).q == 0.8
    with pytest.raises(ValueError, match="beta_timing"):
        DynamicBetaConfig(beta_timing="sometimes")
