"""The beta timings as one pure function over a stream of margin batches.

:func:`replay` feeds a :class:`~opensloth.dpo.controller.DynamicBetaController`
one batch of margins per update and reports, per update, the beta the DPO loss
uses and that loss, ``mean(-log sigmoid(beta_used * M))``. It is what the
trainer patch does at each update (``opensloth.patches.dpo_dynamic_beta``),
without a trainer, so the timings can be checked against the published
formulas on fixed streams (tests/test_dpo_reference_timing.py):

- ``step`` and ``micro_batch``: the loss uses the beta from before the update
  (one batch = one optimizer step's global margins, or one micro-batch's);
- ``same_batch``: the controller first updates from this batch, and the loss
  uses the new beta (SeanYHan888/dynamic_beta, "Compute Loss").

Only the standard library is imported.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from opensloth.dpo.controller import DynamicBetaConfig, DynamicBetaController

__all__ = ["dpo_sigmoid_loss", "replay"]


def dpo_sigmoid_loss(margins: Sequence[float], beta: float) -> float:
    """``mean(-log sigmoid(beta * m))`` over ``margins`` (the DPO sigmoid loss of one batch)."""

    def softplus(x: float) -> float:
        return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))

    return math.fsum(softplus(-beta * m) for m in margins) / len(margins)


def replay(config: DynamicBetaConfig, batches: Iterable[Sequence[float]]) -> list[dict]:
    """One record per batch: ``beta_used``, ``beta_next``, ``tau``, ``p_hat``, ``u``, ``s``, ``risk_over``, ``loss``.

    ``batches`` are the margins of each update in the unit of
    ``config.beta_timing`` (global batch per step, or gathered micro-batch).
    """
    controller = DynamicBetaController(config)
    out = []
    for margins in batches:
        before = controller.beta
        step = controller.observe_step(margins)[-1]
        used = step["beta_next"] if config.beta_timing == "same_batch" else before
        out.append({"beta_used": used, "beta_next": step["beta_next"], "tau": step["tau"], "p_hat": step["p_hat"],
                    "u": step["u"], "s": step["s"], "risk_over": step["risk_over"], "phase": step["phase"],
                    "loss": dpo_sigmoid_loss(margins, used)})
    return out
