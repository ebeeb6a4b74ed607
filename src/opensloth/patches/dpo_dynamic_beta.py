"""Dynamic beta inside TRL's ``DPOTrainer``: a thin layer over :mod:`opensloth.dpo.controller`.

Two steps, both explicit::

    import unsloth                         # optional; first, so it can rebind trl.DPOTrainer
    from opensloth.patches.dpo_dynamic_beta import patch_dpo_trainer_dynamic_beta, attach_dynamic_beta
    cls = patch_dpo_trainer_dynamic_beta()  # patches the DPOTrainer class in use (idempotent)
    trainer = cls(model=peft_model, ref_model=None, args=dpo_config, ...)
    runtime = attach_dynamic_beta(trainer, DynamicBetaConfig(...))
    trainer.train()

What the patch does (written for trl 1.15 / transformers 5.x; it checks the
source of ``DPOTrainer._compute_loss`` and refuses to apply when the lines it
relies on changed):

- ``_compute_loss``: before TRL computes the loss it sets ``self.beta`` to the
  controller's beta of the current optimizer step, so TRL's own
  ``-logsigmoid(beta * M)`` and its ``rewards/*`` metrics use it. A forward
  hook on the policy captures the per-token log-probs of the fused LM head
  (policy pass, then reference pass), from which the per-pair margins are
  rebuilt with TRL's own arithmetic, checked against TRL's loss (a mismatch
  raises), and buffered for the step.
- ``train``: on ``resume_from_checkpoint`` the controller state is restored
  from ``<checkpoint>/dynamic_beta_state.json`` before training continues.

Instances without :func:`attach_dynamic_beta` behave exactly like the
original class.

At each optimizer-step boundary (``on_step_end``) the margins buffered on
every rank are gathered in rank order, every rank checks that all ranks hold
the same controller state, and the controller updates beta for the next
step. Rank 0 appends the step record to the margins JSONL and the values go
into TRL's metrics (TensorBoard) under ``dynamic_beta/``. ``on_save`` writes
the controller state into the checkpoint atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch
from transformers import TrainerCallback

from opensloth.atomic import write_json_atomic, write_text_atomic
from opensloth.distributed import all_gather_object_list
from opensloth.dpo.controller import STATE_FILE, DynamicBetaConfig, DynamicBetaController, PHASE_WARMUP
from opensloth.log import log_rank0, warn_rank0
from opensloth.patches.registry import (
    PatchTargetError,
    is_patched,
    require_attr,
    require_source_contains,
    swap_method,
)

__all__ = [
    "LOSS_PATCH",
    "METRIC_PREFIX",
    "RESUME_PATCH",
    "STATE_FILE",
    "WRITTEN_FOR",
    "DynamicBetaCallback",
    "DynamicBetaRuntime",
    "attach_dynamic_beta",
    "capture_fused_log_probs",
    "check_loss_matches",
    "margins_from_log_probs",
    "patch_dpo_trainer_dynamic_beta",
]

LOSS_PATCH = "dpo_dynamic_beta_loss"
RESUME_PATCH = "dpo_dynamic_beta_resume"
WRITTEN_FOR = "trl 1.15 (DPOTrainer._compute_loss with fused LM head) + transformers 5.17 Trainer.train"
METRIC_PREFIX = "dynamic_beta/"
RUNTIME_ATTR = "_opensloth_dynamic_beta"

# Lines of DPOTrainer._compute_loss the margin capture relies on: the policy and
# reference passes return per-token log-probs sliced to the completion width,
# and the sigmoid loss reads self.beta.
_LOSS_SOURCE_SNIPPETS = [
    "outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)",
    "per_token_logps = outputs.log_probs[:, -seq_len:]",
    "ref_per_token_logps = ref_outputs.log_probs[:, -seq_len:]",
    "chosen_logratios = chosen_logps - ref_chosen_logps",
    "rejected_logratios = rejected_logps - ref_rejected_logps",
    "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
]


# --------------------------------------------------------------------------- margins


@contextlib.contextmanager
def capture_fused_log_probs(*modules, keep_graph: bool = False):
    """Collect ``output.log_probs`` of every forward of ``modules`` inside the block, in call order.

    Detached unless ``keep_graph`` (the ``same_batch`` timing rebuilds the loss
    from them). None entries are skipped (no separate reference model).
    """
    captured = []

    def hook(_module, _args, output):
        log_probs = getattr(output, "log_probs", None)
        if log_probs is not None:
            captured.append(log_probs if keep_graph else log_probs.detach())

    handles = [m.register_forward_hook(hook) for m in modules if m is not None]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def logratios_from_log_probs(captured: list, inputs: dict, precomputed_ref: bool):
    """Per-pair ``(logp_w - ref_w, logp_l - ref_l)`` with TRL's order of operations.

    ``captured`` holds the policy pass and (unless ``precomputed_ref``) the
    reference pass; the batch is ``[chosen; rejected]`` along dim 0.
    """
    expected = 1 if precomputed_ref else 2
    if len(captured) != expected:
        raise RuntimeError(
            f"opensloth dynamic beta expected {expected} fused forward pass(es) in DPOTrainer._compute_loss, "
            f"saw {len(captured)}; the installed TRL computes the loss differently ({WRITTEN_FOR})"
        )
    seq_len = inputs["completion_mask"].size(1) - 1
    chosen_logps, rejected_logps = captured[0][:, -seq_len:].sum(dim=1).chunk(2, dim=0)
    if precomputed_ref:
        ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_chosen_logps, ref_rejected_logps = captured[1][:, -seq_len:].sum(dim=1).chunk(2, dim=0)
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps


def margins_from_log_probs(captured: list, inputs: dict, precomputed_ref: bool):
    """Per-pair margins ``(logp_w - ref_w) - (logp_l - ref_l)`` with TRL's order of operations."""
    chosen_logratios, rejected_logratios = logratios_from_log_probs(captured, inputs, precomputed_ref)
    return chosen_logratios - rejected_logratios


def _softplus(x: float) -> float:
    """``log(1 + exp(x))`` without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def check_loss_matches(loss, margins: list[float], beta: float, weight: float) -> None:
    """Raise when TRL's loss is not ``weight * mean(-logsigmoid(beta * M))`` of the rebuilt margins.

    Computed on Python floats: on a busy CPU a torch op on a handful of
    elements can cost milliseconds of thread synchronisation. The tolerance
    follows the loss dtype (bf16 rounds at ~0.4%).
    """
    import torch

    value = float(loss.detach())
    if not margins or not all(math.isfinite(m) for m in margins) or not math.isfinite(value):
        return  # NaN/inf margins: TRL's loss is not finite either; the controller drops them
    expected = weight * math.fsum(_softplus(-beta * m) for m in margins) / len(margins)
    rtol = max(1e-4, 4 * torch.finfo(loss.dtype).eps) if loss.dtype.is_floating_point else 1e-4
    if abs(value - expected) > 1e-6 + rtol * abs(expected):
        raise RuntimeError(
            f"opensloth dynamic beta: margins captured from DPOTrainer do not reproduce its loss "
            f"({value:.6g} vs {expected:.6g}); the installed TRL changed how the loss is computed ({WRITTEN_FOR})"
        )


# --------------------------------------------------------------------------- runtime


def _write_json_atomic(path: str, payload: dict) -> None:
    write_json_atomic(path, payload, sort_keys=False)


class DynamicBetaRuntime:
    """Controller, margin buffer and logs of one trainer (created by :func:`attach_dynamic_beta`)."""

    def __init__(self, trainer, config: DynamicBetaConfig, margins_log_path: str, on_update=None):
        self.trainer = trainer
        self.controller = DynamicBetaController(config)
        self.pending: list[float] = []  # this rank's margins of the current optimizer step
        # this rank's chosen / rejected log-ratios of the step, kept only for rules that read them
        self.pending_logratios: dict[str, list[float]] = {"chosen_logratios": [], "rejected_logratios": []}
        self.margins_log_path = margins_log_path
        self.is_main = trainer.accelerator.is_main_process
        self.last_records: list[dict] = []
        self._log_file = None  # opened on first write (rank 0), flushed every step
        # Extra writer called on rank 0 after every update (opensloth.dpo.reference_logs.ReferenceLogWriter).
        self.on_update = on_update
        self.epoch = 0  # 0-based epoch and the update's index within it, for on_update
        self.index_in_epoch = 0

    @property
    def beta(self) -> float:
        """Beta of the current optimizer step (fixed until the step ends)."""
        return self.controller.beta

    def add_margins(self, margins: list[float], chosen_logratios: list[float] | None = None,
                    rejected_logratios: list[float] | None = None) -> None:
        """Buffer this rank's margins (and, for rules that read them, log-ratios) of one micro-batch."""
        self.pending.extend(margins)
        if self.controller.needs_logratios:
            self.pending_logratios["chosen_logratios"].extend(chosen_logratios)
            self.pending_logratios["rejected_logratios"].extend(rejected_logratios)

    def begin_epoch(self, epoch: float) -> None:
        """The Trainer starts epoch ``floor(epoch)`` (its fractional epoch count so far)."""
        self.epoch = math.floor(epoch + 1e-9)
        self.index_in_epoch = 0

    @property
    def per_micro_batch(self) -> bool:
        """The timings that update beta inside every ``_compute_loss`` call instead of at the step boundary."""
        return self.controller.config.beta_timing != "step"

    def end_step(self, global_step: int, epoch: float | None = None) -> list[dict]:
        """Gather the step's margins from every rank, update the controller, log. Returns the records."""
        local, self.pending = self.pending, []
        if self.controller.step != global_step - 1:
            raise RuntimeError(
                f"dynamic-beta controller has seen {self.controller.step} steps but the trainer finished "
                f"step {global_step}; was the controller state restored on resume?"
            )
        local_lr = self.pending_logratios
        self.pending_logratios = {"chosen_logratios": [], "rejected_logratios": []}
        return self._update(local, global_step, epoch, local_lr)

    def update_micro_batch(self, local: list[float]) -> list[dict]:
        """``same_batch`` / ``micro_batch`` timings: update from this micro-batch's margins, gathered over ranks.

        Every rank calls it once per training micro-batch (a collective), inside ``_compute_loss``.
        """
        state = self.trainer.state
        return self._update(local, state.global_step + 1, state.epoch)

    def _update(self, local: list[float], global_step: int, epoch: float | None,
                local_lr: dict | None = None) -> list[dict]:
        beta_old, update = self.controller.beta, self.controller.step
        payload = {"digest": self.controller.digest(), "margins": local}
        if self.controller.needs_logratios:
            payload.update(local_lr)
        gathered = all_gather_object_list(payload)
        digests = [g["digest"] for g in gathered]
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"dynamic-beta controller state differs across ranks: {digests}")
        margins = [m for g in gathered for m in g["margins"]]  # rank order, then micro-batch order
        extras = None
        if self.controller.needs_logratios:  # same order as the margins
            extras = {k: [v for g in gathered for v in g[k]] for k in ("chosen_logratios", "rejected_logratios")}
        records = self.controller.observe_step(margins, extras)
        for rec in records:
            rec["global_step"] = global_step
            if rec["type"] == "warmup_end":
                log_rank0(f"dynamic beta: warmup ended at step {global_step} (update {update}), "
                          f"tau_0={rec['tau_0']:.6g} from {rec['n_warmup_margins']} margins")
        if self.controller.config.beta_timing == "same_batch":
            records[-1]["beta_used"] = records[-1]["beta_next"]  # this micro-batch's loss uses the new beta
        if records[-1]["n_nonfinite"]:
            warn_rank0(f"dynamic beta: step {global_step} had {records[-1]['n_nonfinite']} NaN/inf margins; "
                       "they were left out of tau and p_hat")
        self._append_log(records)
        self._push_metrics(records[-1])
        self.last_records = records
        if self.on_update is not None and self.is_main:
            self.on_update(epoch=self.epoch, index=self.index_in_epoch, update=update, margins=margins,
                           records=records, beta_old=beta_old, config=self.controller.config,
                           epoch_float=float(epoch if epoch is not None else self.epoch))
        self.index_in_epoch += 1
        return records

    def _append_log(self, records: list[dict]) -> None:
        if not self.is_main:
            return
        if self._log_file is None:
            os.makedirs(os.path.dirname(self.margins_log_path) or ".", exist_ok=True)
            self._log_file = open(self.margins_log_path, "a")
        for rec in records:
            self._log_file.write(json.dumps(rec, sort_keys=True) + "\n")
        self._log_file.flush()

    def close(self) -> None:
        """Close the margins JSONL (reopened in append mode on the next write) and the extra writer."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.on_update is not None and hasattr(self.on_update, "close"):
            self.on_update.close()

    def _push_metrics(self, rec: dict) -> None:
        # TRL's log() averages every list in _metrics over the logging window and clears it.
        metrics = self.trainer._metrics["train"]
        values = {
            "beta": rec["beta_used"],
            "beta_next": rec["beta_next"],
            "warmup": 1.0 if rec["phase"] == PHASE_WARMUP else 0.0,
            "n_nonfinite": float(rec["n_nonfinite"]),
        }
        if rec["tau"] is not None:
            values["tau"] = rec["tau"]
        if rec["p_hat"] is not None:
            values.update(p_hat=rec["p_hat"], risk_over=float(rec["risk_over"]), u=rec["u"], s=rec["s"])
        for key in ("mean", "std", "p10", "p50", "p90", "min", "max"):
            if key in rec["margins"]:
                values[f"margin_{key}"] = rec["margins"][key]
        for key, value in values.items():
            metrics[METRIC_PREFIX + key].append(value)

    def save(self, checkpoint_dir: str) -> str:
        """Write the controller state into ``checkpoint_dir`` (atomic). Returns the file path."""
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(checkpoint_dir, STATE_FILE)
        _write_json_atomic(path, self.controller.state_dict())
        return path

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restore the controller from ``checkpoint_dir``; raises FileNotFoundError naming the file."""
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: the checkpoint was not written by a dynamic-beta run, so beta, tau "
                "and the warmup margins cannot be restored; resume a dynamic-beta checkpoint or start afresh"
            )
        with open(path) as fh:
            self.controller.load_state_dict(json.load(fh))
        self.pending = []
        self.pending_logratios = {"chosen_logratios": [], "rejected_logratios": []}
        if self.on_update is not None and hasattr(self.on_update, "append"):
            self.on_update.append = True  # continue the extra logs of the interrupted run
        log_rank0(f"dynamic beta: resumed from {path} at step {self.controller.step} "
                  f"(phase={self.controller.phase}, beta={self.controller.beta:.6g})")
        self._forget_records_after(self.controller.step)
        self._append_log([{"type": "resume", "step": self.controller.step, "checkpoint": checkpoint_dir,
                           "beta_next": self.controller.beta, "tau": self.controller.tau}])

    def _forget_records_after(self, step: int) -> None:
        """Drop the log records of steps after ``step`` (the run that stopped got that far): they are redone.

        A resume in the same run dir otherwise appends a second record for every
        step between the checkpoint and the point where the first run stopped.
        Rank 0 rewrites the file atomically; an unreadable line is kept as it is.
        """
        if not self.is_main or not os.path.isfile(self.margins_log_path):
            return
        kept, removed = [], 0
        with open(self.margins_log_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    rec_step = rec.get("global_step", rec.get("step"))
                except (ValueError, AttributeError):
                    rec_step = None
                if isinstance(rec_step, int) and rec_step > step:
                    removed += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        if removed:
            write_text_atomic(self.margins_log_path, "".join(kept))
            log_rank0(f"dynamic beta: dropped {removed} records of steps after {step} from "
                      f"{self.margins_log_path}; they are recomputed now")


class DynamicBetaCallback(TrainerCallback):
    """Step-boundary update and checkpointing of a :class:`DynamicBetaRuntime`."""

    def __init__(self, runtime: DynamicBetaRuntime):
        self.runtime = runtime

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.runtime.per_micro_batch and self.runtime.controller.step != state.global_step:
            raise RuntimeError(
                f"dynamic-beta controller is at step {self.runtime.controller.step} but training starts at "
                f"step {state.global_step}; resume with trainer.train(resume_from_checkpoint=...) on a trainer "
                "patched by patch_dpo_trainer_dynamic_beta, which restores the controller"
            )

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.runtime.begin_epoch(state.epoch or 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.runtime.per_micro_batch:
            self.runtime.end_step(state.global_step, state.epoch)

    def on_train_end(self, args, state, control, **kwargs):
        self.runtime.close()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            self.runtime.save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


# --------------------------------------------------------------------------- patches


def _make_compute_loss(original):
    def _compute_loss(self, model, inputs, return_outputs):
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is None:
            return original(self, model, inputs, return_outputs)
        training = self.model.training
        same_batch = training and runtime.controller.config.beta_timing == "same_batch"
        self.beta = runtime.beta  # step timing: fixed for every micro-batch of this optimizer step
        # The policy pass, then the reference pass: the adapter-disabled policy (LoRA) or the separate ref_model.
        with capture_fused_log_probs(self.model, getattr(self, "ref_model", None), keep_graph=same_batch) as captured:
            result = original(self, model, inputs, return_outputs)
        chosen, rejected = logratios_from_log_probs(captured, inputs, self.precompute_ref_logps)
        margin_tensor = chosen - rejected
        margins = margin_tensor.detach().double().cpu().tolist()
        check_loss_matches(result[0] if return_outputs else result, margins, self.beta, self.loss_weights[0])
        if not training:
            return result  # evaluation never moves the controller
        chosen_lr, rejected_lr = chosen.detach().double().cpu().tolist(), rejected.detach().double().cpu().tolist()
        if not runtime.per_micro_batch:
            runtime.add_margins(margins, chosen_lr, rejected_lr)
            return result
        runtime.update_micro_batch(margins)  # collective: every rank's margins of this micro-batch
        if not same_batch:
            return result  # micro_batch: the new beta applies from the next micro-batch
        # same_batch: this micro-batch's loss uses the beta just computed from its own margins, with TRL's
        # arithmetic (-logsigmoid(beta * M), mean, loss weight) on the same graph. TRL's rewards/* metrics of
        # this call were logged with the previous beta.
        self.beta = runtime.beta
        loss = (-torch.nn.functional.logsigmoid(self.beta * margin_tensor)).mean() * self.loss_weights[0]
        return (loss, *result[1:]) if return_outputs else loss

    return _compute_loss


def _make_train(original):
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is not None and resume_from_checkpoint not in (None, False):
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if path is not None:  # None: let Trainer.train raise its own "no checkpoint" error
                runtime.load_checkpoint(path)
        return original(self, resume_from_checkpoint, *args, **kwargs)

    return train


def patch_dpo_trainer_dynamic_beta(trainer_cls=None):
    """Patch ``_compute_loss`` and ``train`` of the DPOTrainer class in use. Idempotent.

    Args:
        trainer_cls: the class to patch; default ``trl.DPOTrainer`` as bound
            now (after ``import unsloth`` that is Unsloth's class).

    Returns:
        The patched class.

    Raises:
        PatchTargetError: the class lacks the methods, or ``_compute_loss`` no
            longer contains the lines the margin capture relies on.
    """
    if trainer_cls is None:
        import trl

        trainer_cls = trl.DPOTrainer
    compute = require_attr(trainer_cls, "_compute_loss", LOSS_PATCH, WRITTEN_FOR)
    require_attr(trainer_cls, "train", RESUME_PATCH, WRITTEN_FOR)
    if not is_patched(compute, LOSS_PATCH):
        require_source_contains(compute, _LOSS_SOURCE_SNIPPETS, LOSS_PATCH, WRITTEN_FOR)
    swap_method(trainer_cls, "_compute_loss", _make_compute_loss, name=LOSS_PATCH, written_for=WRITTEN_FOR,
                description="DPO loss uses the dynamic-beta controller's beta; per-pair margins are buffered")
    swap_method(trainer_cls, "train", _make_train, name=RESUME_PATCH, written_for=WRITTEN_FOR,
                description="resume_from_checkpoint restores the dynamic-beta controller state")
    return trainer_cls


def _check_supported(trainer) -> None:
    """Dynamic beta covers the plain sigmoid DPO loss; other settings are refused with the fix."""
    needed = ["loss_types", "loss_weights", "f_divergence_type", "ld_alpha", "use_weighting",
              "aux_loss_enabled", "precompute_ref_logps", "_metrics"]
    missing = [n for n in needed if not hasattr(trainer, n)]
    if missing:
        raise PatchTargetError(
            f"opensloth patch '{LOSS_PATCH}' (written for {WRITTEN_FOR}): the trainer has no {missing}; "
            "the installed TRL is not supported"
        )
    problems = []
    if list(trainer.loss_types) != ["sigmoid"]:
        problems.append(f"loss_type={trainer.loss_types} (use loss_type='sigmoid')")
    if trainer.f_divergence_type != "reverse_kl":
        problems.append(f"f_divergence_type={trainer.f_divergence_type!r} (use 'reverse_kl')")
    if trainer.ld_alpha is not None:
        problems.append(f"ld_alpha={trainer.ld_alpha} (use None)")
    if trainer.use_weighting:
        problems.append("use_weighting=True (use False)")
    if trainer.aux_loss_enabled:
        problems.append("an MoE router aux loss is enabled (set router_aux_loss_coef=0)")
    if problems:
        raise ValueError("dynamic beta supports the plain sigmoid DPO loss only; got " + ", ".join(problems))


def attach_dynamic_beta(trainer, config: DynamicBetaConfig, *, margins_log_path: str | None = None,
                        on_update=None) -> DynamicBetaRuntime:
    """Give ``trainer`` a dynamic-beta controller. Call once, before ``train()``.

    Args:
        trainer: a DPOTrainer whose class was patched by :func:`patch_dpo_trainer_dynamic_beta`.
        config: controller settings (frozen; each trainer gets its own controller).
        margins_log_path: JSONL written by rank 0, one record per step;
            default ``<output_dir>/logs/margins/margins.jsonl``.
        on_update: called on rank 0 after every update with keywords ``epoch``,
            ``index``, ``update``, ``margins``, ``records``, ``beta_old``,
            ``config``, ``epoch_float`` (e.g. a
            :class:`opensloth.dpo.reference_logs.ReferenceLogWriter`).

    Returns:
        The :class:`DynamicBetaRuntime` (also stored on the trainer).

    Raises:
        RuntimeError: the class is not patched, or a controller is already attached.
        ValueError: the DPO loss settings are not the plain sigmoid loss.
    """
    cls = type(trainer)
    if not (is_patched(getattr(cls, "_compute_loss", None), LOSS_PATCH)
            and is_patched(getattr(cls, "train", None), RESUME_PATCH)):
        raise RuntimeError(
            f"{cls.__module__}.{cls.__qualname__} is not patched for dynamic beta; call "
            "opensloth.patches.dpo_dynamic_beta.patch_dpo_trainer_dynamic_beta(type(trainer)) first"
        )
    if getattr(trainer, RUNTIME_ATTR, None) is not None:
        raise RuntimeError("a dynamic-beta controller is already attached to this trainer")
    _check_supported(trainer)
    if DynamicBetaController(config).rule.pair_weights is not None:
        raise ValueError(f"risk_rule {config.risk_rule!r} filters pairs with per-pair loss weights, which this "
                         "trainer does not apply yet; use risk_rule 'beta_dpo' (the same calibration without the filter)")
    if margins_log_path is None:
        margins_log_path = os.path.join(trainer.args.output_dir, "logs", "margins", "margins.jsonl")
    runtime = DynamicBetaRuntime(trainer, config, margins_log_path, on_update=on_update)
    setattr(trainer, RUNTIME_ATTR, runtime)
    trainer.beta = runtime.beta
    trainer.add_callback(DynamicBetaCallback(runtime))
    log_rank0(f"dynamic beta attached: beta_0={config.beta_0} warmup_steps={config.warmup_steps} "
              f"rule={config.risk_rule}, margins log {margins_log_path}")
    return runtime
