"""CPU fallback for TRL's fused LM-head log-prob kernel.

TRL 1.x computes SFT (and DPO) log-probabilities through
``trl.trainer.utils._ChunkedLogProbFunction``, a Triton kernel. Without
Triton (CPU-only torch) that name is ``None`` and training fails with
``AttributeError: 'NoneType' object has no attribute 'apply'``. Unsloth's CPU
backend installs its own router; the plain transformers + PEFT path needs this
one. CUDA/XPU tensors keep TRL's kernel whenever it exists.

The math, per token with target ``y`` and hidden state ``h``:
``z = softcap(logit_scale * (W h + b)) / temperature`` and
``log p(y) = z_y - logsumexp(z)``; rows are processed in chunks under
activation checkpointing, so the ``[N, V]`` logits never exist all at once.
"""

from __future__ import annotations

from opensloth.patches.registry import PatchTargetError, is_applied, record_patch, require_attr

__all__ = [
    "PATCH_NAME",
    "WRITTEN_FOR",
    "patch_trl_cpu_logprobs",
    "torch_chunked_log_probs",
]

PATCH_NAME = "trl_cpu_chunked_logprobs"
WRITTEN_FOR = "trl 1.x (trl.trainer.utils._ChunkedLogProbFunction, Triton-only)"
_ROW_ELEMENTS = 8 * 1024 * 1024  # rows per chunk = this / vocab size


def _chunk_logits(hidden, weight, bias, temperature, softcap, logit_scale):
    import torch

    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _chunk_target_logprob(hidden, weight, bias, targets, temperature, softcap, logit_scale):
    import torch

    z = _chunk_logits(hidden, weight, bias, temperature, softcap, logit_scale)
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def torch_chunked_log_probs(hidden, weight, bias, targets, temperature=1.0, chunk_size=None,
                            final_logit_softcapping=None, logit_scale=1.0,
                            outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
    """Pure-torch twin of TRL's ``ChunkedLogProbFunction.apply`` (same arguments and outputs).

    Returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``,
    each of shape ``[N]`` or ``None`` when not requested. Only ``log_probs``
    carries gradients; the others are diagnostics computed without grad.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    n, vocab = hidden.shape[0], weight.shape[0]
    rows = max(1, _ROW_ELEMENTS // max(1, vocab))
    pieces, extras = [], {k: [] for k in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")}
    for start in range(0, max(n, 1), rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if h.requires_grad or weight.requires_grad:
            lp = checkpoint(_chunk_target_logprob, h, weight, bias, t, temperature, final_logit_softcapping,
                            logit_scale, use_reentrant=False)
        else:
            lp = _chunk_target_logprob(h, weight, bias, t, temperature, final_logit_softcapping, logit_scale)
        pieces.append(lp)
        if any(k in outputs for k in extras):
            with torch.no_grad():
                z = _chunk_logits(h, weight, bias, temperature, final_logit_softcapping, logit_scale)
                logp = torch.log_softmax(z, dim=-1)
                extras["entropy"].append(-(logp.exp() * logp).sum(-1))
                extras["log_sum_sq_probs"].append(torch.logsumexp(2 * logp, dim=-1))
                extras["mean_logits"].append(z.mean(-1))
                extras["is_top1"].append(z.argmax(-1) == t)
    log_probs = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    out = [log_probs]
    for key in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
        out.append(torch.cat(extras[key]) if key in outputs and extras[key] else None)
    return tuple(out)


class _DeviceRouter:
    """Drop-in for ``_ChunkedLogProbFunction``: TRL's kernel on CUDA/XPU, torch elsewhere."""

    _opensloth_router = True
    kernel = None

    @classmethod
    def apply(cls, hidden, *args, **kwargs):
        if cls.kernel is not None and hidden.device.type in ("cuda", "xpu"):
            return cls.kernel.apply(hidden, *args, **kwargs)
        return torch_chunked_log_probs(hidden, *args, **kwargs)


def patch_trl_cpu_logprobs() -> bool:
    """Route TRL's fused LM-head log-probs to a torch implementation off-GPU.

    Returns True when this call installed the router, False when a router
    (ours, or Unsloth's CPU one) is already in place. Raises
    PatchTargetError when TRL no longer has the fused-head kernel hook.
    """
    try:
        from trl.trainer import utils as trl_utils
    except ImportError as exc:  # pragma: no cover - trl is a dependency
        raise PatchTargetError(f"opensloth patch '{PATCH_NAME}' needs trl: {exc}") from exc
    current = require_attr(trl_utils, "_ChunkedLogProbFunction", PATCH_NAME, WRITTEN_FOR)
    if getattr(current, "_opensloth_router", False):
        return False
    if getattr(current, "_unsloth_cpu_dispatch", False):
        if not is_applied(PATCH_NAME):
            record_patch(PATCH_NAME, "trl.trainer.utils._ChunkedLogProbFunction", WRITTEN_FOR,
                         "already routed to CPU by Unsloth's CPU backend; left as is")
        return False
    router = type("_OpenslothChunkedLogProbRouter", (_DeviceRouter,), {"kernel": current})
    trl_utils._ChunkedLogProbFunction = router
    record_patch(PATCH_NAME, "trl.trainer.utils._ChunkedLogProbFunction", WRITTEN_FOR,
                 "fused LM-head log-probs computed in torch on CPU (TRL's kernel needs Triton)")
    return True
