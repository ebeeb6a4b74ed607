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

``beta_timing`` changes only when :meth:`DynamicBetaController.observe_step`
is called and which beta the loss uses (``opensloth.patches.dpo_dynamic_beta``
applies it; :func:`opensloth.dpo.timing.replay` states it as a pure function):
``same_batch`` observes every micro-batch (margins gathered over the ranks)
and uses the new beta in that micro-batch's loss, ``micro_batch`` observes
every micro-batch and uses the new beta from the next one. ``warmup_steps``
then counts micro-batches. The presets ``reference`` / ``reference_v1`` set the
rule, ``q = 1 - delta``, ``p_hat_inclusive`` (``>=``) and the timing of the two
reference repositories.

Risk rules (``risk_rule``) live in :mod:`opensloth.dpo.rules`, one registry
entry each (:data:`RISK_RULES` lists their names). The p_hat rules
(``hoeffding``, ``zscore``, ``hoeffding_deadband``) turn ``p_hat`` into ``u``
as above. ``beta_dpo`` / ``beta_dpo_filter`` (Wu et al. 2024), ``kl_target``
(Ziegler et al. 2019) and ``calibration_floor`` compute beta from other
statistics of the step's pairs; ``kl_target`` needs the chosen and rejected
log-ratios (``observe_step(margins, extras)``), ``beta_dpo_filter`` also gives
per-pair loss weights (:meth:`DynamicBetaController.pair_weights`).
docs/dynamic_beta_rules.md has every formula, docs/dynamic_beta.md the
measurements behind the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Iterable, Mapping, Sequence

from opensloth.dpo.rules import (
    KL_ESTIMATORS,
    P_HAT_TESTS,
    RULES,
    RiskResult,
    StepSignals,
    get_rule,
    hoeffding_epsilon,
    update_beta,
)

RISK_RULES = tuple(RULES)
# When beta is updated and from when the new beta is used (opensloth.patches.dpo_dynamic_beta applies it):
# step: once per optimizer step from the whole global batch, used from the next step (layout-invariant);
# same_batch: per micro-batch from its margins gathered over the ranks, used in that micro-batch's loss
#   (SeanYHan888/dynamic_beta); micro_batch: per micro-batch, used from the next micro-batch (dynamic-dpo-v1).
BETA_TIMINGS = ("step", "same_batch", "micro_batch")
# Presets: the settings that make the controller reproduce a reference repository (see preset_values).
PRESETS = ("none", "reference", "reference_v1")
PHASE_WARMUP = "warmup"
PHASE_DYNAMIC = "dynamic"
STATE_VERSION = 2  # 2 adds the rule's own state; version-1 states (p_hat rules) still load
STATE_FILE = "dynamic_beta_state.json"  # the controller state inside each checkpoint folder
EXTRA_KEYS = ("chosen_logratios", "rejected_logratios")

__all__ = [
    "BETA_TIMINGS", "PRESETS", "RISK_RULES", "STATE_FILE", "DynamicBetaConfig", "DynamicBetaController", "EMAUpdate",
    "WarmupQuantileAccumulator", "RiskResult", "empirical_over_threshold_proportion", "hoeffding_epsilon",
    "margin_summary", "quantile", "preset_values", "risk_test", "split_finite", "split_finite_pairs", "update_beta",
]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DynamicBetaConfig:
    """Hyper-parameters of the dynamic-beta controller (defaults of the public reference)."""

    beta_0: float = field(default=0.1, metadata={"help": "beta during warmup and the start value of the dynamic phase (> 0)."})
    warmup_steps: int = field(default=120, metadata={"help": "optimizer steps that collect margins for tau_0; beta stays at beta_0 unless the rule acts in warmup (beta_dpo, kl_target) (>= 1)."})
    q: float = field(default=0.9, metadata={"help": "quantile of the margins that tau tracks, in (0, 1)."})
    delta: float = field(default=0.1, metadata={"help": "target fraction of margins above tau, in (0, 1); neutral rules need delta = 1 - q."})
    eps0: float = field(default=0.05, metadata={"help": "significance level of the risk test (Hoeffding bound / one-sided z test), in (0, 1)."})
    ema_lambda: float = field(default=0.05, metadata={"help": "EMA weight of the batch quantile in tau (and of the calibrated temperature in calibration_floor), in (0, 1]."})
    gamma: float = field(default=2.0, metadata={"help": "slope of s = tanh(gamma * u) in the p_hat rules and calibration_floor (> 0)."})
    alpha: float = field(default=0.0015, metadata={"help": "p_hat rules (hoeffding, zscore, hoeffding_deadband): step size of log(beta) per optimizer step (>= 0; 0 freezes beta for them)."})
    beta_min: float = field(default=0.0, metadata={"help": "lower clip of beta (>= 0, <= beta_0)."})
    beta_max: float = field(default=2.0, metadata={"help": "upper clip of beta (finite, >= beta_0)."})
    risk_rule: str = field(default="hoeffding_deadband", metadata={"help": f"risk rule, one of {RISK_RULES}; see docs/dynamic_beta_rules.md."})
    deadband: float = field(default=1.0, metadata={"help": "hoeffding_deadband only: half-width of the dead-band in units of eps (>= 0)."})
    beta_dpo_a: float = field(default=0.6, metadata={"help": "beta_dpo rules: scaling factor a in beta = beta_0 (1 + a (M_batch - M_run)) (>= 0; Wu et al. 2024 use 0.6)."})
    beta_dpo_momentum: float = field(default=0.9, metadata={"help": "beta_dpo rules: EMA momentum of the running margin mean and std, in [0, 1)."})
    beta_dpo_filter_fraction: float = field(default=0.2, metadata={"help": "beta_dpo_filter: fraction of pairs the Gaussian filter drops (for Gaussian margins), in [0, 1)."})
    beta_dpo_min: float = field(default=1e-3, metadata={"help": "beta_dpo rules: lower bound of the calibrated beta (> 0; the reference uses 1e-3)."})
    kl_target: float = field(default=6.0, metadata={"help": "kl_target: target KL in nats per completion (> 0; Ziegler et al. 2019 use 6)."})
    kl_horizon: float = field(default=10000.0, metadata={"help": "kl_target: pairs over which a 20% KL error changes log(beta) by about 0.2 (> 0)."})
    kl_estimator: str = field(default="reverse", metadata={"help": f"kl_target: KL estimate from the completion log-ratios, one of {KL_ESTIMATORS}.", "choices": KL_ESTIMATORS})
    calib_r_min: float = field(default=0.3, metadata={"help": "calibration_floor: beta is raised while it is below calib_r_min x the calibrated temperature (> 0)."})
    calib_rate: float = field(default=0.02, metadata={"help": "calibration_floor: largest change of log(beta) per optimizer step (>= 0)."})
    p_hat_inclusive: bool = field(default=False, metadata={"help": "p_hat counts margins >= tau (the reference code) instead of > tau (at the start of LoRA training every margin is 0 = tau)."})
    beta_timing: str = field(default="step", metadata={"help": f"one of {BETA_TIMINGS}: step = per optimizer step from the global batch, used from the next step; same_batch = per micro-batch, gathered over ranks, used in that micro-batch's loss; micro_batch = per micro-batch, used from the next one. warmup_steps counts updates."})
    preset: str = field(default="none", metadata={"help": f"one of {PRESETS}: reference = SeanYHan888/dynamic_beta (hoeffding, q = 1 - delta, >=, same_batch); reference_v1 = dynamic-dpo-v1 (zscore, q = 1 - delta, >=, micro_batch)."})

    def __post_init__(self):
        def bad(name, why, fix):
            raise ValueError(f"DynamicBetaConfig.{name}={getattr(self, name)!r} {why}; {fix}")

        if self.preset not in PRESETS:
            bad("preset", f"is not one of {PRESETS}", "use reference, reference_v1 or none")
        for name, value in preset_values(self.preset, self.delta).items():
            default = next(f.default for f in fields(self) if f.name == name)
            if getattr(self, name) not in (default, value):
                bad(name, f"contradicts preset {self.preset!r}, which sets it to {value!r}",
                    f"drop {name} or the preset")
            object.__setattr__(self, name, value)  # frozen dataclass: the preset fills the fields once, here

        for name in ("beta_0", "q", "delta", "eps0", "ema_lambda", "gamma", "alpha", "beta_min", "beta_max", "deadband",
                     "beta_dpo_a", "beta_dpo_momentum", "beta_dpo_filter_fraction", "beta_dpo_min", "kl_target",
                     "kl_horizon", "calib_r_min", "calib_rate"):
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
        if self.risk_rule not in RULES:  # the live registry: rules registered after import count too
            bad("risk_rule", f"is not one of {tuple(RULES)}", "pick one (docs/dynamic_beta.md says which and why)")
        if self.deadband < 0:
            bad("deadband", "must be >= 0", "use 1.0 (the Hoeffding bound) or 0 for no dead-band")
        if self.beta_dpo_a < 0:
            bad("beta_dpo_a", "must be >= 0", "use e.g. 0.6")
        if not 0 <= self.beta_dpo_momentum < 1:
            bad("beta_dpo_momentum", "must lie in [0, 1)", "use e.g. 0.9")
        if not 0 <= self.beta_dpo_filter_fraction < 1:
            bad("beta_dpo_filter_fraction", "must lie in [0, 1)", "use e.g. 0.2, or 0 to keep every pair")
        if self.beta_dpo_min <= 0:
            bad("beta_dpo_min", "must be > 0", "use e.g. 1e-3")
        if self.kl_target <= 0:
            bad("kl_target", "must be > 0", "use e.g. 6.0 (nats per completion)")
        if self.kl_horizon <= 0:
            bad("kl_horizon", "must be > 0", "use e.g. 10000 (pairs)")
        if self.kl_estimator not in KL_ESTIMATORS:
            bad("kl_estimator", f"is not one of {KL_ESTIMATORS}", "use 'reverse'")
        if self.calib_r_min <= 0:
            bad("calib_r_min", "must be > 0", "use e.g. 0.3")
        if self.calib_rate < 0:
            bad("calib_rate", "must be >= 0", "use e.g. 0.02, or 0 to freeze beta")
        if self.beta_timing not in BETA_TIMINGS:
            bad("beta_timing", f"is not one of {BETA_TIMINGS}", "step keeps every layout equivalent")
        if self.beta_timing != "step" and self.risk_rule not in P_HAT_TESTS:
            bad("beta_timing", f"updates per micro-batch, which the p_hat rules {tuple(P_HAT_TESTS)} support",
                "use beta_timing: step with this rule")

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


def preset_values(preset: str, delta: float) -> dict:
    """The fields a preset sets (``q`` follows ``delta``, as in the reference code: ``q = 1 - delta``)."""
    if preset == "reference":
        return {"risk_rule": "hoeffding", "q": 1.0 - delta, "p_hat_inclusive": True, "beta_timing": "same_batch"}
    if preset == "reference_v1":
        return {"risk_rule": "zscore", "q": 1.0 - delta, "p_hat_inclusive": True, "beta_timing": "micro_batch"}
    return {}


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


def split_finite_pairs(margins: Iterable[float], extras: Mapping | None) -> tuple[list[float], dict, int]:
    """Drop every pair whose margin or log-ratio is NaN/inf, keeping margins and extras aligned.

    Returns ``(margins, extras, dropped)`` with the same keys in ``extras`` (lists
    of floats). Raises ValueError when an extra's length differs from the margins'.
    """
    margins = [float(m) for m in margins]
    extras = {k: [float(v) for v in vals] for k, vals in (extras or {}).items()}
    for key, vals in extras.items():
        if len(vals) != len(margins):
            raise ValueError(f"extras[{key!r}] has {len(vals)} values for {len(margins)} margins")
    keep = [i for i, m in enumerate(margins)
            if math.isfinite(m) and all(math.isfinite(vals[i]) for vals in extras.values())]
    return [margins[i] for i in keep], {k: [v[i] for i in keep] for k, v in extras.items()}, len(margins) - len(keep)


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


def empirical_over_threshold_proportion(margins: Sequence[float], tau: float, inclusive: bool = False) -> float:
    """``p_hat``: fraction of ``margins`` above ``tau`` (strictly, or ``>=`` with ``inclusive``; 0.0 for none)."""
    if not margins:
        return 0.0
    if inclusive:
        return sum(1 for m in margins if m >= tau) / len(margins)
    return sum(1 for m in margins if m > tau) / len(margins)


def risk_test(p_hat: float, n: int, *, delta: float, eps0: float, rule: str, deadband: float = 1.0) -> RiskResult:
    """Risk test and the signed statistic ``u`` of a p_hat rule (``hoeffding``, ``zscore``, ``hoeffding_deadband``).

    Args:
        p_hat: fraction of the step's margins above tau.
        n: number of (finite) margins behind ``p_hat``, >= 1.
        delta, eps0: target proportion and significance level.
        rule: one of the p_hat rules (formulas in :mod:`opensloth.dpo.rules`).
        deadband: half-width of the dead-band in units of eps (``hoeffding_deadband``).

    Returns:
        :class:`RiskResult`. Raises ValueError for a rule that is not a p_hat rule or ``n < 1``.
    """
    test = P_HAT_TESTS.get(rule)
    if test is None:
        raise ValueError(f"unknown p_hat risk rule {rule!r}; expected one of {tuple(P_HAT_TESTS)}")
    return test(p_hat, n, delta=delta, eps0=eps0, deadband=deadband)


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

    ``beta`` is the value the loss must use for the next step. The rule is
    looked up in :data:`opensloth.dpo.rules.RULES` by ``config.risk_rule``. All
    state is plain floats/lists, exported by :meth:`state_dict` (JSON-serialisable).
    """

    def __init__(self, config: DynamicBetaConfig):
        self.config = config
        self.rule = get_rule(config.risk_rule)
        self.step = 0  # optimizer steps observed so far
        self.beta = float(config.beta_0)
        self.phase = PHASE_WARMUP
        self.tau: float | None = None
        self.warmup = WarmupQuantileAccumulator(config.q)
        self._ema: EMAUpdate | None = None
        self.nonfinite_total = 0
        self.rule_state: dict = self.rule.initial_state(config)

    @property
    def needs_logratios(self) -> bool:
        """True when the rule reads the chosen/rejected log-ratios: pass them as ``extras``."""
        return self.rule.needs_logratios

    def pair_weights(self, margins: Sequence[float]) -> list[float] | None:
        """Loss weight of each pair of the *current* step (None: the rule does not filter).

        A pure function of the state at the start of the step and each pair's
        own margin, so it is the same on every rank and in every micro-batch
        layout. The loss multiplies each pair's term by its weight and keeps
        its usual mean over the pairs. A NaN/inf margin gets weight 1 (the loss
        is not finite either way).
        """
        if self.rule.pair_weights is None:
            return None
        margins = [float(m) for m in margins]
        finite = [m for m in margins if math.isfinite(m)]
        weights = iter(self.rule.pair_weights(self.config, self.rule_state, finite))
        return [next(weights) if math.isfinite(m) else 1.0 for m in margins]

    def observe_step(self, margins: Iterable[float], extras: Mapping | None = None) -> list[dict]:
        """Feed the global-batch margins of the step just finished.

        Args:
            margins: one margin per pair of the global batch (all ranks, all micro-batches).
            extras: optional per-pair values aligned with ``margins``:
                ``chosen_logratios`` and ``rejected_logratios`` (``logp - ref_logp``
                of each completion). Required when :attr:`needs_logratios`.

        A pair with a NaN/inf value is dropped (counted in ``n_nonfinite``); a
        step with no finite pair leaves tau, beta and the rule's state unchanged.
        Only order-independent statistics are used, so the order of the pairs
        (rank order, micro-batch order) does not change any number.

        Returns:
            The records to log: the step record, preceded by a ``warmup_end``
            record on the step that ends warmup.

        Raises:
            ValueError: the rule needs log-ratios and ``extras`` lacks them, or
                an extra's length differs from the margins'.
        """
        cfg = self.config
        unknown = sorted(set(extras or {}) - set(EXTRA_KEYS))
        if unknown:
            raise ValueError(f"unknown extras {unknown}; known: {list(EXTRA_KEYS)}")
        if self.rule.needs_logratios and not all(k in (extras or {}) for k in EXTRA_KEYS):
            raise ValueError(f"risk rule {cfg.risk_rule!r} needs extras {list(EXTRA_KEYS)} "
                             "(the chosen and rejected log-ratios of every pair); the trainer must pass them")
        finite, finite_extras, dropped = split_finite_pairs(margins, extras)
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
        in_warmup = self.phase == PHASE_WARMUP
        p_hat = None
        if in_warmup:
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
        elif finite:
            self.tau = self._ema.update(finite)
            p_hat = empirical_over_threshold_proportion(finite, self.tau, cfg.p_hat_inclusive)
        record.update(tau=self.tau, p_hat=p_hat, risk_over=False, u=0.0, s=0.0, eps=None)
        if finite:
            signals = StepSignals(
                step=step, in_warmup=in_warmup, margins=tuple(finite),
                chosen_logratios=tuple(finite_extras["chosen_logratios"]) if "chosen_logratios" in finite_extras else None,
                rejected_logratios=tuple(finite_extras["rejected_logratios"]) if "rejected_logratios" in finite_extras else None,
                tau=self.tau, p_hat=p_hat)
            out = self.rule.update(cfg, self.rule_state, self.beta, signals)
            self.rule_state = out.state
            record.update(out.record)
            if not in_warmup or self.rule.acts_in_warmup:
                self.beta = out.beta
                record.update(risk_over=out.risk_over, u=out.u, s=out.s, eps=out.eps)
        elif not in_warmup:
            record["skipped"] = True
        record["beta_next"] = self.beta
        self.step += 1
        records.append(record)
        return records

    def digest(self) -> tuple:
        """The values every rank must agree on bit for bit (compared across ranks each step)."""
        return (self.step, self.phase, self.beta, self.tau, len(self.warmup.values),
                tuple(sorted(self.rule_state.items())))

    def state_dict(self) -> dict:
        """JSON-serialisable state: phase, warmup buffer, tau, beta, step, the rule's state, config."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "phase": self.phase,
            "beta": self.beta,
            "tau": self.tau,
            "warmup_margins": list(self.warmup.values),
            "nonfinite_total": self.nonfinite_total,
            "rule_state": dict(self.rule_state),
            "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
        }

    def load_state_dict(self, state: dict, *, strict_config: bool = True) -> None:
        """Restore :meth:`state_dict` output (version 1 or 2).

        With ``strict_config`` a checkpoint written under a different config
        raises ValueError naming the differing keys (a silent change would
        break the beta trajectory). Keys the checkpoint does not have (fields
        added later) are not compared.
        """
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"dynamic-beta state version {state.get('version')!r} is not 1 or {STATE_VERSION}")
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
        self.rule_state = dict(state.get("rule_state", self.rule.initial_state(self.config)))
        self._ema = EMAUpdate(self.tau, self.config.q, self.config.ema_lambda) if self.phase == PHASE_DYNAMIC else None
