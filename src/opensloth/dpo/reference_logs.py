"""The log files of the dynamic-DPO reference repositories, written beside opensloth's own.

With ``reference_logs`` (set by a reference config's ``margin_log.log_dir``),
rank 0 writes into the margins folder, once per controller update (an
optimizer step with the default timing, a micro-batch with the micro-batch
timings), from the margins gathered over all ranks:

- ``margins_log.jsonl``: ``epoch``, ``step`` (update index within the epoch),
  ``batch_size``, ``mean``, ``std`` (population), ``min``, ``p10``,
  ``median``, ``p90`` (linear interpolation), ``max``, ``pos_frac`` (share
  ``> 0``), ``npy`` (the path below, as joined) and ``sample`` (the margins,
  all of them or the first ``sample_size``); every update, warmup included.
- ``epoch_XXX/step_XXXXX.npy``: the update's margins, float32, in rank order.
- ``risk_test_and_beta_log.jsonl``: one ``{"type": "warmup_end", "tau_0",
  "beta_0", "warmup_steps", "global_margin_n"}``, then per update after the
  warmup ``{"step", "tau", "p_hat", "risk_over", "beta", "beta_old",
  "beta_new", "u_k", "s_k", "alpha", "global_margin_n"}`` (``step`` counts
  updates from 0; ``beta`` = ``beta_new``; the keys of both the single-GPU and
  the FSDP script of dynamic_beta).
- ``risk.log``: the per-update dict dynamic-dpo-v1 prints,
  ``{'dpo/beta': ..., 'dpo/margin_mean': ..., 'dpo/loss': ..., 'risk/p_hat':
  ..., 'risk/tau': ..., 'risk/fail': 0|1, 'risk/u_k': ..., 'risk/s_k': ...,
  'epoch': ...}``, which its ``fail_rate_from_running_logs`` notebook scans
  (``*.log``). ``risk/fail`` is ``p_hat > delta`` for dynamic-dpo-v1 and the
  risk test's verdict otherwise.

A fresh run truncates the files (the reference appends ``margins_log.jsonl``
across runs, mixing them); a resumed run appends. numpy is imported when the
first file is written.
"""

from __future__ import annotations

import json
import math
import os

from opensloth.dpo.controller import quantile

__all__ = ["MARGINS_LOG", "RISK_FAIL_LOG", "RISK_LOG", "ReferenceLogWriter", "reference_margin_record"]

MARGINS_LOG = "margins_log.jsonl"
RISK_LOG = "risk_test_and_beta_log.jsonl"
RISK_FAIL_LOG = "risk.log"


def reference_margin_record(margins: list[float], *, epoch: int, step: int, npy: str, sample_size: int = 0) -> dict:
    """One ``margins_log.jsonl`` line (keys in the reference's order)."""
    n = len(margins)
    if n == 0:
        return {"epoch": epoch, "step": step, "batch_size": 0, "npy": npy, "sample": []}
    mean = math.fsum(margins) / n
    return {
        "epoch": epoch,
        "step": step,
        "batch_size": n,
        "mean": mean,
        "std": math.sqrt(math.fsum((m - mean) ** 2 for m in margins) / n),
        "min": min(margins),
        "p10": quantile(margins, 0.1),
        "median": quantile(margins, 0.5),
        "p90": quantile(margins, 0.9),
        "max": max(margins),
        "pos_frac": sum(1 for m in margins if m > 0) / n,
        "npy": npy,
        "sample": list(margins if sample_size <= 0 else margins[:sample_size]),
    }


def _softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


class ReferenceLogWriter:
    """Writes the reference's files into ``log_dir``; called by the dynamic-beta runtime once per update.

    Args:
        log_dir: the margins folder (``margin_log.log_dir``).
        sample_size: length of ``sample`` in ``margins_log.jsonl`` (0: every margin).
        fail_rule: ``"risk_over"`` (the risk test) or ``"p_hat_above_delta"`` (dynamic-dpo-v1's ``risk/fail``).
    """

    def __init__(self, log_dir: str, *, sample_size: int = 0, fail_rule: str = "risk_over"):
        if fail_rule not in ("risk_over", "p_hat_above_delta"):
            raise ValueError(f"fail_rule={fail_rule!r} is not 'risk_over' or 'p_hat_above_delta'")
        self.log_dir = log_dir
        self.sample_size = sample_size
        self.fail_rule = fail_rule
        self.append = False  # set by the runtime on resume
        self._files: dict[str, object] = {}

    def _file(self, name: str):
        if name not in self._files:
            os.makedirs(self.log_dir, exist_ok=True)
            self._files[name] = open(os.path.join(self.log_dir, name), "a" if self.append else "w")
        return self._files[name]

    def _write(self, name: str, line: str) -> None:
        fh = self._file(name)
        fh.write(line + "\n")
        fh.flush()

    def _save_npy(self, path: str, margins: list[float]) -> None:
        import numpy as np

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npy"
        np.save(tmp, np.asarray(margins, dtype=np.float32))
        os.replace(tmp, path)  # a reader never sees half an array

    def __call__(self, *, epoch: int, index: int, update: int, margins: list[float], records: list[dict],
                 beta_old: float, config, epoch_float: float) -> None:
        """Write one update.

        Args:
            epoch: 0-based epoch; ``index``: the update's index within it; ``update``: 0-based over the run.
            margins: the update's margins (all ranks, rank order).
            records: the controller's records of this update (``warmup_end`` first when the warmup ended).
            beta_old: the beta before the update; ``config``: the controller's :class:`DynamicBetaConfig`.
            epoch_float: the Trainer's fractional epoch, for ``risk.log``.
        """
        npy = os.path.join(self.log_dir, f"epoch_{epoch:03d}", f"step_{index:05d}.npy")
        self._save_npy(npy, margins)
        self._write(MARGINS_LOG, json.dumps(reference_margin_record(
            margins, epoch=epoch, step=index, npy=npy, sample_size=self.sample_size)))
        step = records[-1]
        for rec in records:
            if rec["type"] == "warmup_end":
                self._write(RISK_LOG, json.dumps({"type": "warmup_end", "tau_0": rec["tau_0"], "beta_0": rec["beta_0"],
                                                  "warmup_steps": config.warmup_steps,
                                                  "global_margin_n": rec["n_warmup_margins"]}))
        beta_new = step["beta_next"]
        fields = {"dpo/beta": beta_new,
                  "dpo/margin_mean": math.fsum(margins) / len(margins) if margins else 0.0,
                  "dpo/loss": (math.fsum(_softplus(-step["beta_used"] * m) for m in margins) / len(margins)
                               if margins else 0.0)}
        if step.get("p_hat") is not None:
            self._write(RISK_LOG, json.dumps({
                "step": update, "tau": step["tau"], "p_hat": step["p_hat"], "risk_over": bool(step["risk_over"]),
                "beta": beta_new, "beta_old": beta_old, "beta_new": beta_new, "u_k": step["u"], "s_k": step["s"],
                "alpha": config.alpha, "global_margin_n": len(margins)}))
            fail = step["p_hat"] > config.delta if self.fail_rule == "p_hat_above_delta" else step["risk_over"]
            fields.update({"risk/p_hat": step["p_hat"], "risk/tau": step["tau"], "risk/fail": int(bool(fail)),
                           "risk/u_k": step["u"], "risk/s_k": step["s"]})
        fields["epoch"] = round(epoch_float, 4)
        self._write(RISK_FAIL_LOG, repr(fields))

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}
