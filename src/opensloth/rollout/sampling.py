"""Sampling with one random generator per sequence.

``model.generate(do_sample=True)`` draws every row of a batch from the global
torch RNG, so a candidate changes when its batch-mates change (another world
size, another batch size). Here generation runs greedily over scores that
:class:`PerRowSampler` has already turned into a one-hot choice: each row is
sampled from its own ``torch.Generator`` (seeded by
:func:`opensloth.rollout.seeding.derive_seed`) by inverse-CDF lookup of one
uniform draw per step. A row's tokens then depend only on its seed and its
own logits.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to ``-inf``) the tokens outside top-k and the top-p nucleus; rows are independent.

    ``top_k=0`` and ``top_p=1`` are off. The most likely token always survives.
    """
    out = logits.clone()
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token: a token is kept while that mass is < top_p.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_rows(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row, the first token whose cumulative probability exceeds its uniform.

    ``probs`` is ``[batch, vocab]`` (rows sum to 1), ``uniforms`` ``[batch]`` in ``[0, 1)``.
    """
    cdf = torch.cumsum(probs.double(), dim=-1)
    cdf = cdf / cdf[:, -1:]  # exact 1.0 at the end despite rounding
    idx = torch.searchsorted(cdf, uniforms.double().unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


class PerRowSampler(LogitsProcessor):
    """Replace each row's scores by a one-hot choice sampled from that row's own generator.

    Use with greedy generation (``do_sample=False``) so the choice is taken as is.

    Args:
        seeds: one seed per row of the batch, in batch order.
        temperature, top_k, top_p: as in :class:`opensloth.rollout.settings.RolloutSettings`.
    """

    def __init__(self, seeds: list[int], temperature: float, top_k: int = 0, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("PerRowSampler needs temperature > 0; use plain greedy decoding for 0")
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"batch has {scores.shape[0]} rows but {len(self.generators)} seeds were given")
        logits = filter_logits(scores.float() / self.temperature, self.top_k, self.top_p)
        probs = torch.softmax(logits, dim=-1)
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        chosen = sample_rows(probs.cpu(), uniforms).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return out
