"""The risk-rule registry (opensloth.dpo.rules): hand-computed values, and what the controller does with each rule (fast)."""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import replace

import pytest

from opensloth.dpo.controller import RISK_RULES, DynamicBetaConfig, DynamicBetaController
from opensloth.dpo.rules import (
    RULES,
    Rule,
    RuleStep,
    StepSignals,
    beta_dpo_filter_weights,
    calibrated_temperature,
    ema_corrected,
    fmean,
    fstd,
    get_rule,
    kl_estimate,
    register,
)

ALL_RULES = ("hoeffding", "zscore", "hoeffding_deadband", "beta_dpo", "beta_dpo_filter", "kl_target", "calibration_floor")


def _sig(margins, chosen=None, rejected=None, *, p_hat=None, in_warmup=False, step=0):
    return StepSignals(step=step, in_warmup=in_warmup, margins=tuple(margins),
                       chosen_logratios=None if chosen is None else tuple(chosen),
                       rejected_logratios=None if rejected is None else tuple(rejected), p_hat=p_hat)


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_rule_once_and_refuses_duplicates():
    assert tuple(RULES) == ALL_RULES == RISK_RULES
    assert get_rule("zscore").name == "zscore"
    with pytest.raises(ValueError, match="calibration_floor"):  # the message lists the known rules
        get_rule("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(Rule("zscore", RULES["zscore"].update, "again"))
    assert [r for r in RULES if RULES[r].needs_logratios] == ["kl_target"]
    assert [r for r in RULES if RULES[r].pair_weights is not None] == ["beta_dpo_filter"]


def test_exact_statistics_do_not_depend_on_order():
    values = [1e16, 1.0, -1e16, 3.0, 2.5]
    assert fmean(values) == 6.5 / 5 == fmean(list(reversed(values)))  # a naive sum loses the 1.0
    assert fstd([1.0, 2.0, 3.0], ddof=1) == 1.0 and fstd([5.0], ddof=1) == 0.0
    assert ema_corrected(0.1 * 2.0, 1, 0.9) == pytest.approx(2.0) and ema_corrected(0.0, 0, 0.9) == 0.0


# --------------------------------------------------------------------------- p_hat rules: the published formulas


def _published_hoeffding_run(cfg, stream):
    """Independent implementation of the published controller (hoeffding rule), written from its formulas."""
    warm, tau, beta, out = [], None, cfg.beta_0, []
    for t, margins in enumerate(stream):
        if t < cfg.warmup_steps:
            warm += margins
            if t == cfg.warmup_steps - 1:
                xs = sorted(warm)
                pos = cfg.q * (len(xs) - 1)
                lo = math.floor(pos)
                tau = xs[lo] + (pos - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])
            out.append(beta)
            continue
        xs = sorted(margins)
        pos = cfg.q * (len(xs) - 1)
        lo = math.floor(pos)
        tau = (1 - cfg.ema_lambda) * tau + cfg.ema_lambda * (xs[lo] + (pos - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo]))
        p_hat = sum(1 for m in margins if m > tau) / len(margins)
        eps = math.sqrt(math.log(1 / cfg.eps0) / (2 * len(margins)))
        u = (p_hat - (cfg.delta + eps)) / eps
        beta = min(max(beta * math.exp(cfg.alpha * math.tanh(cfg.gamma * u)), cfg.beta_min), cfg.beta_max)
        out.append(beta)
    return out


def test_hoeffding_rule_is_bit_identical_to_the_published_formulas():
    cfg = DynamicBetaConfig(risk_rule="hoeffding", warmup_steps=5, alpha=0.05)
    rng = random.Random(11)
    stream = [[(1 + t / 50) * rng.gauss(0.4, 1.0) for _ in range(24)] for t in range(120)]
    ctrl = DynamicBetaController(cfg)
    got = [ctrl.observe_step(m)[-1]["beta_next"] for m in stream]
    assert got == _published_hoeffding_run(cfg, stream)  # exact equality, not approx


def test_p_hat_rules_leave_beta_alone_without_p_hat():
    cfg = DynamicBetaConfig(risk_rule="zscore")
    out = RULES["zscore"].update(cfg, {}, 0.1, _sig([1.0, 2.0], in_warmup=True))
    assert out.beta == 0.1 and out.u == 0.0 and not out.risk_over


# --------------------------------------------------------------------------- beta-DPO


def test_beta_dpo_hand_values():
    cfg = DynamicBetaConfig(risk_rule="beta_dpo", beta_0=0.1, beta_dpo_a=0.6, beta_dpo_momentum=0.9)
    rule = RULES["beta_dpo"]
    state = rule.initial_state(cfg)
    # step 1: mean 2, unbiased std 1; corrected running mean = 2 -> beta = beta_0
    out = rule.update(cfg, state, 0.1, _sig([1.0, 2.0, 3.0]))
    assert out.state == {"k": 1, "m_ema": pytest.approx(0.2), "sd_ema": pytest.approx(0.1)}
    assert out.beta == pytest.approx(0.1) and out.record["m_run"] == pytest.approx(2.0)
    assert rule.update(cfg, state, 0.1, _sig([1.0, 2.0, 3.0])).state == out.state  # the input state is not mutated
    # step 2: mean 5; m_ema = 0.9 * 0.2 + 0.1 * 5 = 0.68, corrected 0.68 / 0.19; u = 0.6 (5 - 0.68 / 0.19)
    out2 = rule.update(cfg, out.state, out.beta, _sig([4.0, 6.0]))
    u = 0.6 * (5.0 - 0.68 / 0.19)
    assert out2.u == pytest.approx(u) and out2.beta == pytest.approx(0.1 * (1 + u))
    assert out2.record["sd_run"] == pytest.approx((0.9 * 0.1 + 0.1 * math.sqrt(2)) / 0.19)
    # a batch far below the running mean: 1 + u < 0, so the floor beta_dpo_min holds
    out3 = rule.update(cfg, out2.state, out2.beta, _sig([-50.0, -60.0]))
    assert out3.beta == cfg.beta_dpo_min


def test_beta_dpo_filter_weights_hand_values():
    z = statistics.NormalDist().inv_cdf(0.9)  # fraction 0.2 -> keep |M - m_run| <= 1.2816 sd_run
    assert z == pytest.approx(1.2816, abs=1e-4)
    margins = [2.0, 3.2, 0.8, 3.4, 0.5, -1.0]
    assert beta_dpo_filter_weights(margins, 2.0, 1.0, 0.2) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert beta_dpo_filter_weights(margins, 2.0, 0.0, 0.2) == [1.0] * 6  # no statistics yet
    assert beta_dpo_filter_weights(margins, 2.0, 1.0, 0.0) == [1.0] * 6


def test_beta_dpo_filter_uses_the_kept_pairs_for_beta():
    cfg = DynamicBetaConfig(risk_rule="beta_dpo_filter", beta_0=0.1)
    state = {"k": 1, "m_ema": 0.2, "sd_ema": 0.1}  # corrected: m_run 2, sd_run 1
    margins = [2.0, 3.0, 10.0]  # 10 is an outlier: weight 0
    assert RULES["beta_dpo_filter"].pair_weights(cfg, state, margins) == [1.0, 1.0, 0.0]
    out = RULES["beta_dpo_filter"].update(cfg, state, 0.1, _sig(margins))
    m_ema = 0.9 * 0.2 + 0.1 * 5.0
    u = 0.6 * (2.5 - m_ema / (1 - 0.81))  # mean of the kept pairs (2.5) against the running mean of all
    assert out.u == pytest.approx(u) and out.record["kept_frac"] == pytest.approx(2 / 3)
    plain = RULES["beta_dpo"].update(replace(cfg, risk_rule="beta_dpo"), state, 0.1, _sig(margins))
    assert plain.u == pytest.approx(0.6 * (5.0 - m_ema / 0.19))


# --------------------------------------------------------------------------- KL target


def test_kl_estimates_hand_values():
    assert kl_estimate([-1.0, -2.0, -3.0, -4.0], "reverse") == 2.5
    # importance terms w rho - w + 1: rho = 0 -> 0; rho = ln 2 -> 2 ln 2 - 1
    assert kl_estimate([0.0, math.log(2.0)], "importance") == pytest.approx((2 * math.log(2) - 1) / 2)
    assert kl_estimate([-50.0], "importance") == pytest.approx(1.0, abs=1e-15)  # w -> 0: the term -> 1
    with pytest.raises(ValueError):
        kl_estimate([0.0], "forward")


def test_kl_target_hand_values():
    cfg = DynamicBetaConfig(risk_rule="kl_target", kl_target=2.0, kl_horizon=10.0, beta_0=0.1)
    rule = RULES["kl_target"]
    out = rule.update(cfg, {}, 0.1, _sig([2.0, 2.0], chosen=[-1.0, -2.0], rejected=[-3.0, -4.0]))
    # estimate 2.5: error 2.5/2 - 1 = 0.25, clipped to 0.2; step 0.2 * 2 pairs / 10
    assert out.record["kl_estimate"] == 2.5 and out.u == 0.2 and out.beta == pytest.approx(0.1 * 1.04)
    assert out.risk_over
    out = rule.update(cfg, {}, 0.1, _sig([0.0], chosen=[-1.9], rejected=[-1.9]))  # error -0.05: no clip
    assert out.u == pytest.approx(-0.05) and out.beta == pytest.approx(0.1 * (1 - 0.05 / 10))


# --------------------------------------------------------------------------- calibration floor


def test_calibrated_temperature_closed_form_and_edges():
    # margins [2, -1]: g(b) = 2 sigmoid(-2b) - sigmoid(b) = 0  <=>  x^3 - x - 2 = 0 with x = e^b
    x = 1.5
    for _ in range(50):
        x -= (x ** 3 - x - 2) / (3 * x ** 2 - 1)
    assert calibrated_temperature([2.0, -1.0]) == pytest.approx(math.log(x), rel=1e-12)
    assert calibrated_temperature([-1.0, 2.0]) == calibrated_temperature([2.0, -1.0])  # order-free
    # scaling every margin by k divides the temperature by k
    assert calibrated_temperature([20.0, -10.0]) == pytest.approx(math.log(x) / 10, rel=1e-12)
    assert calibrated_temperature([1.0, -1.0]) is None  # sum <= 0: no positive temperature explains the labels
    assert calibrated_temperature([0.0, 0.0]) is None
    assert calibrated_temperature([]) is None
    assert calibrated_temperature([1.0, 2.0]) == 1e6  # no negative margin: the upper end of the range
    assert calibrated_temperature([1.0, 0.0]) == 1e6


def test_calibrated_temperature_maximises_the_label_likelihood():
    rng = random.Random(2)
    margins = [rng.gauss(2.0, 4.0) for _ in range(64)]
    assert math.fsum(margins) > 0 and min(margins) < 0
    b = calibrated_temperature(margins)

    def loglik(beta):
        return math.fsum(-math.log1p(math.exp(-beta * m)) for m in margins)

    assert loglik(b) > loglik(b * 1.01) and loglik(b) > loglik(b / 1.01)


def test_calibration_floor_hand_values():
    cfg = DynamicBetaConfig(risk_rule="calibration_floor", calib_r_min=0.3, calib_rate=0.02, gamma=2.0, ema_lambda=0.05)
    rule = RULES["calibration_floor"]
    bstar = calibrated_temperature([2.0, -1.0])
    out = rule.update(cfg, rule.initial_state(cfg), 0.01, _sig([2.0, -1.0]))
    u = math.log(0.3 * bstar / 0.01)
    assert out.state["log_beta_star"] == pytest.approx(math.log(bstar))
    assert out.u == pytest.approx(u) and out.risk_over
    assert out.beta == pytest.approx(0.01 * math.exp(0.02 * math.tanh(2 * u)))
    assert out.record["floor"] == pytest.approx(0.3 * bstar)
    # above the floor: beta does not move (the rule never lowers beta)
    high = rule.update(cfg, out.state, 0.2, _sig([2.0, -1.0]))
    assert high.beta == 0.2 and high.u == 0.0 and not high.risk_over
    # the EMA runs in log space; a step without a temperature leaves it alone
    lb = math.log(bstar)
    nxt = rule.update(cfg, out.state, 0.2, _sig([20.0, -10.0]))
    assert nxt.state["log_beta_star"] == pytest.approx(0.95 * lb + 0.05 * (lb - math.log(10)))
    assert rule.update(cfg, out.state, 0.2, _sig([1.0, -2.0])).state == out.state
    # nor does a step without a negative margin (beta* at the top of the range says nothing about it)
    skipped = rule.update(cfg, out.state, 0.01, _sig([1.0, 2.0, 0.5]))
    assert skipped.state == out.state and skipped.record["beta_star"] is None
    assert skipped.beta == pytest.approx(out.beta)  # the floor still acts on the remembered temperature


# --------------------------------------------------------------------------- the controller with each rule


def _stream(seed=0, steps=40, n=16):
    rng = random.Random(seed)
    out = []
    for t in range(steps):
        chosen = [rng.gauss(-0.05 * t, 1.0) for _ in range(n)]
        rejected = [c - (1 + t / 20) * rng.gauss(0.6, 1.0) for c in chosen]
        out.append(([c - r for c, r in zip(chosen, rejected)],
                    {"chosen_logratios": chosen, "rejected_logratios": rejected}))
    return out


def _cfg(rule, **kw):
    return DynamicBetaConfig(risk_rule=rule, warmup_steps=5, alpha=0.05, kl_horizon=200.0, kl_target=1.0, **kw)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_every_rule_is_layout_invariant(rule):
    """Layouts differ only in the order the pairs arrive: every record and every pair weight is unchanged."""
    rng = random.Random(7)
    a, b = DynamicBetaController(_cfg(rule)), DynamicBetaController(_cfg(rule))
    for margins, extras in _stream():
        order = list(range(len(margins)))
        rng.shuffle(order)
        shuffled = [margins[i] for i in order]
        shuffled_extras = {k: [v[i] for i in order] for k, v in extras.items()}
        wa, wb = a.pair_weights(margins), b.pair_weights(shuffled)
        if wa is not None:
            assert [wa[i] for i in order] == wb
        assert a.observe_step(margins, extras) == b.observe_step(shuffled, shuffled_extras)
    assert a.digest() == b.digest()


@pytest.mark.parametrize("rule", ALL_RULES)
def test_every_rule_resumes_exactly(rule):
    stream = _stream(seed=1)
    full, head = DynamicBetaController(_cfg(rule)), DynamicBetaController(_cfg(rule))
    expected = [full.observe_step(m, e) for m, e in stream]
    for m, e in stream[:8]:
        head.observe_step(m, e)
    resumed = DynamicBetaController(_cfg(rule))
    resumed.load_state_dict(json.loads(json.dumps(head.state_dict())))
    assert [resumed.observe_step(m, e) for m, e in stream[8:]] == expected[8:]
    assert math.isfinite(full.beta) and full.config.beta_min <= full.beta <= full.config.beta_max


@pytest.mark.parametrize("rule", ALL_RULES)
def test_warmup_holds_beta_unless_the_rule_acts_in_warmup(rule):
    ctrl = DynamicBetaController(_cfg(rule))
    betas = [ctrl.observe_step(m, e)[-1]["beta_next"] for m, e in _stream()[:5]]
    if RULES[rule].acts_in_warmup:
        assert betas != [0.1] * 5  # beta_dpo and kl_target are published without a warmup
    else:
        assert betas == [0.1] * 5


def test_calibration_floor_primes_during_warmup_and_raises_a_small_beta_after():
    ctrl = DynamicBetaController(_cfg("calibration_floor", beta_0=0.001))
    records = [ctrl.observe_step(m, e)[-1] for m, e in _stream()]
    assert all(r["beta_next"] == 0.001 for r in records[:5]) and records[4]["beta_star_ema"] is not None
    betas = [r["beta_next"] for r in records[5:]]
    assert betas[-1] > 0.001 and all(y >= x for x, y in zip(betas, betas[1:]))  # only ever raised


def test_rules_that_need_logratios_refuse_margins_alone():
    ctrl = DynamicBetaController(_cfg("kl_target"))
    with pytest.raises(ValueError, match="chosen_logratios"):
        ctrl.observe_step([1.0, 2.0])
    with pytest.raises(ValueError, match="has 1 values for 2 margins"):
        ctrl.observe_step([1.0, 2.0], {"chosen_logratios": [0.0], "rejected_logratios": [0.0, 0.0]})
    with pytest.raises(ValueError, match="unknown extras"):
        ctrl.observe_step([1.0], {"chosen": [0.0]})


def test_a_nonfinite_logratio_drops_its_pair():
    ctrl = DynamicBetaController(_cfg("kl_target"))
    rec = ctrl.observe_step([1.0, 2.0, 3.0], {"chosen_logratios": [-1.0, float("nan"), -3.0],
                                              "rejected_logratios": [-2.0, -4.0, -6.0]})[-1]
    assert rec["n_nonfinite"] == 1 and rec["margins"]["n"] == 2
    assert rec["kl_estimate"] == pytest.approx(3.0)  # -(-1 - 3 - 2 - 6) / 4


def test_pair_weights_only_for_the_filter_rule():
    assert DynamicBetaController(_cfg("beta_dpo")).pair_weights([1.0, 2.0]) is None
    ctrl = DynamicBetaController(_cfg("beta_dpo_filter"))
    assert ctrl.pair_weights([1.0, float("nan")]) == [1.0, 1.0]  # no statistics yet; NaN: weight 1
    for m, e in _stream()[:10]:
        ctrl.observe_step(m, e)
    weights = ctrl.pair_weights([-1000.0, ctrl.rule_state["m_ema"] / (1 - 0.9 ** ctrl.rule_state["k"])])
    assert weights == [0.0, 1.0]


def test_version_1_state_loads_for_p_hat_rules():
    ctrl = DynamicBetaController(_cfg("zscore"))
    for m, e in _stream()[:7]:
        ctrl.observe_step(m)
    state = ctrl.state_dict()
    state["version"] = 1
    del state["rule_state"]
    other = DynamicBetaController(_cfg("zscore"))
    other.load_state_dict(state)
    assert other.digest() == ctrl.digest()


def test_a_custom_rule_plugs_in():
    """One function and one register() call: the controller uses it (and the registry forgets it afterwards)."""

    def halve(cfg, state, beta, sig):
        return RuleStep(beta / 2, {"calls": state.get("calls", 0) + 1}, -1.0, -1.0, False)

    register(Rule("halve_for_test", halve, "test rule", acts_in_warmup=True))
    try:
        ctrl = DynamicBetaController(DynamicBetaConfig(risk_rule="halve_for_test"))
        ctrl.observe_step([1.0])
        ctrl.observe_step([1.0])
        assert ctrl.beta == pytest.approx(0.025) and ctrl.rule_state == {"calls": 2}
    finally:
        del RULES["halve_for_test"]
