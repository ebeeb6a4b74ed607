"""Packing, partitioning and cross-rank step planning: pure functions, no trainer.

Three layers, each usable on its own:

1. **Bin packing and partitioning over lengths** (plain Python, no torch):
   :func:`best_fit_decreasing`, :func:`min_padding_partition` (the OpenSloth
   DP), :func:`balanced_rows`.
2. **Step planning** (plain Python, no torch): :func:`plan_step` spreads one
   optimizer step's samples (all ranks x grad-accum x batch) over ranks and
   micro-batches so that the slowest rank does as little work as possible;
   :func:`plan_pairs` does the same with an equal pair count per rank and per
   micro-batch, for preference (DPO) data. Every rank calls them with the same
   lengths and gets the same answer: no communication beyond the lengths.
3. **Materialising packed micro-batches** (torch, imported lazily):
   :func:`pack` (best-fit rows with a 4D block-causal mask, or one padding-free
   row with flash-attention varlen fields) and :func:`build_micro_batch`.

Label rule for packed rows. A causal LM predicts ``labels[t + 1]`` at position
``t``. When sequence B follows sequence A in a row, the last position of A
would predict B's first token; in the unpacked run that token is never a
target (it is position 0 of its own row). So the label at the first token of
every packed sequence is set to ``-100``. With that rule, the number of
targets ``(labels[..., 1:] != -100).sum()`` of a packed batch equals the sum of
the per-sequence counts, and the Trainer's ``num_items_in_batch`` is unchanged.

Cost model. A padded micro-batch of ``r`` rows of width ``L`` costs
``r * L + c * r * L**2``; a padding-free (varlen) micro-batch costs
``sum(l + c * l**2)`` over its sequences, where ``c`` (``attention_coef``) is
the attention work per token pair relative to the per-token (linear-layer)
work; ``c = 0`` is the pure token-count model. :func:`attention_coef_for`
estimates ``c`` from a model config.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

IGNORE_INDEX = -100

LAYOUTS = ("varlen", "rows4d", "padded")
OVERFLOW_POLICIES = ("error", "truncate", "split")


# ---------------------------------------------------------------------------
# 1. Bin packing and partitioning over lengths
# ---------------------------------------------------------------------------


def _check_lengths(lengths: Sequence[int], what: str = "length") -> list[int]:
    out = []
    for i, n in enumerate(lengths):
        n = int(n)
        if n <= 0:
            raise ValueError(f"{what} {i} is {n}; every sequence must have at least one token")
        out.append(n)
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into as few bins of ``capacity`` as best-fit-decreasing finds.

    Items are taken longest first (ties by index); each goes into the open bin
    with the least room left that still fits it (ties: the bin that reached
    that room first), or a new bin. This is the rule of TRL's ``_pack_bfd``;
    a test checks that both give the same bins.

    Args:
        lengths: item sizes (tokens), each >= 1.
        capacity: bin size, >= 1.

    Returns:
        Bins as lists of item indices, in order of creation; items inside a bin
        in the order they were placed (longest first).

    Raises:
        ValueError: ``capacity < 1``, an item is empty, or an item is longer
            than ``capacity`` (apply an overflow policy first, see :func:`pack`).
    """
    capacity = int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lengths = _check_lengths(lengths)
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"{len(too_long)} item(s) longer than the capacity {capacity} (item {i} has {lengths[i]} tokens); "
            f"choose an overflow policy ('truncate' or 'split') or raise the capacity"
        )
    bins: list[list[int]] = []
    # Sorted (room_left, stamp, bin_index) of open bins; bisect finds the tightest fit. Among bins
    # with the same room the one that reached it first wins, which is TRL's tie-break too.
    rooms: list[tuple[int, int, int]] = []
    stamp = 0
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        pos = bisect.bisect_left(rooms, (n, -1, -1))
        if pos < len(rooms):
            room, _, b = rooms.pop(pos)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        room -= n
        if room > 0:
            bisect.insort(rooms, (room, stamp, b))
            stamp += 1
    return bins


def padded_cost(lengths: Sequence[int], attention_coef: float = 0.0) -> float:
    """Cost of one padded micro-batch: ``rows * longest + c * rows * longest**2``."""
    if not lengths:
        return 0.0
    longest = max(lengths)
    return len(lengths) * (longest + attention_coef * longest * longest)


def sequence_cost(length: int, attention_coef: float = 0.0) -> float:
    """Cost of one sequence in a padding-free batch: ``l + c * l**2``."""
    return length + attention_coef * length * length


def min_padding_partition(
    lengths: Sequence[int],
    num_groups: int,
    *,
    attention_coef: float = 0.0,
    max_group_cost: float | None = None,
) -> list[list[int]]:
    """Split samples into ``num_groups`` padded micro-batches of least total cost.

    The OpenSloth DP: sort by length (longest first, ties by index) and choose
    the contiguous split that minimises ``sum(padded_cost(group))``. Contiguous
    splits of the sorted order are optimal among *all* partitions: if a longer
    item sat in a group with a smaller maximum than a shorter item's group,
    swapping the two never raises either group's maximum. ``tests`` checks this
    against brute force over every assignment on small inputs.

    Args:
        lengths: sample lengths (>= 1 each).
        num_groups: number of non-empty groups, ``1 <= num_groups <= len(lengths)``.
        attention_coef: weight of the quadratic attention term (0: tokens only).
        max_group_cost: optional cap on one group's padded cost (memory); groups
            above it are not allowed.

    Returns:
        ``num_groups`` lists of indices into ``lengths``, longest group first.

    Raises:
        ValueError: ``num_groups`` is out of range, or no split respects
            ``max_group_cost``.
    """
    lengths = _check_lengths(lengths)
    n = len(lengths)
    k = int(num_groups)
    if not 1 <= k <= n:
        raise ValueError(f"num_groups must be between 1 and the number of samples ({n}), got {k}")
    order = sorted(range(n), key=lambda j: (-lengths[j], j))
    a = [lengths[j] for j in order]
    inf = math.inf
    unit = [x + attention_coef * x * x for x in a]  # cost of one row of the group's longest length

    def group_cost(i: int, j: int) -> float:  # rows order[i:j], longest is a[i]
        c = (j - i) * unit[i]
        return inf if (max_group_cost is not None and c > max_group_cost) else c

    # best[g][j]: least cost of splitting the first j items into g groups.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n - (k - g) + 1):
            bj, cj = inf, 0
            for i in range(g - 1, j):
                prev = best[g - 1][i]
                if prev == inf:
                    continue
                c = prev + group_cost(i, j)
                if c < bj:
                    bj, cj = c, i
            best[g][j], cut[g][j] = bj, cj
    if best[k][n] == inf:
        raise ValueError(
            f"no split of {n} samples into {k} groups keeps every group's padded cost <= {max_group_cost}"
        )
    groups: list[list[int]] = []
    j = n
    for g in range(k, 0, -1):
        i = cut[g][j]
        groups.append(order[i:j])
        j = i
    groups.reverse()
    return groups


def _lpt(weights: Sequence[float], num_bins: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Longest-processing-time greedy: heaviest item first into the lightest bin."""
    loads = [(0.0, b) for b in range(num_bins)]
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    if order is None:
        order = sorted(range(len(weights)), key=lambda j: (-weights[j], j))
    for i in order:
        load, b = min(loads)
        bins[b].append(i)
        loads[b] = (load + weights[i], b)
    return bins


def balanced_rows(
    lengths: Sequence[int],
    row_capacity: int,
    *,
    attention_coef: float = 0.0,
) -> list[list[int]]:
    """Arrange sequences into packed rows of least padded cost.

    For a given number of rows ``r`` the sequences are spread by
    longest-first greedy (each into the shortest row) and then evened out by
    moves and swaps off the longest row, which keeps the longest row, and so
    the padding, small. Best-fit decreasing is a candidate as well. ``r`` is tried from the fewest rows that
    can hold the tokens to four more, and one row per sequence; the cheapest
    arrangement by :func:`padded_cost` over row lengths wins. A quadratic attention term
    (``attention_coef > 0``) favours more, shorter rows, because a dense
    block-causal mask makes every row pay ``L**2`` attention.

    Args:
        lengths: sequence lengths, each ``<= row_capacity``.
        row_capacity: longest allowed row.
        attention_coef: weight of the quadratic attention term.

    Returns:
        Rows as lists of indices into ``lengths``.

    Raises:
        ValueError: a sequence is longer than ``row_capacity`` or empty.
    """
    lengths = _check_lengths(lengths)
    if not lengths:
        return []
    if max(lengths) > row_capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {row_capacity}")
    n = len(lengths)
    total = sum(lengths)
    order = sorted(range(n), key=lambda j: (-lengths[j], j))

    def cost_of(rows):
        longest = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * (longest + attention_coef * longest * longest)

    # Best-fit decreasing is always a candidate, so the result is never worse than plain BFD.
    best_rows = best_fit_decreasing(lengths, row_capacity)
    best_cost = cost_of(best_rows)
    r_min = max(1, -(-total // row_capacity))
    # A few more rows than the minimum can cut padding (or dense attention); one row per sequence
    # is the padded layout. Trying every count in between costs O(n^2) for little gain.
    for r in sorted(set(range(r_min, min(n, r_min + 4) + 1)) | {n}):
        state = _Layout(lengths, [float(x) for x in lengths], r, 1, None)
        for i, row in enumerate(_lpt(lengths, r, order)):
            for j in row:
                state.add(j, i, 0)
        _improve(state, r, allow_moves=True, max_rounds=4 * n)
        rows = [state.items_of(i) for i in range(r) if state.bin_items[i][0]]
        if max(sum(lengths[i] for i in row) for row in rows) > row_capacity:
            continue
        cost = cost_of(rows)
        if cost < best_cost:
            best_cost, best_rows = cost, rows
        if attention_coef == 0.0 and best_cost == total:
            break  # no padding at all: cannot do better
    return best_rows


# ---------------------------------------------------------------------------
# 2. Step planning across ranks
# ---------------------------------------------------------------------------


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


class _Layout:
    """Mutable assignment state used by the planner: ranks -> bins -> items."""

    def __init__(self, lengths, weights, world_size, num_bins, budget):
        self.lengths = lengths
        self.weights = weights
        self.budget = budget
        self.load = [0.0] * world_size
        self.bin_tokens = [[0] * num_bins for _ in range(world_size)]
        self.bin_items: list[list[list[int]]] = [[[] for _ in range(num_bins)] for _ in range(world_size)]
        self.where: dict[int, tuple[int, int]] = {}

    def roomiest_bin(self, rank: int) -> int:
        toks = self.bin_tokens[rank]
        return min(range(len(toks)), key=lambda m: (toks[m], m))

    def fits(self, rank: int, m: int, extra: int) -> bool:
        return self.budget is None or self.bin_tokens[rank][m] + extra <= self.budget

    def add(self, i: int, rank: int, m: int) -> None:
        self.bin_items[rank][m].append(i)
        self.bin_tokens[rank][m] += self.lengths[i]
        self.load[rank] += self.weights[i]
        self.where[i] = (rank, m)

    def remove(self, i: int) -> None:
        rank, m = self.where.pop(i)
        self.bin_items[rank][m].remove(i)
        self.bin_tokens[rank][m] -= self.lengths[i]
        self.load[rank] -= self.weights[i]

    def items_of(self, rank: int) -> list[int]:
        return [i for items in self.bin_items[rank] for i in items]


def _improve(state: _Layout, world_size: int, allow_moves: bool, max_rounds: int) -> None:
    """Local search: move or swap items off the heaviest rank while its load drops.

    Each accepted change lowers the larger of the two loads it touches below
    the current maximum, so the sum of squared loads strictly falls and the
    search ends. Candidates are found by bisection on sorted weights, aiming
    at half the load gap.
    """
    w = state.weights
    for _ in range(max_rounds):
        h = max(range(world_size), key=lambda r: (state.load[r], -r))
        top = state.load[h]
        best = None  # (new_pair_max, kind, x, y, r)
        h_items = sorted(state.items_of(h), key=lambda i: (w[i], i))
        h_weights = [w[i] for i in h_items]
        for r in range(world_size):
            if r == h:
                continue
            gap = top - state.load[r]
            if gap <= 0:
                continue
            half = gap / 2
            if allow_moves:
                m_r = state.roomiest_bin(r)
                pos = bisect.bisect_left(h_weights, half)
                for q in (pos - 1, pos, pos + 1):
                    if 0 <= q < len(h_items):
                        x = h_items[q]
                        if w[x] < gap and state.fits(r, m_r, state.lengths[x]):
                            new = max(top - w[x], state.load[r] + w[x])
                            cand = (new, 0, x, -1, r)
                            if best is None or cand < best:
                                best = cand
            r_items = sorted(state.items_of(r), key=lambda i: (w[i], i))
            r_weights = [w[i] for i in r_items]
            for x in h_items:
                target = w[x] - half  # ideal weight of the item that comes back
                pos = bisect.bisect_left(r_weights, target)
                for q in (pos - 1, pos, pos + 1):
                    if not 0 <= q < len(r_items):
                        continue
                    y = r_items[q]
                    d = w[x] - w[y]
                    if not 0 < d < gap:
                        continue
                    _, m_x = state.where[x]
                    _, m_y = state.where[y]
                    lx, ly = state.lengths[x], state.lengths[y]
                    if state.budget is not None and (
                        state.bin_tokens[r][m_y] - ly + lx > state.budget
                        or state.bin_tokens[h][m_x] - lx + ly > state.budget
                    ):
                        continue
                    new = max(top - d, state.load[r] + d)
                    cand = (new, 1, x, y, r)
                    if best is None or cand < best:
                        best = cand
        if best is None or best[0] >= top:
            return
        _, kind, x, y, r = best
        if kind == 0:
            m_r = state.roomiest_bin(r)
            state.remove(x)
            state.add(x, r, m_r)
        else:
            _, m_x = state.where[x]
            _, m_y = state.where[y]
            state.remove(x)
            state.remove(y)
            state.add(x, r, m_y)
            state.add(y, h, m_x)


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


# ---------------------------------------------------------------------------
# 3. Materialising packed micro-batches (torch)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One sequence placed in a packed batch: ``row``, ``start``, ``length``, and
    ``source`` (index of the sample it came from; a split sample gives several)."""

    row: int
    start: int
    length: int
    source: int


def _as_1d_long(x):
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(list(x), dtype=torch.long)
    return t.reshape(-1).to(torch.long)


def sequences_from_batch(batch: Mapping[str, Any]) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """Unpad a batch into its samples: a list of ``(input_ids, labels)`` 1D tensors.

    Accepts a padded batch (2D ``input_ids`` with ``attention_mask`` marking
    real tokens, any padding side), a padding-free batch (``position_ids``
    restarting at 0 for every sequence, no ``attention_mask``), or lists of
    per-sample lists. ``labels`` default to ``input_ids``.

    Raises:
        ValueError: the batch is empty, a sample has no tokens, or shapes of
            ``labels``/``attention_mask`` disagree with ``input_ids``.
    """
    import torch

    if "input_ids" not in batch:
        raise ValueError("batch has no 'input_ids'")
    ids = batch["input_ids"]
    labels = batch.get("labels")
    mask = batch.get("attention_mask")
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"empty batch or bad input_ids shape {tuple(ids.shape)}")
        labels = ids if labels is None else labels
        if labels.dim() == 1:
            labels = labels[None]
        if labels.shape != ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(ids.shape)}")
        if mask is not None and mask.dim() == 2:
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
            for r in range(ids.shape[0]):
                keep = mask[r] != 0
                if not bool(keep.any()):
                    raise ValueError(f"sample {r} has no tokens (attention_mask is all zero)")
                out.append((ids[r][keep].long(), labels[r][keep].long()))
        elif "position_ids" in batch and mask is None:
            pos = batch["position_ids"].reshape(ids.shape)
            for r in range(ids.shape[0]):
                starts = (pos[r] == 0).nonzero().flatten().tolist()
                if not starts or starts[0] != 0:
                    raise ValueError("position_ids of a padding-free batch must start every sequence at 0")
                bounds = starts + [ids.shape[1]]
                for a, b in zip(bounds[:-1], bounds[1:]):
                    out.append((ids[r, a:b].long(), labels[r, a:b].long()))
        elif mask is not None:
            raise ValueError("a 4D attention_mask is already packed; pass the unpacked samples instead")
        else:
            for r in range(ids.shape[0]):
                out.append((ids[r].long(), labels[r].long()))
    else:
        rows = list(ids)
        if not rows:
            raise ValueError("empty batch: no samples")
        label_rows = list(labels) if labels is not None else rows
        mask_rows = list(mask) if mask is not None else [None] * len(rows)
        if len(label_rows) != len(rows) or len(mask_rows) != len(rows):
            raise ValueError("input_ids, labels and attention_mask must have the same number of samples")
        for r, (x, y, m) in enumerate(zip(rows, label_rows, mask_rows)):
            x, y = _as_1d_long(x), _as_1d_long(y)
            if x.shape != y.shape:
                raise ValueError(f"sample {r}: labels length {y.numel()} != input_ids length {x.numel()}")
            if m is not None:
                keep = _as_1d_long(m) != 0
                x, y = x[keep], y[keep]
            out.append((x, y))
    for r, (x, _) in enumerate(out):
        if x.numel() == 0:
            raise ValueError(f"sample {r} has no tokens")
    if not out:
        raise ValueError("empty batch: no samples")
    return out


def apply_overflow(
    sequences: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
    max_seql: int,
    overflow: str = "error",
) -> tuple[list[tuple["torch.Tensor", "torch.Tensor"]], list[int]]:
    """Apply the over-length policy to sequences longer than ``max_seql``.

    Policies:
        ``"error"``: raise ValueError naming the first offending sample.
        ``"truncate"``: keep the first ``max_seql`` tokens (TRL's ``keep_start``).
        ``"split"``: cut into consecutive pieces of at most ``max_seql`` tokens,
            each packed as its own sequence. Each later piece loses its first
            target (its first label becomes -100) and the context before it.

    Returns:
        ``(pieces, source)``: the resulting sequences and, for each, the index
        of the input sequence it came from.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if max_seql < 1:
        raise ValueError(f"max_seql must be >= 1, got {max_seql}")
    pieces, source = [], []
    for i, (x, y) in enumerate(sequences):
        n = x.numel()
        if n <= max_seql:
            pieces.append((x, y))
            source.append(i)
        elif overflow == "error":
            shortest = min(s[0].numel() for s in sequences)
            hint = " (shorter than every sequence)" if max_seql < shortest else ""
            raise ValueError(
                f"sample {i} has {n} tokens, more than max_seql={max_seql}{hint}; "
                f"pass overflow='truncate' or overflow='split', or raise max_seql"
            )
        elif overflow == "truncate":
            pieces.append((x[:max_seql], y[:max_seql]))
            source.append(i)
        else:
            for a in range(0, n, max_seql):
                pieces.append((x[a:a + max_seql], y[a:a + max_seql]))
                source.append(i)
    return pieces, source


def build_micro_batch(
    sequences: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
    rows: Sequence[Sequence[int]],
    *,
    layout: str,
    pad_token_id: int = 0,
    mask_dtype: "torch.dtype | None" = None,
    sources: Sequence[int] | None = None,
    extra_fields: Iterable[str] = (),
) -> tuple[dict[str, "torch.Tensor"], list[Segment]]:
    """Materialise one micro-batch from sequences and a row arrangement.

    Args:
        sequences: ``(input_ids, labels)`` 1D tensors.
        rows: indices into ``sequences`` per row (for ``"varlen"`` the rows are
            concatenated into a single row; for ``"padded"`` use one sequence
            per row). Empty ``rows`` (or ``[[]]``) gives a two-token all-masked
            micro-batch, so a rank without samples still runs a pass.
        layout: ``"rows4d"``: ``[R, L]`` rows with a float additive 4D
            block-causal ``attention_mask [R, 1, L, L]`` (0 where attention is
            allowed, the dtype's minimum elsewhere); padding at a row's end
            forms its own block, so no query row is fully masked.
            ``"varlen"``: one ``[1, T]`` row, ``position_ids``,
            ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (flash-attention
            varlen fields), no ``attention_mask``.
            ``"padded"``: ``[R, L]`` rows, right padding, 2D ``attention_mask``.
        pad_token_id: token used for padding.
        mask_dtype: dtype of the 4D mask (default float32).
        sources: sample index per sequence, reported in the segments.
        extra_fields: padding-free extras to rebuild for ``"varlen"``:
            ``"packed_seq_lengths"`` (int32 lengths, Unsloth) and ``"seq_idx"``
            (int32 sequence index per token).

    Returns:
        ``(batch, segments)``. In every layout the label at the first token of
        each sequence is -100 (see the module docstring) and ``position_ids``
        restart at 0 for each sequence.
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rows = [list(r) for r in rows if len(r) > 0]
    if not rows:
        dummy = torch.full((2,), pad_token_id, dtype=torch.long)
        sequences = [(dummy, torch.full((2,), IGNORE_INDEX, dtype=torch.long))]
        rows = [[0]]
        sources = [-1]
    if sources is None:
        sources = list(range(len(sequences)))
    if layout == "varlen":
        rows = [[i for row in rows for i in row]]
    if layout == "padded" and any(len(r) != 1 for r in rows):
        raise ValueError("the padded layout takes one sequence per row")

    row_lens = [sum(sequences[i][0].numel() for i in row) for row in rows]
    width = max(row_lens)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    block = torch.full((n_rows, width), -1, dtype=torch.long)  # block id per token, for the 4D mask
    segments: list[Segment] = []
    for r, row in enumerate(rows):
        at = 0
        for b, i in enumerate(row):
            x, y = sequences[i]
            n = x.numel()
            input_ids[r, at:at + n] = x
            labels[r, at:at + n] = y
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at:at + n] = torch.arange(n)
            block[r, at:at + n] = b
            segments.append(Segment(row=r, start=at, length=n, source=int(sources[i])))
            at += n
        if at < width:  # padding tail: its own block, positions from 0
            position_ids[r, at:] = torch.arange(width - at)
            block[r, at:] = len(row)

    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}
    if layout == "padded":
        attn = torch.zeros((n_rows, width), dtype=torch.long)
        for r, n in enumerate(row_lens):
            attn[r, :n] = 1
        batch["attention_mask"] = attn
        batch["position_ids"] = position_ids
    elif layout == "rows4d":
        dtype = mask_dtype or torch.float32
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (block[:, :, None] == block[:, None, :]) & causal
        mask = torch.zeros((n_rows, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        batch["attention_mask"] = mask
        batch["position_ids"] = position_ids
    else:
        lens = [s.length for s in segments]
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        batch["position_ids"] = position_ids
        batch["cu_seq_lens_q"] = cu
        batch["cu_seq_lens_k"] = cu.clone()
        batch["max_length_q"] = max(lens)
        batch["max_length_k"] = max(lens)
        extra = set(extra_fields)
        if "packed_seq_lengths" in extra:
            batch["packed_seq_lengths"] = torch.tensor(lens, dtype=torch.int32)
        if "seq_idx" in extra:
            batch["seq_idx"] = torch.repeat_interleave(
                torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens)
            )[None]
    return batch, segments


def pack(
    batch: Mapping[str, Any],
    max_seql: int,
    *,
    attention: str = "4d",
    overflow: str = "error",
    pad_token_id: int = 0,
    mask_dtype: "torch.dtype | None" = None,
    return_segments: bool = False,
):
    """Pack a batch of samples into rows of at most ``max_seql`` tokens.

    Rows are formed by :func:`best_fit_decreasing`. Inside a row every
    sequence gets ``position_ids`` from 0 and attends only to itself, and the
    label at each sequence's first token is -100, so the packed forward gives
    each token the same log-probability as running its sequence alone.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` (see
            :func:`sequences_from_batch` for the accepted forms).
        max_seql: row capacity in tokens.
        attention: ``"4d"``: rows with a 4D block-causal float mask (SDPA,
            eager). ``"varlen"``: the rows concatenated into one padding-free
            row with ``cu_seq_lens_q/k`` and ``max_length_q/k`` (flash-attention
            varlen; also understood by SDPA/eager through ``position_ids`` when
            ``use_cache=False``).
        overflow: policy for sequences longer than ``max_seql``: ``"error"``
            (default), ``"truncate"`` or ``"split"`` (:func:`apply_overflow`).
        pad_token_id: padding token.
        mask_dtype: dtype of the 4D mask (default float32; use the model's).
        return_segments: also return the list of :class:`Segment`.

    Returns:
        The packed batch (dict of tensors), or ``(batch, segments)``.

    Raises:
        ValueError: empty batch, a sample without tokens, a sample longer than
            ``max_seql`` under ``overflow="error"`` (including a capacity below
            the shortest sequence), or no label left to train on (every label
            is -100 once the first token of each sequence is masked).
    """
    if attention not in ("4d", "varlen"):
        raise ValueError(f"attention must be '4d' or 'varlen', got {attention!r}")
    sequences = sequences_from_batch(batch)
    pieces, source = apply_overflow(sequences, int(max_seql), overflow)
    if not any(bool((y[1:] != IGNORE_INDEX).any()) for _, y in pieces):
        raise ValueError(
            "every label in the batch is masked (-100), so it would train nothing; "
            "drop fully masked samples before packing (TRL drops them during dataset preparation)"
        )
    rows = best_fit_decreasing([x.numel() for x, _ in pieces], int(max_seql))
    out, segments = build_micro_batch(
        pieces,
        rows,
        layout="rows4d" if attention == "4d" else "varlen",
        pad_token_id=pad_token_id,
        mask_dtype=mask_dtype,
        sources=source,
    )
    return (out, segments) if return_segments else out
