"""Bin packing and partitioning over token lengths: plain Python, no torch, no trainer.

- :func:`best_fit_decreasing` -- rows of at most ``capacity`` tokens (TRL's ``_pack_bfd`` rule).
- :func:`min_padding_partition` -- the OpenSloth DP: padded micro-batches of least total cost.
- :func:`balanced_rows` -- packed rows of least padded cost.
- :class:`_Layout` / :func:`_improve` -- the move-and-swap local search the step planner
  (:mod:`opensloth.packing.planner`) shares with :func:`balanced_rows`.

Cost model. A padded micro-batch of ``r`` rows of width ``L`` costs
``r * L + c * r * L**2``; a padding-free (varlen) micro-batch costs
``sum(l + c * l**2)`` over its sequences, where ``c`` (``attention_coef``) is
the attention work per token pair relative to the per-token (linear-layer)
work; ``c = 0`` is the pure token-count model.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

__all__ = [
    "balanced_rows",
    "best_fit_decreasing",
    "min_padding_partition",
    "padded_cost",
    "sequence_cost",
]


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
