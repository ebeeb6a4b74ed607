"""The dynamic-beta controller: hand-computed values, invariants, config (fast)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest

from opensloth.dpo.controller import (
    DynamicBetaConfig,
    DynamicBetaController,
    EMAUpdate,
    WarmupQuantileAccumulator,
    empirical_over_threshold_proportion,
    hoeffding_epsilon,
    margin_summary,
    quantile,
    risk_test,
    update_beta,
)

# --------------------------------------------------------------------------- pure functions


def test_quantile_hand_values():
    assert quantile([1, 2, 3, 4], 0.9) == pytest.approx(3.7)  # pos 2.7 -> 3 + 0.7 * (4 - 3)
    assert quantile([4, 1, 3, 2], 0.5) == pytest.approx(2.5)  # order does not matter
    assert quantile([5.0], 0.3) == 5.0
    assert quantile([1, 2, 3], 0.0) == 1 and quantile([1, 2, 3], 1.0) == 3
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


def test_quantile_matches_torch_linear():
    torch = pytest.importorskip("torch")
    rng = random.Random(0)
    for n in (1, 2, 7, 64, 301):
        values = [rng.gauss(0, 3) for _ in range(n)]
        for q in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
            expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q, interpolation="linear").item()
            assert quantile(values, q) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_p_hat_counts_strictly_above():
    assert empirical_over_threshold_proportion([1, 2, 3, 4], 2) == 0.5
    # A fresh LoRA adapter gives margins that are all exactly 0: none lies above tau = 0.
    assert empirical_over_threshold_proportion([0.0] * 8, 0.0) == 0.0
    assert empirical_over_threshold_proportion([], 0.0) == 0.0


def test_hoeffding_epsilon_hand_value():
    assert hoeffding_epsilon(64, 0.05) == pytest.approx(math.sqrt(math.log(20) / 128))
    with pytest.raises(ValueError):
        hoeffding_epsilon(0, 0.05)


def test_risk_test_hoeffding_published_rule():
    eps = hoeffding_epsilon(64, 0.05)
    r = risk_test(0.1, 64, delta=0.1, eps0=0.05, rule="hoeffding")
    assert r.u == pytest.approx(-1.0)  # the flaw: p_hat at its target gives u = -1
    assert not r.risk_over and r.threshold == pytest.approx(0.1 + eps)
    r = risk_test(0.4, 64, delta=0.1, eps0=0.05, rule="hoeffding")
    assert r.risk_over and r.u == pytest.approx((0.4 - 0.1 - eps) / eps)


def test_risk_test_deadband_is_neutral_inside_and_matches_hoeffding_above():
    eps = hoeffding_epsilon(64, 0.05)
    for p_hat in (0.0, 0.1, 0.1 + 0.99 * eps):
        assert risk_test(p_hat, 64, delta=0.1, eps0=0.05, rule="hoeffding_deadband").u == 0.0
    above = risk_test(0.4, 64, delta=0.1, eps0=0.05, rule="hoeffding_deadband")
    assert above.risk_over
    assert above.u == pytest.approx(risk_test(0.4, 64, delta=0.1, eps0=0.05, rule="hoeffding").u)
    # Below the band (needs n large enough that delta - eps > 0): symmetric decrease.
    eps_big = hoeffding_epsilon(10_000, 0.05)
    below = risk_test(0.1 - 2 * eps_big, 10_000, delta=0.1, eps0=0.05, rule="hoeffding_deadband")
    assert below.u == pytest.approx(-1.0)
    # deadband 0 is the centred rule u = (p_hat - delta) / eps
    assert risk_test(0.2, 64, delta=0.1, eps0=0.05, rule="hoeffding_deadband", deadband=0.0).u == pytest.approx(0.1 / eps)


def test_risk_test_zscore_hand_value():
    r = risk_test(0.16, 100, delta=0.1, eps0=0.05, rule="zscore")  # se = sqrt(0.09 / 100) = 0.03
    assert r.eps == pytest.approx(0.03)
    assert r.u == pytest.approx(2.0)
    assert r.risk_over  # 2.0 > z_0.95 = 1.645
    assert not risk_test(0.14, 100, delta=0.1, eps0=0.05, rule="zscore").risk_over  # u = 1.33
    with pytest.raises(ValueError):
        risk_test(0.1, 10, delta=0.1, eps0=0.05, rule="nope")


def test_update_beta_hand_value_and_clip():
    beta, s = update_beta(0.1, 1.0, alpha=0.0015, gamma=2.0, beta_min=0.0, beta_max=2.0)
    assert s == pytest.approx(math.tanh(2.0))
    assert beta == pytest.approx(0.1 * math.exp(0.0015 * math.tanh(2.0)))
    assert update_beta(1.9, 10.0, alpha=1.0, gamma=2.0, beta_min=0.0, beta_max=2.0)[0] == 2.0
    assert update_beta(0.1, -10.0, alpha=1.0, gamma=2.0, beta_min=0.05, beta_max=2.0)[0] == 0.05
    assert update_beta(0.1, 5.0, alpha=0.0, gamma=2.0, beta_min=0.0, beta_max=2.0)[0] == 0.1


def test_warmup_accumulator_and_ema():
    acc = WarmupQuantileAccumulator(0.9)
    assert acc.finalize() is None
    acc.update([1, 2, 3, 4])
    acc.update([5, 6, 7, 8])
    assert acc.finalize() == pytest.approx(7.3)  # pos 6.3 of 1..8
    ema = EMAUpdate(7.3, q=0.9, lam=0.05)
    assert ema.update([10, 20]) == pytest.approx(0.95 * 7.3 + 0.05 * 19.0)
    assert ema.update([]) == pytest.approx(0.95 * 7.3 + 0.05 * 19.0)  # no margins: unchanged


# --------------------------------------------------------------------------- controller


def _cfg(**kw):
    base = dict(beta_0=0.1, warmup_steps=2, q=0.9, delta=0.1, eps0=0.05, ema_lambda=0.5, gamma=2.0, alpha=0.5,
                beta_min=0.0, beta_max=2.0, risk_rule="hoeffding")
    base.update(kw)
    return DynamicBetaConfig(**base)


def test_controller_trajectory_hand_computed():
    ctrl = DynamicBetaController(_cfg())
    r0 = ctrl.observe_step([1, 2, 3, 4])
    assert [r["type"] for r in r0] == ["step"] and ctrl.beta == 0.1 and ctrl.tau is None
    r1 = ctrl.observe_step([5, 6, 7, 8])
    assert [r["type"] for r in r1] == ["warmup_end", "step"]
    assert r1[0]["tau_0"] == pytest.approx(7.3) and ctrl.beta == 0.1  # warmup never moves beta
    # Step 2, dynamic: tau = 0.5 * 7.3 + 0.5 * quantile([0, 0, 0, 10], 0.9) = 0.5 * 7.3 + 0.5 * 7 = 7.15
    # p_hat = 1/4; eps = sqrt(ln 20 / 8); u = (0.25 - 0.1 - eps) / eps; beta = 0.1 * exp(0.5 tanh(2u))
    rec = ctrl.observe_step([0, 0, 0, 10])[-1]
    eps = math.sqrt(math.log(20) / 8)
    u = (0.25 - 0.1 - eps) / eps
    assert rec["tau"] == pytest.approx(7.15)
    assert rec["p_hat"] == 0.25 and rec["u"] == pytest.approx(u) and not rec["risk_over"]
    assert rec["beta_used"] == 0.1
    assert rec["beta_next"] == pytest.approx(0.1 * math.exp(0.5 * math.tanh(2 * u)))
    assert ctrl.step == 3 and rec["step"] == 2


def test_nonfinite_margins_are_dropped_and_beta_stays_finite():
    ctrl = DynamicBetaController(_cfg(warmup_steps=1))
    ctrl.observe_step([0.5, float("nan"), 1.0])
    assert ctrl.warmup.values == [] and ctrl.tau == pytest.approx(quantile([0.5, 1.0], 0.9))
    rec = ctrl.observe_step([float("inf"), float("-inf"), 3.0, 0.1])[-1]
    assert rec["n_nonfinite"] == 2 and rec["margins"]["n"] == 2 and math.isfinite(ctrl.beta)
    beta, tau = ctrl.beta, ctrl.tau
    rec = ctrl.observe_step([float("nan")] * 4)[-1]
    assert rec.get("skipped") and ctrl.beta == beta and ctrl.tau == tau and ctrl.step == 3
    assert ctrl.nonfinite_total == 7


def test_warmup_without_finite_margins_starts_tau_at_zero():
    ctrl = DynamicBetaController(_cfg(warmup_steps=1))
    records = ctrl.observe_step([float("nan")])
    assert records[0]["type"] == "warmup_end" and records[0]["tau_0"] == 0.0 and ctrl.phase == "dynamic"


def test_update_ignores_the_order_of_margins():
    """Layouts differ only in the order margins arrive (ranks x micro-batches): no effect on the numbers."""
    rng = random.Random(3)
    steps = [[rng.gauss(0.3, 1) for _ in range(16)] for _ in range(12)]
    a, b = DynamicBetaController(_cfg(risk_rule="zscore")), DynamicBetaController(_cfg(risk_rule="zscore"))
    for margins in steps:
        shuffled = margins[:]
        rng.shuffle(shuffled)
        ra, rb = a.observe_step(margins), b.observe_step(shuffled)
        assert ra == rb


def test_state_dict_round_trip_continues_identically():
    rng = random.Random(1)
    steps = [[rng.gauss(0.2, 1) for _ in range(8)] for _ in range(10)]
    full = DynamicBetaController(_cfg(warmup_steps=4, risk_rule="zscore"))
    head = DynamicBetaController(_cfg(warmup_steps=4, risk_rule="zscore"))
    expected = [full.observe_step(m) for m in steps]
    for m in steps[:3]:  # stop inside warmup: the buffer must travel too
        head.observe_step(m)
    state = json.loads(json.dumps(head.state_dict()))
    resumed = DynamicBetaController(_cfg(warmup_steps=4, risk_rule="zscore"))
    resumed.load_state_dict(state)
    assert [resumed.observe_step(m) for m in steps[3:]] == expected[3:]
    other = DynamicBetaController(_cfg(warmup_steps=4, risk_rule="zscore", alpha=0.1))
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict(state)


def test_margin_summary_is_exact_and_order_free():
    s = margin_summary([3.0, 1.0, 2.0, 2.0])
    assert s["mean"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["pos_frac"] == 1.0
    assert s["std"] == pytest.approx(math.sqrt(0.5))
    assert margin_summary([]) == {"n": 0}


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"beta_0": 0.0}, "beta_0"),
        ({"q": 1.0}, "q"),
        ({"delta": 0.0}, "delta"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"risk_rule": "bogus"}, "risk_rule"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta_max": float("inf")}, "beta_max"),
        ({"beta_0": 3.0}, "beta_0"),
        ({"ema_lambda": 0.0}, "ema_lambda"),
    ],
)
def test_config_validation_names_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DynamicBetaConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    assert DynamicBetaConfig.from_dict({"alpha": 0.2}).alpha == 0.2
    with pytest.raises(ValueError, match="unknown"):
        DynamicBetaConfig.from_dict({"alpah": 0.2})
    assert "risk_rule" in DynamicBetaConfig.help_text()


# --------------------------------------------------------------------------- the flaw, measured


def test_published_hoeffding_rule_decays_beta_under_stationary_margins():
    from opensloth.dpo.simulation import drift_per_100

    base = DynamicBetaConfig(warmup_steps=50)
    hoeffding = drift_per_100(replace(base, risk_rule="hoeffding"), n=64, steps=600, seeds=1)
    deadband = drift_per_100(replace(base, risk_rule="hoeffding_deadband"), n=64, steps=600, seeds=1)
    zscore = drift_per_100(replace(base, risk_rule="zscore"), n=64, steps=600, seeds=1)
    # p_hat sits near delta, so u is near -1 and log(beta) falls by ~alpha * tanh(gamma) per step.
    assert hoeffding == pytest.approx(-100 * base.alpha * math.tanh(base.gamma), rel=0.1)
    assert abs(deadband) < 0.002
    assert abs(zscore) < abs(hoeffding) / 4
