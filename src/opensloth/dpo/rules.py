"""Risk rules of the dynamic-beta controller: one registry entry per rule, each a pure function.

Standard library only. A rule maps ``(config, state, beta, signals)`` to a
:class:`RuleStep` (the beta of the next optimizer step, the rule's new state
and the values to log). It never mutates its inputs, reads no clock and no
global, and uses only order-independent statistics of the step's pairs
(``math.fsum`` sums, sorted quantiles), so every rank computes the same beta
from the same multiset of pairs, whatever the layout (ranks x gradient
accumulation x micro-batch).

:data:`RULES` is the registry; :class:`opensloth.dpo.controller.DynamicBetaController`
looks ``config.risk_rule`` up there. The math of each rule, the evidence
behind its defaults and its measured behaviour are in docs/dynamic_beta_rules.md
and docs/dynamic_beta.md.

A new rule is one function plus one :func:`register` call::

    def _my_rule(cfg, state, beta, sig):
        ...
        return RuleStep(beta=new_beta, state=new_state, u=u, s=s, risk_over=flag, eps=None, record={...})

    register(Rule("my_rule", _my_rule, summary="one line for the docs and --help"))

Rules that need the chosen and rejected log-ratios (``logp - ref_logp`` of each
completion) set ``needs_logratios``; the trainer must then pass them (see
``DynamicBetaController.observe_step``). A rule that filters pairs supplies
``pair_weights``: a pure function of the state at the *start* of the step and
each pair's own margin, so a pair's weight does not depend on which
micro-batch or rank it lands in.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

# --------------------------------------------------------------------------- data passed to and from a rule


@dataclass(frozen=True)
class StepSignals:
    """What a rule sees of one optimizer step (finite values of the whole global batch).

    ``margins[i] = chosen_logratios[i] - rejected_logratios[i]`` when the
    log-ratios are given. ``tau`` and ``p_hat`` come from the controller's
    quantile machinery (None while it is in warmup). ``weights`` are the pair
    weights the loss used in this step (None: every pair counted fully).
    """

    step: int
    in_warmup: bool
    margins: tuple[float, ...]
    chosen_logratios: tuple[float, ...] | None = None
    rejected_logratios: tuple[float, ...] | None = None
    tau: float | None = None
    p_hat: float | None = None
    weights: tuple[float, ...] | None = None

    @property
    def n(self) -> int:
        return len(self.margins)


@dataclass(frozen=True)
class RuleStep:
    """Outcome of one rule update."""

    beta: float  # beta of the next optimizer step
    state: dict  # the rule's new state (JSON-serialisable, plain floats)
    u: float  # signed drive: > 0 pushes beta up
    s: float  # the step actually applied (rule-specific units; 0 = beta unchanged)
    risk_over: bool  # the rule's alarm (over-optimisation suspected)
    eps: float | None = None  # tolerance of the p_hat tests (Hoeffding eps / z-test standard error)
    record: dict = field(default_factory=dict)  # extra values for the step log


RuleFn = Callable[[Any, Mapping, float, StepSignals], RuleStep]
WeightFn = Callable[[Any, Mapping, Sequence[float]], list]


@dataclass(frozen=True)
class Rule:
    """One registry entry.

    Attributes:
        name: the ``risk_rule`` value that selects it.
        update: the pure update function.
        summary: one line (docs, ``--help``).
        needs_logratios: the rule reads ``chosen_logratios`` / ``rejected_logratios``.
        acts_in_warmup: the rule may move beta during the controller's warmup
            (rules published without a warmup); otherwise beta stays at
            ``beta_0`` there while the rule still sees every step.
        pair_weights: per-pair loss weights for the next step, or None.
        initial_state: the state before the first step.
    """

    name: str
    update: RuleFn
    summary: str
    needs_logratios: bool = False
    acts_in_warmup: bool = False
    pair_weights: WeightFn | None = None
    initial_state: Callable[[Any], dict] = lambda cfg: {}


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` to :data:`RULES`; a second rule with the same name is an error."""
    if rule.name in RULES:
        raise ValueError(f"risk rule {rule.name!r} is already registered")
    RULES[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    """The registered rule ``name``; ValueError listing the known rules otherwise."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown risk rule {name!r}; expected one of {tuple(RULES)}") from None


# --------------------------------------------------------------------------- shared pieces


def fmean(values: Sequence[float]) -> float:
    """Exact-sum mean (``math.fsum``): the same bits in every order."""
    return math.fsum(values) / len(values)


def fstd(values: Sequence[float], ddof: int = 0) -> float:
    """Standard deviation from exact sums (0.0 when ``len(values) <= ddof``)."""
    n = len(values)
    if n <= ddof:
        return 0.0
    mean = fmean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - ddof))


def update_beta(beta: float, u: float, *, alpha: float, gamma: float, beta_min: float, beta_max: float) -> tuple[float, float]:
    """``(clip(beta * exp(alpha * tanh(gamma * u)), beta_min, beta_max), s)``."""
    s = math.tanh(gamma * u)
    new_beta = beta * math.exp(alpha * s)
    return min(max(new_beta, beta_min), beta_max), s


def _clip(beta: float, cfg) -> float:
    return min(max(beta, cfg.beta_min), cfg.beta_max)


# --------------------------------------------------------------------------- p_hat rules (the published family)


def hoeffding_epsilon(n: int, eps0: float) -> float:
    """Hoeffding bound ``sqrt(ln(1/eps0) / (2n))`` for a proportion of ``n`` samples."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    return math.sqrt(math.log(1.0 / eps0) / (2.0 * n))


@dataclass(frozen=True)
class RiskResult:
    """Outcome of a p_hat test for one step."""

    risk_over: bool
    u: float
    eps: float  # Hoeffding eps (hoeffding rules) or the z-test standard error (zscore)
    threshold: float  # p_hat above this flags over-risk


def hoeffding_test(p_hat: float, n: int, *, delta: float, eps0: float, deadband: float = 1.0) -> RiskResult:
    """The published rule: ``u = (p_hat - (delta + eps)) / eps``; over-risk when ``p_hat > delta + eps``."""
    eps = hoeffding_epsilon(n, eps0)
    threshold = delta + eps
    return RiskResult(p_hat > threshold, (p_hat - threshold) / eps, eps, threshold)


def hoeffding_deadband_test(p_hat: float, n: int, *, delta: float, eps0: float, deadband: float = 1.0) -> RiskResult:
    """Centred Hoeffding with a dead-band: ``u = sign(d) max(|d| - deadband eps, 0) / eps``, ``d = p_hat - delta``."""
    eps = hoeffding_epsilon(n, eps0)
    d = p_hat - delta
    excess = max(abs(d) - deadband * eps, 0.0)
    u = math.copysign(excess, d) / eps if excess > 0 else 0.0
    return RiskResult(p_hat > delta + eps, u, eps, delta + eps)


def zscore_test(p_hat: float, n: int, *, delta: float, eps0: float, deadband: float = 1.0) -> RiskResult:
    """``u = (p_hat - delta) / sqrt(delta (1 - delta) / n)``; over-risk when ``u > z_(1 - eps0)``."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    se = math.sqrt(delta * (1.0 - delta) / n)
    z_crit = statistics.NormalDist().inv_cdf(1.0 - eps0)
    u = (p_hat - delta) / se
    return RiskResult(u > z_crit, u, se, delta + z_crit * se)


P_HAT_TESTS = {"hoeffding": hoeffding_test, "zscore": zscore_test, "hoeffding_deadband": hoeffding_deadband_test}


def _p_hat_rule(test):
    def update(cfg, state, beta, sig: StepSignals) -> RuleStep:
        if sig.p_hat is None:  # the controller is still collecting warmup margins for tau_0
            return RuleStep(beta, dict(state), 0.0, 0.0, False, None)
        risk = test(sig.p_hat, sig.n, delta=cfg.delta, eps0=cfg.eps0, deadband=cfg.deadband)
        new_beta, s = update_beta(beta, risk.u, alpha=cfg.alpha, gamma=cfg.gamma,
                                  beta_min=cfg.beta_min, beta_max=cfg.beta_max)
        return RuleStep(new_beta, dict(state), risk.u, s, risk.risk_over, risk.eps)

    return update


register(Rule("hoeffding", _p_hat_rule(hoeffding_test),
              "published rule: u = (p_hat - delta - eps) / eps; drifts beta down when p_hat sits at delta"))
register(Rule("zscore", _p_hat_rule(zscore_test),
              "u = (p_hat - delta) / sqrt(delta (1 - delta) / n); centred, reacts to growing margins"))
register(Rule("hoeffding_deadband", _p_hat_rule(hoeffding_deadband_test),
              "centred Hoeffding with a dead-band of +-deadband*eps; neutral at the steady state"))


# --------------------------------------------------------------------------- beta-DPO (Wu et al., NeurIPS 2024)


def ema_corrected(ema: float, k: int, momentum: float) -> float:
    """Bias-corrected exponential moving average after ``k`` updates from 0 (0.0 for ``k = 0``)."""
    return ema / (1.0 - momentum ** k) if k > 0 else 0.0


def beta_dpo_filter_weights(margins: Sequence[float], m_run: float, sd_run: float, fraction: float) -> list:
    """Deterministic beta-guided filter: weight 1 if ``|M - m_run| <= z sd_run`` else 0.

    ``z = Phi^-1(1 - fraction / 2)`` drops ``fraction`` of the pairs when the
    margins are Gaussian with the running mean and standard deviation. Every
    pair is kept while ``sd_run`` is 0 (no statistics yet) or ``fraction`` is 0.
    """
    if fraction <= 0 or sd_run <= 0:
        return [1.0] * len(margins)
    z = statistics.NormalDist().inv_cdf(1.0 - fraction / 2.0)
    return [1.0 if abs(m - m_run) <= z * sd_run else 0.0 for m in margins]


def _beta_dpo_state(cfg) -> dict:
    return {"k": 0, "m_ema": 0.0, "sd_ema": 0.0}


def _beta_dpo_running(cfg, state) -> tuple[float, float]:
    mu = cfg.beta_dpo_momentum
    return ema_corrected(state["m_ema"], state["k"], mu), ema_corrected(state["sd_ema"], state["k"], mu)


def _beta_dpo_weights(filtered: bool):
    def weights(cfg, state, margins):
        if not filtered:
            return [1.0] * len(margins)
        m_run, sd_run = _beta_dpo_running(cfg, state)
        return beta_dpo_filter_weights(margins, m_run, sd_run, cfg.beta_dpo_filter_fraction)

    return weights


def _beta_dpo_rule(filtered: bool):
    def update(cfg, state, beta, sig: StepSignals) -> RuleStep:
        mu = cfg.beta_dpo_momentum
        margins = sig.margins
        # the pairs the loss used: recomputed from the state at the start of the step
        weights = _beta_dpo_weights(filtered)(cfg, state, margins)
        kept = [m for m, w in zip(margins, weights) if w > 0] or list(margins)
        k = state["k"] + 1
        m_ema = mu * state["m_ema"] + (1.0 - mu) * fmean(margins)
        sd_ema = mu * state["sd_ema"] + (1.0 - mu) * fstd(margins, ddof=1)
        m_run = ema_corrected(m_ema, k, mu)
        u = cfg.beta_dpo_a * (fmean(kept) - m_run)
        new_beta = _clip(max(cfg.beta_0 * (1.0 + u), cfg.beta_dpo_min), cfg)
        return RuleStep(new_beta, {"k": k, "m_ema": m_ema, "sd_ema": sd_ema}, u, u, u > 0, None,
                        {"m_run": m_run, "sd_run": ema_corrected(sd_ema, k, mu),
                         "kept_frac": len(kept) / len(margins)})

    return update


register(Rule("beta_dpo", _beta_dpo_rule(False),
              "beta-DPO calibration: beta = beta_0 (1 + a (mean M - running mean M)), no filtering",
              acts_in_warmup=True, initial_state=_beta_dpo_state))
register(Rule("beta_dpo_filter", _beta_dpo_rule(True),
              "beta-DPO with its beta-guided filter: pairs with |M - M_run| > z sd_run get loss weight 0",
              acts_in_warmup=True, initial_state=_beta_dpo_state, pair_weights=_beta_dpo_weights(True)))


# --------------------------------------------------------------------------- KL target (Ziegler et al. 2019)

KL_ESTIMATORS = ("reverse", "importance")


def kl_estimate(logratios: Sequence[float], estimator: str) -> float:
    """KL estimate from completion log-ratios ``rho = logp - ref_logp`` of reference-sampled completions.

    ``reverse``: ``-mean(rho)``, KL(reference || policy) (exact in expectation
    when the completions are reference samples). ``importance``:
    ``mean(w rho - w + 1)`` with ``w = exp(rho)``, KL(policy || reference)
    by importance sampling (unbiased for reference samples, but dominated by
    rare completions once the KL exceeds a few nats).
    """
    if not logratios:
        raise ValueError("kl_estimate of no log-ratios")
    if estimator == "reverse":
        return -fmean(logratios)
    if estimator == "importance":
        terms = []
        for r in logratios:
            w = math.exp(min(r, 700.0))
            terms.append(w * r - w + 1.0)
        return fmean(terms)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def _kl_target_rule(cfg, state, beta, sig: StepSignals) -> RuleStep:
    rho = list(sig.chosen_logratios) + list(sig.rejected_logratios)
    estimate = kl_estimate(rho, cfg.kl_estimator)
    error = min(max(estimate / cfg.kl_target - 1.0, -0.2), 0.2)
    step = error * sig.n / cfg.kl_horizon
    return RuleStep(_clip(beta * (1.0 + step), cfg), dict(state), error, step, estimate > cfg.kl_target, None,
                    {"kl_estimate": estimate})


register(Rule("kl_target", _kl_target_rule,
              "adaptive KL control: beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon",
              needs_logratios=True, acts_in_warmup=True))


# --------------------------------------------------------------------------- calibration floor (this project)


def _sigmoid_neg(x: float) -> float:
    """``sigmoid(-x) = 1 / (1 + exp(x))`` without overflow."""
    if x >= 0:
        e = math.exp(-x)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(x))


CALIBRATION_RANGE = (1e-8, 1e6)


def calibrated_temperature(margins: Sequence[float], *, lo: float = CALIBRATION_RANGE[0],
                           hi: float = CALIBRATION_RANGE[1], iterations: int = 80) -> float | None:
    """The temperature beta* that best explains the labels given the margins (maximum likelihood).

    The root of ``g(beta) = sum_i M_i sigmoid(-beta M_i)``, the derivative of
    ``sum_i log sigmoid(beta M_i)`` in beta. ``g`` falls strictly, so the root
    is unique; it is found by bisection in ``log(beta)`` over ``[lo, hi]``
    (a fixed number of iterations: the same bits on every rank). Returns
    None when ``sum(M) <= 0`` (the margins do not explain the labels at any
    positive temperature), ``hi`` when no margin is negative (the likelihood
    grows without bound) or the root lies above ``hi``.
    """
    if not margins or math.fsum(margins) <= 0:
        return None
    if min(margins) >= 0:
        return hi

    def g(beta):
        return math.fsum(m * _sigmoid_neg(beta * m) for m in margins)

    if g(hi) > 0:
        return hi
    a, b = math.log(lo), math.log(hi)
    for _ in range(iterations):
        mid = 0.5 * (a + b)
        if g(math.exp(mid)) > 0:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b))


def _calibration_floor_rule(cfg, state, beta, sig: StepSignals) -> RuleStep:
    log_bstar = state.get("log_beta_star")
    bstar = calibrated_temperature(sig.margins)
    if bstar is not None and bstar >= CALIBRATION_RANGE[1]:
        # No negative margin: the likelihood grows without bound in beta, so the step says nothing
        # about the temperature. Skipped like a step with sum(M) <= 0 (frequent with small global
        # batches: with 8 pairs a few steps in ten; it never happened with 64 pairs in the toy).
        bstar = None
    if bstar is not None:
        lb = math.log(bstar)
        log_bstar = lb if log_bstar is None else (1.0 - cfg.ema_lambda) * log_bstar + cfg.ema_lambda * lb
    new_state = {"log_beta_star": log_bstar}
    record = {"beta_star": bstar, "beta_star_ema": None if log_bstar is None else math.exp(log_bstar)}
    if log_bstar is None:
        return RuleStep(beta, new_state, 0.0, 0.0, False, None, record)
    # u > 0: beta is below r_min times the calibrated temperature, so the loss still rewards
    # inflating every margin alike (pure KL, no better ranking); only then does beta move.
    u = max(math.log(cfg.calib_r_min) + log_bstar - math.log(beta), 0.0)
    record["floor"] = cfg.calib_r_min * math.exp(log_bstar)
    new_beta, s = update_beta(beta, u, alpha=cfg.calib_rate, gamma=cfg.gamma, beta_min=cfg.beta_min,
                              beta_max=cfg.beta_max)
    return RuleStep(new_beta, new_state, u, s, u > 0, None, record)


register(Rule("calibration_floor", _calibration_floor_rule,
              "raise beta (never lower it) while beta < calib_r_min x the calibrated temperature of the margins",
              initial_state=lambda cfg: {"log_beta_star": None}))
