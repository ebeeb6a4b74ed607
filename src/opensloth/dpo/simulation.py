"""Drift of beta under stationary margins: the measurement behind the default risk rule.

Feed the controller margins drawn i.i.d. from one fixed distribution (nothing
changes, so an ideal rule leaves beta where it is) and report the change of
``log(beta)`` per 100 dynamic steps. Two more scenarios start from the same
stationary state and then let the margins grow (what over-optimisation looks
like): a useful rule raises beta there.

    python -m opensloth.dpo.simulation            # prints the markdown table

Standard library only (``random``), seeded, so the numbers are reproducible.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import replace

from opensloth.dpo.controller import RISK_RULES, DynamicBetaConfig, DynamicBetaController
from opensloth.dpo.rules import P_HAT_TESTS

P_HAT_RULES = tuple(P_HAT_TESTS)  # the rules built around a p_hat steady state; the drift table covers them


# Rules that read the completion log-ratios get chosen = M/2 - OFFSET, rejected = -M/2 - OFFSET:
# both completions lose OFFSET nats on average (a KL(ref || policy) estimate of OFFSET), the margin is unchanged.
LOGRATIO_OFFSET = 1.0


def simulate(config: DynamicBetaConfig, *, n: int, steps: int, seed: int, scale=None) -> list[float]:
    """beta after each of ``steps`` steps fed ``n`` margins ``scale(t) * N(0.5, 1)``.

    ``scale`` maps the step to a multiplier (constant 1 when None): the
    stationary case, or a growing spread that mimics over-optimisation. The
    chosen and rejected log-ratios are ``M/2 - OFFSET`` and ``-M/2 - OFFSET``
    (``LOGRATIO_OFFSET``), so the margins, and so the p_hat rules, do not
    depend on them.
    """
    rng = random.Random(seed)
    ctrl = DynamicBetaController(config)
    betas = []
    for t in range(steps):
        k = 1.0 if scale is None else scale(t)
        margins = [k * rng.gauss(0.5, 1.0) for _ in range(n)]
        extras = {"chosen_logratios": [m / 2 - LOGRATIO_OFFSET for m in margins],
                  "rejected_logratios": [-m / 2 - LOGRATIO_OFFSET for m in margins]}
        ctrl.observe_step(margins, extras)
        betas.append(ctrl.beta)
    return betas


def drift_per_100(config: DynamicBetaConfig, *, n: int, steps: int = 2000, seeds: int = 3) -> float:
    """Mean change of ``log(beta)`` per 100 dynamic-phase steps under stationary margins."""
    rates = []
    for seed in range(seeds):
        betas = simulate(config, n=n, steps=config.warmup_steps + steps, seed=seed)
        start = betas[config.warmup_steps - 1]
        rates.append(math.log(betas[-1] / start) / steps * 100)
    return sum(rates) / len(rates)


SCENARIOS = {
    # every margin 3x larger from one step on (a sudden jump in confidence)
    "jump": lambda t0: (lambda t: 1.0 if t < t0 else 3.0),
    # margins grow steadily, 1x -> 4x over 300 steps (sustained over-optimisation)
    "trend": lambda t0: (lambda t: 1.0 if t < t0 else 1.0 + 3.0 * min(t - t0, 300) / 300),
}


def shift_response(config: DynamicBetaConfig, scenario: str, *, n: int, steps: int = 300, seeds: int = 3) -> float:
    """Change of ``log(beta)`` over ``steps`` steps after the margins start to grow (> 0: beta rises)."""
    out = []
    for seed in range(seeds):
        t0 = config.warmup_steps + 200
        betas = simulate(config, n=n, steps=t0 + steps, seed=seed, scale=SCENARIOS[scenario](t0))
        out.append(math.log(betas[-1] / betas[t0 - 1]))
    return sum(out) / len(out)


def drift_table(batch_sizes=(16, 64, 256), base: DynamicBetaConfig | None = None, steps: int = 2000,
                rules=P_HAT_RULES) -> str:
    """Markdown table: drift per 100 steps (stationary) and the response to growing margins, per rule and n."""
    base = base or DynamicBetaConfig()
    lines = [
        "| rule | n (global batch) | stationary: d log(beta) per 100 steps | beta factor per 100 steps "
        "| jump x3: d log(beta) in 300 steps | trend 1x->4x: d log(beta) in 300 steps |",
        "|---|---|---|---|---|---|",
    ]
    for rule in rules:
        cfg = replace(base, risk_rule=rule)
        for n in batch_sizes:
            d = drift_per_100(cfg, n=n, steps=steps)
            jump = shift_response(cfg, "jump", n=n)
            trend = shift_response(cfg, "trend", n=n)
            lines.append(f"| {rule} | {n} | {d:+.4f} | {math.exp(d):.4f} | {jump:+.4f} | {trend:+.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="dynamic-phase steps per simulated run")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 64, 256], help="global batch sizes n")
    parser.add_argument("--rules", nargs="+", default=list(P_HAT_RULES), choices=list(RISK_RULES),
                        help="risk rules (default: the p_hat rules; any registered rule can be simulated)")
    args = parser.parse_args(argv)
    print(drift_table(tuple(args.batch_sizes), steps=args.steps, rules=args.rules))


if __name__ == "__main__":
    main()
