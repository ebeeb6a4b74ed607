"""The dynamic-beta controller: pure math over plain Python floats.

No trainer, no torch, no Unsloth: this module imports only the standard
library, so every rank computes the same numbers in the same way (IEEE float64,
a fixed order of operations, no device kernels).

Notation (per optimizer step ``t``):

- margin ``M = (logp_w - logp_l) - (ref_logp_w - ref_logp_l)``, one per pair;
  the controller sees the margins of the *global* batch (all ranks, all
  micro-batches of the step).
- warmup (steps ``0 .. warmup_steps-1``): beta stays at ``beta_0``; margins
  accumulate; after the last warmup step ``tau_0 = quantile(all warmup margins, q)``.
- dynamic (every later step)::

      tau   = (1 - lambda) * tau + lambda * quantile(M_batch, q)
      p_hat = #{M_batch > tau} / n
      u     = rule(p_hat, n)          # see RISK_RULES
      s     = tanh(gamma * u)
      beta  = clip(beta * exp(alpha * s), beta_min, beta_max)

Quantile definition: linear interpolation between order statistics, the
default of ``torch.quantile`` and ``numpy.quantile`` ("type 7"): with the
values sorted ascending, ``pos = q * (n - 1)``, the result is
``x[floor(pos)] + (pos - floor(pos)) * (x[floor(pos)+1] - x[floor(pos)])``.

``p_hat`` counts margins strictly above ``tau``. At the start of LoRA training
every margin is exactly 0 (a zero-initialised adapter equals the reference),
so ``tau = 0`` and ``p_hat = 0`` rather than 1.

Timing: the beta that the loss uses at step ``t`` is fixed before step ``t``
starts; :meth:`DynamicBetaController.observe_step` is called once, at the
optimizer-step boundary, with the margins of step ``t`` and returns the beta
for step ``t + 1``. So ``beta_t = beta_0`` for ``t <= warmup_steps`` and the
first changed beta is used at step ``warmup_steps + 1``. This is the same for
every layout (ranks x gradient accumulation x micro-batch).

Risk rules (``risk_rule``):

- ``hoeffding`` -- the published rule. ``eps = sqrt(ln(1/eps0) / (2n))``,
  over-risk when ``p_hat > delta + eps``, ``u = (p_hat - (delta + eps)) / eps``.
  Its neutral point is ``p_hat = delta + eps``, but ``tau`` tracks the
  ``q``-quantile so ``p_hat`` settles near ``1 - q = delta``; then ``u`` is
  near -1 and beta shrinks by ``exp(-alpha * tanh(gamma))`` every step even
  when nothing is wrong (see docs/dynamic_beta_rules.md for measurements).
- ``zscore`` -- ``u = (p_hat - delta) / sqrt(delta (1 - delta) / n)``; centred
  at ``p_hat = delta``; over-risk when ``u > z_{1-eps0}`` (one-sided normal
  test at the same level ``eps0``).
- ``hoeffding_deadband`` (default) -- centred Hoeffding with a dead-band:
  ``u = sign(d) * max(|d| - w, 0) / eps`` with ``d = p_hat - delta`` and
  ``w = deadband * eps``. Above the band it equals the published rule
  (with the default ``deadband = 1``); inside it beta does not move; below it
  beta decreases symmetrically. Over-risk when ``p_hat > delta + eps``.
  Caveat (measured in docs/dynamic_beta.md): the lower edge ``delta - eps`` is
  below 0 while ``n < ln(1/eps0) / (2 delta^2)`` (about 150 margins per step at
  the defaults), so with smaller global batches this rule can raise beta but
  never lower it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, fields
from typing import Iterable, Sequence

RISK_RULES = ("hoeffding", "zscore", "hoeffding_deadband")
PHASE_WARMUP = "warmup"
PHASE_DYNAMIC = "dynamic"
STATE_VERSION = 1
STATE_FILE = "dynamic_beta_state.json"  # the controller state inside each checkpoint folder


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DynamicBetaConfig:
    """Hyper-parameters of the dynamic-beta controller (defaults of the public reference)."""

    beta_0: float = field(default=0.1, metadata={"help": "beta during warmup and the start value of the dynamic phase (> 0)."})
    warmup_steps: int = field(default=120, metadata={"help": "optimizer steps that collect margins for tau_0 while beta stays at beta_0 (>= 1)."})
    q: float = field(default=0.9, metadata={"help": "quantile of the margins that tau tracks, in (0, 1)."})
    delta: float = field(default=0.1, metadata={"help": "target fraction of margins above tau, in (0, 1); neutral rules need delta = 1 - q."})
    eps0: float = field(default=0.05, metadata={"help": "significance level of the risk test (Hoeffding bound / one-sided z test), in (0, 1)."})
    ema_lambda: float = field(default=0.05, metadata={"help": "EMA weight of the batch quantile in tau, in (0, 1]."})
    gamma: float = field(default=2.0, metadata={"help": "slope of s = tanh(gamma * u) (> 0)."})
    alpha: float = field(default=0.0015, metadata={"help": "step size of log(beta) per optimizer step (>= 0; 0 freezes beta)."})
    beta_min: float = field(default=0.0, metadata={"help": "lower clip of beta (>= 0, <= beta_0)."})
    beta_max: float = field(default=2.0, metadata={"help": "upper clip of beta (finite, >= beta_0)."})
    risk_rule: str = field(default="hoeffding_deadband", metadata={"help": f"risk rule, one of {RISK_RULES}; see docs/dynamic_beta_rules.md."})
    deadband: float = field(default=1.0, metadata={"help": "hoeffding_deadband only: half-width of the dead-band in units of eps (>= 0)."})

    def __post_init__(self):
        def bad(name, why, fix):
            raise ValueError(f"DynamicBetaConfig.{name}={getattr(self, name)!r} {why}; {fix}")

        for name in ("beta_0", "q", "delta", "eps0", "ema_lambda", "gamma", "alpha", "beta_min", "beta_max", "deadband"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "is not a finite number", "pass a finite float")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            bad("warmup_steps", "must be an integer >= 1", "tau_0 needs at least one step of margins")
        if self.beta_0 <= 0:
            bad("beta_0", "must be > 0", "beta is updated multiplicatively, so 0 would never move")
        if not 0 < self.q < 1:
            bad("q", "must lie in (0, 1)", "use e.g. 0.9")
        if not 0 < self.delta < 1:
            bad("delta", "must lie in (0, 1)", "use e.g. 0.1 (= 1 - q)")
        if not 0 < self.eps0 < 1:
            bad("eps0", "must lie in (0, 1)", "use e.g. 0.05")
        if not 0 < self.ema_lambda <= 1:
            bad("ema_lambda", "must lie in (0, 1]", "use e.g. 0.05")
        if self.gamma <= 0:
            bad("gamma", "must be > 0", "use e.g. 2.0")
        if self.alpha < 0:
            bad("alpha", "must be >= 0", "use 0 to freeze beta, e.g. 0.0015 otherwise")
        if self.beta_min < 0:
            bad("beta_min", "must be >= 0", "use 0.0 for no lower clip")
        if not self.beta_min <= self.beta_0 <= self.beta_max:
            bad("beta_0", f"must lie in [beta_min, beta_max] = [{self.beta_min}, {self.beta_max}]", "widen the clip range or change beta_0")
        if self.risk_rule not in RISK_RULES:
            bad("risk_rule", f"is not one of {RISK_RULES}", "pick one (hoeffding_deadband is neutral at the steady state)")
        if self.deadband < 0:
            bad("deadband", "must be >= 0", "use 1.0 (the Hoeffding bound) or 0 for no dead-band")

    @classmethod
    def from_dict(cls, values: dict) -> "DynamicBetaConfig":
        """Build from a mapping (a YAML section); unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown dynamic_beta keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def help_text(cls) -> str:
        """One line per field: name, default, help."""
        return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata.get('help', '')}" for f in fields(cls))


# --------------------------------------------------------------------------- pure functions


def split_finite(values: Iterable[float]) -> tuple[list[float], int]:
    """``(finite values as float, number of NaN/inf values dropped)``."""
    kept, dropped = [], 0
    for v in values:
        v = float(v)
        if math.isfinite(v):
            kept.append(v)
        else:
            dropped += 1
    return kept, dropped


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (torch.quantile / numpy default) of a non-empty sequence.

    Raises ValueError for an empty sequence or ``q`` outside [0, 1].
    """
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q} must lie in [0, 1]")
    xs = sorted(float(v) for v in values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + frac * (xs[hi] - xs[lo])


def empirical_over_threshold_proportion(margins: Sequence[float], tau: float) -> float:
    """``p_hat``: fraction of ``margins`` strictly above ``tau`` (0.0 for no margins)."""
    if not margins:
        return 0.0
    return sum(1 for m in margins if m > tau) / len(margins)


def hoeffding_epsilon(n: int, eps0: float) -> float:
    """Hoeffding bound ``sqrt(ln(1/eps0) / (2n))`` for a proportion of ``n`` samples."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    return math.sqrt(math.log(1.0 / eps0) / (2.0 * n))


@dataclass(frozen=True)
class RiskResult:
    """Outcome of :func:`risk_test` for one step."""

    risk_over: bool
    u: float
    eps: float  # Hoeffding eps (hoeffding rules) or the z-test standard error (zscore)
    threshold: float  # p_hat above this flags over-risk


def risk_test(p_hat: float, n: int, *, delta: float, eps0: float, rule: str, deadband: float = 1.0) -> RiskResult:
    """Risk test and the signed statistic ``u`` that drives the beta update.

    Args:
        p_hat: fraction of the step's margins above tau.
        n: number of (finite) margins behind ``p_hat``, >= 1.
        delta, eps0: target proportion and significance level.
        rule: one of :data:`RISK_RULES` (formulas in the module docstring).
        deadband: half-width of the dead-band in units of eps (``hoeffding_deadband``).

    Returns:
        :class:`RiskResult`. Raises ValueError for an unknown rule or ``n < 1``.
    """
    if rule == "hoeffding":
        eps = hoeffding_epsilon(n, eps0)
        threshold = delta + eps
        return RiskResult(p_hat > threshold, (p_hat - threshold) / eps, eps, threshold)
    if rule == "hoeffding_deadband":
        eps = hoeffding_epsilon(n, eps0)
        d = p_hat - delta
        excess = max(abs(d) - deadband * eps, 0.0)
        u = math.copysign(excess, d) / eps if excess > 0 else 0.0
        return RiskResult(p_hat > delta + eps, u, eps, delta + eps)
    if rule == "zscore":
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        se = math.sqrt(delta * (1.0 - delta) / n)
        z_crit = statistics.NormalDist().inv_cdf(1.0 - eps0)
        u = (p_hat - delta) / se
        return RiskResult(u > z_crit, u, se, delta + z_crit * se)
    raise ValueError(f"unknown risk rule {rule!r}; expected one of {RISK_RULES}")


def update_beta(beta: float, u: float, *, alpha: float, gamma: float, beta_min: float, beta_max: float) -> tuple[float, float]:
    """``(clip(beta * exp(alpha * tanh(gamma * u)), beta_min, beta_max), s)``."""
    s = math.tanh(gamma * u)
    new_beta = beta * math.exp(alpha * s)
    return min(max(new_beta, beta_min), beta_max), s


def margin_summary(margins: Sequence[float]) -> dict:
    """Order-independent statistics of the step's margins (exact sums via ``math.fsum``)."""
    n = len(margins)
    if n == 0:
        return {"n": 0}
    mean = math.fsum(margins) / n
    var = math.fsum((m - mean) ** 2 for m in margins) / n
    return {
        "n": n,
        "mean": mean,
        "std": math.sqrt(var),
        "min": min(margins),
        "p10": quantile(margins, 0.1),
        "p50": quantile(margins, 0.5),
        "p90": quantile(margins, 0.9),
        "max": max(margins),
        "pos_frac": sum(1 for m in margins if m > 0) / n,
    }


# --------------------------------------------------------------------------- stateful pieces


class WarmupQuantileAccumulator:
    """Collect warmup margins; :meth:`finalize` returns ``tau_0``, their ``q``-quantile."""

    def __init__(self, q: float):
        self.q = q
        self.values: list[float] = []

    def update(self, margins: Iterable[float]) -> None:
        self.values.extend(float(m) for m in margins)

    def finalize(self) -> float | None:
        """``tau_0``, or None when no margins were collected."""
        return quantile(self.values, self.q) if self.values else None


class EMAUpdate:
    """``tau <- (1 - lam) * tau + lam * quantile(batch, q)``."""

    def __init__(self, tau: float, q: float, lam: float):
        self.tau = float(tau)
        self.q = q
        self.lam = lam

    def update(self, margins: Sequence[float]) -> float:
        if margins:
            self.tau = (1.0 - self.lam) * self.tau + self.lam * quantile(margins, self.q)
        return self.tau


class DynamicBetaController:
    """Warmup -> dynamic-phase beta controller; one :meth:`observe_step` per optimizer step.

    ``beta`` is the value the loss must use for the next step. All state is
    plain floats/lists, exported by :meth:`state_dict` (JSON-serialisable).
    """

    def __init__(self, config: DynamicBetaConfig):
        self.config = config
        self.step = 0  # optimizer steps observed so far
        self.beta = float(config.beta_0)
        self.phase = PHASE_WARMUP
        self.tau: float | None = None
        self.warmup = WarmupQuantileAccumulator(config.q)
        self._ema: EMAUpdate | None = None
        self.nonfinite_total = 0

    def observe_step(self, margins: Iterable[float]) -> list[dict]:
        """Feed the global-batch margins of the step just finished.

        NaN/inf margins are dropped (counted in ``n_nonfinite``); a step with no
        finite margin leaves tau and beta unchanged. Returns the records to log:
        the step record, preceded by a ``warmup_end`` record on the step that
        ends warmup.
        """
        cfg = self.config
        finite, dropped = split_finite(margins)
        self.nonfinite_total += dropped
        step = self.step
        beta_used = self.beta
        record = {
            "type": "step",
            "step": step,
            "phase": self.phase,
            "beta_used": beta_used,
            "n_nonfinite": dropped,
            "margins": margin_summary(finite),
        }
        records = []
        if self.phase == PHASE_WARMUP:
            self.warmup.update(finite)
            if step + 1 >= cfg.warmup_steps:
                tau_0 = self.warmup.finalize()
                if tau_0 is None:
                    tau_0 = 0.0  # no finite margin in all of warmup; start the EMA at 0
                self.tau = tau_0
                self._ema = EMAUpdate(tau_0, cfg.q, cfg.ema_lambda)
                self.phase = PHASE_DYNAMIC
                records.append({
                    "type": "warmup_end",
                    "step": step,
                    "tau_0": tau_0,
                    "beta_0": cfg.beta_0,
                    "n_warmup_margins": len(self.warmup.values),
                })
                self.warmup.values = []  # no longer needed; keeps checkpoints small
            record.update(tau=self.tau, p_hat=None, risk_over=False, u=0.0, s=0.0, eps=None)
        elif finite:
            self.tau = self._ema.update(finite)
            p_hat = empirical_over_threshold_proportion(finite, self.tau)
            risk = risk_test(p_hat, len(finite), delta=cfg.delta, eps0=cfg.eps0, rule=cfg.risk_rule, deadband=cfg.deadband)
            self.beta, s = update_beta(
                self.beta, risk.u, alpha=cfg.alpha, gamma=cfg.gamma, beta_min=cfg.beta_min, beta_max=cfg.beta_max
            )
            record.update(tau=self.tau, p_hat=p_hat, risk_over=risk.risk_over, u=risk.u, s=s, eps=risk.eps)
        else:
            record.update(tau=self.tau, p_hat=None, risk_over=False, u=0.0, s=0.0, eps=None, skipped=True)
        record["beta_next"] = self.beta
        self.step += 1
        records.append(record)
        return records

    def digest(self) -> tuple:
        """The values every rank must agree on bit for bit (compared across ranks each step)."""
        return (self.step, self.phase, self.beta, self.tau, len(self.warmup.values))

    def state_dict(self) -> dict:
        """JSON-serialisable state: phase, warmup buffer, tau, beta, step, config."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "phase": self.phase,
            "beta": self.beta,
            "tau": self.tau,
            "warmup_margins": list(self.warmup.values),
            "nonfinite_total": self.nonfinite_total,
            "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
        }

    def load_state_dict(self, state: dict, *, strict_config: bool = True) -> None:
        """Restore :meth:`state_dict` output.

        With ``strict_config`` a checkpoint written under a different config
        raises ValueError naming the differing keys (a silent change would
        break the beta trajectory).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"dynamic-beta state version {state.get('version')!r} is not {STATE_VERSION}")
        if strict_config:
            mine = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
            theirs = state.get("config", {})
            diff = sorted(k for k in mine if k in theirs and theirs[k] != mine[k])
            if diff:
                raise ValueError(
                    f"checkpoint dynamic-beta config differs in {diff} "
                    f"(checkpoint {[theirs[k] for k in diff]} vs now {[mine[k] for k in diff]}); "
                    "resume with the same settings"
                )
        self.step = int(state["step"])
        self.phase = state["phase"]
        self.beta = float(state["beta"])
        self.tau = None if state["tau"] is None else float(state["tau"])
        self.warmup.values = [float(v) for v in state["warmup_margins"]]
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self._ema = EMAUpdate(self.tau, self.config.q, self.config.ema_lambda) if self.phase == PHASE_DYNAMIC else None
