"""Cross-rank step planning: where every sample of one optimizer step goes. Plain Python, no torch.

:func:`plan_step` spreads one optimizer step's samples (all ranks x
grad-accum x batch) over ranks and micro-batches so that the slowest rank
does as little work as possible; :func:`plan_pairs` does the same with an
equal pair count per rank and per micro-batch, for preference (DPO) data.
Every rank calls them with the same lengths and gets the same answer: no
communication beyond the lengths. :func:`attention_coef_for` estimates the
cost model's ``c`` (see :mod:`opensloth.packing.partition`) from a model config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from opensloth.packing.partition import (
    _check_lengths,
    _improve,
    _Layout,
    balanced_rows,
    min_padding_partition,
    padded_cost,
    sequence_cost,
)

LAYOUTS = ("varlen", "rows4d", "padded")

__all__ = ["LAYOUTS", "StepPlan", "attention_coef_for", "drawn_layout", "plan_pairs", "plan_step"]


@dataclass(frozen=True)
class StepPlan:
    """Where every sample of one optimizer step goes.

    Attributes:
        micro_batches: ``micro_batches[rank][m]`` is the tuple of window
            positions (indices into the ``lengths`` given to the planner) that
            rank ``rank`` processes in its ``m``-th micro-batch. Every rank has
            exactly ``num_micro_batches`` entries; an empty tuple is a micro-batch
            with no sample (the caller runs a tiny all-masked batch so that every
            rank does the same number of forward/backward passes).
        rank_loads: planned cost per rank (the planner's objective).
        fallback: True when the stock (drawn) layout was kept because the
            balanced plan was infeasible within the budget or not better.
        rows: for the ``"rows4d"`` layout, ``rows[rank][m]`` is the tuple of
            packed rows of that micro-batch, each a tuple of window positions.
    """

    micro_batches: tuple[tuple[tuple[int, ...], ...], ...]
    rank_loads: tuple[float, ...]
    fallback: bool = False
    rows: tuple | None = None

    @property
    def world_size(self) -> int:
        return len(self.micro_batches)

    def positions_of(self, rank: int) -> list[int]:
        return [p for mb in self.micro_batches[rank] for p in mb]


def drawn_layout(n: int, world_size: int, num_micro_batches: int, batch_size: int) -> list[list[list[int]]]:
    """The layout of a stock data loader over one step window of ``n`` samples.

    Window position ``p`` belongs to global batch ``p // batch_size``; global
    batch ``g`` goes to rank ``g % world_size`` as its micro-batch
    ``g // world_size`` (accelerate's ``BatchSamplerShard`` order).
    """
    out: list[list[list[int]]] = [[[] for _ in range(num_micro_batches)] for _ in range(world_size)]
    for p in range(n):
        g = p // batch_size
        rank, m = g % world_size, g // world_size
        if m >= num_micro_batches:
            raise ValueError(
                f"{n} samples do not fit {world_size} ranks x {num_micro_batches} micro-batches x {batch_size}"
            )
        out[rank][m].append(p)
    return out


def _rebin_rank(items, lengths, num_bins, budget):
    """Spread one rank's items over its bins, longest first into the emptiest fitting bin."""
    toks = [0] * num_bins
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for i in sorted(items, key=lambda j: (-lengths[j], j)):
        m = min(range(num_bins), key=lambda b: (toks[b], b))
        if budget is not None and toks[m] + lengths[i] > budget:
            return None
        bins[m].append(i)
        toks[m] += lengths[i]
    return bins


def plan_step(
    lengths: Sequence[int],
    world_size: int,
    num_micro_batches: int,
    *,
    token_budget: int | None = None,
    attention_coef: float = 0.0,
    layout: str = "varlen",
    cross_rank: bool = True,
    batch_size: int | None = None,
    drawn: Sequence[Sequence[Sequence[int]]] | None = None,
    row_capacity: int | None = None,
    max_rounds: int | None = None,
) -> StepPlan:
    """Assign one optimizer step's samples to ranks and micro-batches.

    The objective is the slowest rank's work, since every rank waits for it at
    the gradient all-reduce. Work per sample is ``l + attention_coef * l**2``
    (a padding-free micro-batch costs the sum over its sequences). The planner:

    1. places samples heaviest first on the least-loaded rank, into that rank's
       emptiest micro-batch that stays within ``token_budget`` (a rank has
       exactly ``num_micro_batches`` micro-batches);
    2. improves the result by moving or swapping samples off the heaviest rank
       (:func:`_improve`);
    3. arranges each rank's samples for the layout: ``"varlen"`` spreads them
       over the micro-batches longest first (lower peak memory);
       ``"rows4d"`` packs them into rows of at most ``row_capacity``
       (:func:`balanced_rows`) and groups the rows into micro-batches by the
       least-padding DP; ``"padded"`` groups the samples themselves by that DP
       (:func:`min_padding_partition`), and also tries a window-wide plan
       (sorted samples cut into equal-cost micro-batches, dealt to ranks),
       keeping whichever has the lighter slowest rank.

    Layout costs: varlen is the sum of sample work; rows4d and padded pay
    rows x longest row (+ ``attention_coef`` x rows x longest**2, a dense
    mask). When the stock layout ``drawn`` is known the plan is never worse
    than it.

    The result depends only on the arguments, so every rank computes the same
    plan from the same lengths; nothing else needs to be exchanged.

    Args:
        lengths: token lengths of the step's samples, in draw order.
        world_size: number of ranks.
        num_micro_batches: micro-batches per rank in this step (grad-accum, or
            fewer for the epoch's last partial step).
        token_budget: most tokens in one micro-batch (rows4d and padded:
            rows x longest). ``None`` means unlimited.
        attention_coef: quadratic attention weight in the cost model.
        layout: "varlen" or "rows4d" (packed) or "padded" (one sample per row).
        cross_rank: False keeps every sample on the rank that drew it (needs
            ``drawn`` or ``batch_size``) and arranges only that rank's samples.
        batch_size: samples per micro-batch of the drawn layout
            (:func:`drawn_layout`), when ``drawn`` is not given.
        drawn: the layout the stock data loader drew, ``drawn[rank][m]`` =
            window positions.
        row_capacity: longest packed row for ``"rows4d"`` (default: the
            longest sample).
        max_rounds: cap on improvement rounds (default ``4 * len(lengths)``).

    Returns:
        A :class:`StepPlan` (with ``rows`` for ``"rows4d"``).

    Raises:
        ValueError: bad sizes, an unknown layout, a sample longer than the
            budget or the row capacity, or a bad ``drawn``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world_size < 1 or num_micro_batches < 1:
        raise ValueError(f"world_size and num_micro_batches must be >= 1, got {world_size}, {num_micro_batches}")
    lengths = _check_lengths(lengths)
    n = len(lengths)
    if token_budget is not None and lengths and max(lengths) > token_budget:
        raise ValueError(f"a sample of {max(lengths)} tokens exceeds the micro-batch token budget {token_budget}")
    if row_capacity is None:
        row_capacity = max(lengths) if lengths else 1
    if lengths and max(lengths) > row_capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens exceeds the row capacity {row_capacity}")
    if drawn is not None:
        drawn = [[list(mb) for mb in rank_mbs] for rank_mbs in drawn]
        if len(drawn) != world_size or any(len(mbs) != num_micro_batches for mbs in drawn):
            raise ValueError(f"drawn must have {world_size} ranks x {num_micro_batches} micro-batches")
        if sorted(p for mbs in drawn for mb in mbs for p in mb) != list(range(n)):
            raise ValueError("drawn must place every window position exactly once")
    elif batch_size is not None and n <= world_size * num_micro_batches * batch_size:
        drawn = drawn_layout(n, world_size, num_micro_batches, batch_size)
    if not cross_rank and drawn is None:
        raise ValueError("cross_rank=False needs the drawn layout: pass drawn or batch_size")

    weights = [sequence_cost(x, attention_coef) for x in lengths]
    k = num_micro_batches
    ctx = (lengths, weights, k, layout, attention_coef, token_budget, row_capacity)
    candidates: list[tuple[float, int, tuple]] = []  # (slowest rank, preference, (micro, rows, loads))

    def consider(arranged, preference):
        if arranged is not None:
            candidates.append((max(arranged[2]), preference, arranged))

    if cross_rank:
        budget = None if layout == "padded" else token_budget
        state = _Layout(lengths, weights, world_size, k, budget)
        placed = True
        for i in sorted(range(n), key=lambda j: (-weights[j], j)):
            for r in sorted(range(world_size), key=lambda q: (state.load[q], q)):
                m = state.roomiest_bin(r)
                if state.fits(r, m, lengths[i]):
                    state.add(i, r, m)
                    break
            else:
                placed = False
                break
        if placed:
            _improve(state, world_size, allow_moves=True, max_rounds=max_rounds or 4 * max(n, 1))
            consider(_arrange([state.bin_items[r] for r in range(world_size)], ctx), 0)
        if layout == "padded":
            consider(_padded_window_plan(world_size, ctx), 1)
    else:
        consider(_arrange(drawn, ctx), 0)
    if drawn is not None:
        consider(_as_drawn(drawn, ctx), 2)
    if not candidates:
        raise ValueError(
            f"no layout of {n} samples into {world_size} x {k} micro-batches respects the budget {token_budget}; "
            f"pass drawn or batch_size so the stock layout can be used"
        )
    _, preference, (micro, rows, loads) = min(candidates, key=lambda c: (c[0], c[1]))
    return StepPlan(micro_batches=micro, rank_loads=tuple(loads), fallback=cross_rank and preference == 2,
                    rows=rows)


def _arrange(rank_bins, ctx):
    """Arrange each rank's samples (given as its current bins, all within budget) for the layout."""
    lengths, weights, k, layout, coef, budget, row_capacity = ctx
    micro, rows_out, loads = [], [], []
    for bins_now in rank_bins:
        items = [i for b in bins_now for i in b]
        if layout == "varlen":
            bins = _rebin_rank(items, lengths, k, budget) or [list(b) for b in bins_now]
            micro.append(tuple(tuple(sorted(b)) for b in bins))
            loads.append(sum(weights[i] for i in items))
        elif layout == "padded":
            bins = _padded_bins(items, lengths, k, coef, budget)
            if bins is None:
                if any(padded_cost([lengths[i] for i in b]) > (budget or math.inf) for b in bins_now):
                    return None
                bins = [list(b) for b in bins_now]
            micro.append(tuple(tuple(sorted(b)) for b in bins))
            loads.append(sum(padded_cost([lengths[i] for i in b], coef) for b in bins))
        else:
            arranged = _rows4d_bins(items, lengths, k, coef, budget, row_capacity)
            if arranged is None:
                arranged = _rows_per_bin(bins_now, lengths, coef, row_capacity)
                if budget is not None and any(len(rs) * max((sum(lengths[i] for i in r) for r in rs), default=0)
                                              > budget for rs in arranged):
                    return None
            micro.append(tuple(tuple(sorted(i for r in rs for i in r)) for rs in arranged))
            rows_out.append(tuple(tuple(tuple(r) for r in rs) for rs in arranged))
            loads.append(sum(padded_cost([sum(lengths[i] for i in r) for r in rs], coef) for rs in arranged))
    return tuple(micro), (tuple(rows_out) if layout == "rows4d" else None), loads


def _as_drawn(drawn, ctx):
    """The stock layout, costed for the layout (rows4d: each drawn micro-batch packed on its own)."""
    lengths, weights, k, layout, coef, budget, row_capacity = ctx
    micro = tuple(tuple(tuple(b) for b in rank_mbs) for rank_mbs in drawn)
    if layout == "varlen":
        return micro, None, [sum(weights[i] for b in mbs for i in b) for mbs in drawn]
    if layout == "padded":
        return micro, None, [sum(padded_cost([lengths[i] for i in b], coef) for b in mbs) for mbs in drawn]
    rows = tuple(tuple(tuple(tuple(r) for r in rs) for rs in _rows_per_bin(mbs, lengths, coef, row_capacity))
                 for mbs in drawn)
    loads = [sum(padded_cost([sum(lengths[i] for i in r) for r in rs], coef) for rs in rank_rows)
             for rank_rows in rows]
    micro = tuple(tuple(tuple(sorted(i for r in rs for i in r)) for rs in rank_rows) for rank_rows in rows)
    return micro, rows, loads


def _rows_per_bin(bins, lengths, coef, row_capacity):
    out = []
    for b in bins:
        b = list(b)
        if not b:
            out.append([])
            continue
        rows = balanced_rows([lengths[i] for i in b], row_capacity, attention_coef=coef)
        out.append([[b[j] for j in row] for row in rows])
    return out


def _rows4d_bins(items, lengths, k, coef, budget, row_capacity):
    """Pack a rank's samples into rows, then group the rows into k micro-batches (least padding)."""
    if not items:
        return [[] for _ in range(k)]
    rows = balanced_rows([lengths[i] for i in items], row_capacity, attention_coef=coef)
    rows = [[items[j] for j in row] for row in rows]
    row_lens = [sum(lengths[i] for i in row) for row in rows]
    g = min(k, len(rows))
    try:
        groups = min_padding_partition(row_lens, g, attention_coef=coef, max_group_cost=budget)
    except ValueError:
        return None
    return [[rows[j] for j in grp] for grp in groups] + [[] for _ in range(k - g)]


def _padded_window_plan(world_size, ctx):
    """Sorted window cut into world_size*k micro-batches of near-equal padded cost, dealt to ranks.

    The cut minimises the most expensive micro-batch (bisection on the cost
    with a greedy cut, which is exact for contiguous groups whose cost only
    grows as they extend); micro-batches then go, most expensive first, to the
    least-loaded rank that still has a free slot.
    """
    lengths, weights, k, layout, coef, budget, row_capacity = ctx
    n = len(lengths)
    if n == 0:
        return None
    order = sorted(range(n), key=lambda j: (-lengths[j], j))
    unit = [sequence_cost(lengths[j], coef) for j in order]  # one padded row of the group's longest sample
    slots = world_size * k

    def cut(limit):
        groups, i = [], 0
        while i < n:
            if unit[i] > limit:
                return None
            j = i + 1
            while j < n and (j + 1 - i) * unit[i] <= limit:
                j += 1
            groups.append((i, j))
            i = j
        return groups

    lo = max(unit[0], sum(unit) / slots) if coef == 0 else unit[0]
    hi = budget if budget is not None else n * unit[0]
    if cut(hi) is None or len(cut(hi)) > slots:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        groups = cut(mid)
        if groups is not None and len(groups) <= slots:
            hi = mid
        else:
            lo = mid
    groups = [list(order[a:b]) for a, b in cut(hi)]
    while len(groups) < min(slots, n):  # use every slot: split the costliest splittable group
        costly = max((g for g in groups if len(g) > 1), key=lambda g: padded_cost([lengths[i] for i in g], coef))
        groups.remove(costly)
        half = len(costly) // 2
        groups += [costly[:half], costly[half:]]
    groups.sort(key=lambda g: (-padded_cost([lengths[i] for i in g], coef), min(g)))
    loads = [0.0] * world_size
    bins: list[list[list[int]]] = [[] for _ in range(world_size)]
    for g in groups:
        r = min((q for q in range(world_size) if len(bins[q]) < k), key=lambda q: (loads[q], q))
        bins[r].append(g)
        loads[r] += padded_cost([lengths[i] for i in g], coef)
    for r in range(world_size):
        bins[r] += [[] for _ in range(k - len(bins[r]))]
    micro = tuple(tuple(tuple(sorted(b)) for b in bins[r]) for r in range(world_size))
    return micro, None, loads


def _padded_bins(items, lengths, k, attention_coef, budget):
    if not items:
        return [[] for _ in range(k)]
    groups_n = min(k, len(items))
    sub = [lengths[i] for i in items]
    try:
        groups = min_padding_partition(sub, groups_n, attention_coef=attention_coef, max_group_cost=budget)
    except ValueError:
        return None
    bins = [[items[j] for j in g] for g in groups]
    return bins + [[] for _ in range(k - groups_n)]


def plan_pairs(
    pair_lengths: Sequence[int],
    world_size: int,
    num_micro_batches: int,
    pairs_per_micro_batch: int,
    *,
    attention_coef: float = 0.0,
    max_rounds: int | None = None,
) -> StepPlan:
    """Balance preference pairs over ranks with an equal pair count everywhere.

    A DPO-style loss is a mean over the pairs of a micro-batch; DDP then
    averages ranks and the Trainer averages micro-batches. That mean of means
    equals the mean over all pairs only when every rank has the same number of
    micro-batches and every micro-batch the same number of pairs. So this
    planner keeps the counts fixed and only chooses *which* pairs go where:
    equal-count greedy over ranks by work (``l + c*l**2`` per pair, ``l`` the
    pair's chosen+rejected tokens), swap-only improvement, then within each
    rank the sorted split into chunks of ``pairs_per_micro_batch`` (the
    least-padding split when all groups have the same size).

    Args:
        pair_lengths: per pair, its token count (chosen + rejected, or the
            longer of the two for a padded layout).
        world_size: ranks.
        num_micro_batches: micro-batches per rank.
        pairs_per_micro_batch: pairs in each micro-batch.

    Returns:
        A :class:`StepPlan` whose micro-batches all hold exactly
        ``pairs_per_micro_batch`` pairs.

    Raises:
        ValueError: ``len(pair_lengths) != world_size * num_micro_batches *
            pairs_per_micro_batch``; pad or drop the last partial step
            (``dataloader_drop_last=True``) or normalise the loss by the global
            pair count instead.
    """
    lengths = _check_lengths(pair_lengths, "pair length")
    per_rank = num_micro_batches * pairs_per_micro_batch
    if len(lengths) != world_size * per_rank:
        raise ValueError(
            f"plan_pairs needs exactly world_size*num_micro_batches*pairs_per_micro_batch = "
            f"{world_size}*{num_micro_batches}*{pairs_per_micro_batch} = {world_size * per_rank} pairs, "
            f"got {len(lengths)}; drop the last partial step (dataloader_drop_last=True) or normalise the "
            f"loss by the global pair count"
        )
    weights = [sequence_cost(x, attention_coef) for x in lengths]
    state = _Layout(lengths, weights, world_size, 1, None)
    for i in sorted(range(len(lengths)), key=lambda j: (-weights[j], j)):
        r = min((q for q in range(world_size) if len(state.bin_items[q][0]) < per_rank),
                key=lambda q: (state.load[q], q))
        state.add(i, r, 0)
    _improve(state, world_size, allow_moves=False, max_rounds=max_rounds or 4 * len(lengths))
    micro = []
    for r in range(world_size):
        items = sorted(state.items_of(r), key=lambda j: (-lengths[j], j))
        chunks = [tuple(sorted(items[m * pairs_per_micro_batch:(m + 1) * pairs_per_micro_batch]))
                  for m in range(num_micro_batches)]
        micro.append(tuple(chunks))
    return StepPlan(micro_batches=tuple(micro), rank_loads=tuple(state.load), fallback=False)


def attention_coef_for(config: Any) -> float:
    """Attention work per token pair relative to per-token work, from a model config.

    Per token, the linear layers cost about ``6 * P`` FLOPs (forward and
    backward) for ``P`` non-embedding parameters; causal attention costs about
    ``6 * n_layers * n_heads * head_dim`` FLOPs per token pair. Returns their
    ratio, or 0.0 when the config lacks the fields.
    """
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        d = int(text.hidden_size)
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or d // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        inter = int(getattr(text, "intermediate_size", None) or 4 * d)
        vocab = int(getattr(text, "vocab_size", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        return 0.0
    per_layer = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * inter
    params = layers * per_layer + d * vocab
    return (layers * heads * head_dim) / params if params > 0 else 0.0
