"""Pure packing / partitioning / planning math: brute force, invariants, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opensloth.packing import (
    IGNORE_INDEX,
    apply_overflow,
    balanced_rows,
    best_fit_decreasing,
    build_micro_batch,
    drawn_layout,
    min_padding_partition,
    pack,
    padded_cost,
    plan_pairs,
    plan_step,
    sequence_cost,
)

lengths_st = st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=24)


# ---------------------------------------------------------------------------
# best-fit decreasing
# ---------------------------------------------------------------------------


@given(lengths_st, st.integers(min_value=60, max_value=200))
@settings(max_examples=150, deadline=None, database=None)
def test_bfd_respects_capacity_and_keeps_every_item(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never leaves two bins that could have been one.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_bfd_matches_trl_pack_bfd():
    """Same bins as TRL's own BFD (trusted reference), on random lengths with ties."""
    pa = pytest.importorskip("pyarrow")
    from trl.data_utils import _pack_bfd

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        capacity = int(torch.randint(20, 80, (1,), generator=gen))
        lengths = torch.randint(1, capacity + 1, (n,), generator=gen).tolist()
        # Encode the sample index in the tokens so TRL's output tells which sample went where.
        table = pa.table({"input_ids": [[i] * n_i for i, n_i in enumerate(lengths)]})
        packed = _pack_bfd(table, capacity).to_pydict()
        trl_bins = [sorted(set(row)) for row in packed["input_ids"]]
        ours = [sorted(b) for b in best_fit_decreasing(lengths, capacity)]
        assert sorted(trl_bins) == sorted(ours), (trial, lengths, capacity)


def test_bfd_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([3, 4], 0)
    with pytest.raises(ValueError, match="longer than the capacity"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="at least one token"):
        best_fit_decreasing([3, 0], 8)
    assert best_fit_decreasing([], 8) == []


# ---------------------------------------------------------------------------
# OpenSloth DP: optimal against brute force over every assignment
# ---------------------------------------------------------------------------


def _brute_force_min_padding(lengths, k, coef):
    best = math.inf
    for labels in itertools.product(range(k), repeat=len(lengths)):
        if len(set(labels)) != k:
            continue
        groups = [[lengths[i] for i in range(len(lengths)) if labels[i] == g] for g in range(k)]
        best = min(best, sum(padded_cost(g, coef) for g in groups))
    return best


@given(
    st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=7),
    st.integers(min_value=1, max_value=3),
    st.sampled_from([0.0, 0.05]),
)
@settings(max_examples=120, deadline=None, database=None)
def test_min_padding_partition_is_optimal(lengths, k, coef):
    k = min(k, len(lengths))
    groups = min_padding_partition(lengths, k, attention_coef=coef)
    assert len(groups) == k and all(groups)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    cost = sum(padded_cost([lengths[i] for i in g], coef) for g in groups)
    assert cost == pytest.approx(_brute_force_min_padding(lengths, k, coef))


def test_min_padding_partition_bad_input():
    with pytest.raises(ValueError, match="num_groups"):
        min_padding_partition([1, 2], 3)
    with pytest.raises(ValueError, match="num_groups"):
        min_padding_partition([1, 2], 0)
    with pytest.raises(ValueError, match="no split"):
        min_padding_partition([10, 10, 10], 1, max_group_cost=20)


@given(lengths_st, st.integers(min_value=60, max_value=150), st.sampled_from([0.0, 0.01]))
@settings(max_examples=80, deadline=None, database=None)
def test_balanced_rows_capacity_and_no_worse_than_bfd(lengths, capacity, coef):
    rows = balanced_rows(lengths, capacity, attention_coef=coef)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    row_lens = [sum(lengths[i] for i in r) for r in rows]
    assert max(row_lens) <= capacity
    bfd_lens = [sum(lengths[i] for i in b) for b in best_fit_decreasing(lengths, capacity)]
    one_per_row = [lengths[i] for i in range(len(lengths))]
    ours = padded_cost(row_lens, coef)
    assert ours <= padded_cost(one_per_row, coef) + 1e-9
    if coef == 0.0:
        assert ours <= padded_cost(bfd_lens, coef) or len(bfd_lens) < len(row_lens)


# ---------------------------------------------------------------------------
# Step planning invariants
# ---------------------------------------------------------------------------


@st.composite
def step_case(draw):
    world = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    cap = draw(st.integers(8, 64))
    n = draw(st.integers(1, world * k * batch))
    lengths = draw(st.lists(st.integers(1, cap), min_size=n, max_size=n))
    layout = draw(st.sampled_from(["varlen", "rows4d", "padded"]))
    cross = draw(st.booleans())
    coef = draw(st.sampled_from([0.0, 0.01]))
    return world, k, batch, cap, lengths, layout, cross, coef


@given(step_case())
@settings(max_examples=150, deadline=None, database=None)
def test_plan_step_invariants(case):
    world, k, batch, cap, lengths, layout, cross, coef = case
    budget = batch * cap
    kwargs = dict(token_budget=budget, attention_coef=coef, layout=layout, cross_rank=cross, batch_size=batch,
                  row_capacity=cap)
    plan = plan_step(lengths, world, k, **kwargs)
    # Same on every call (every rank computes it independently).
    assert plan == plan_step(lengths, world, k, **kwargs)
    # Exactly k micro-batches per rank, every sample exactly once.
    assert len(plan.micro_batches) == world
    assert all(len(mbs) == k for mbs in plan.micro_batches)
    placed = sorted(p for mbs in plan.micro_batches for mb in mbs for p in mb)
    assert placed == list(range(len(lengths)))

    def row_lengths(r, m):
        if layout == "rows4d":
            rows = plan.rows[r][m]
            assert sorted(p for row in rows for p in row) == sorted(plan.micro_batches[r][m])
            return [sum(lengths[p] for p in row) for row in rows]
        if layout == "padded":
            return [lengths[p] for p in plan.micro_batches[r][m]]
        return [sum(lengths[p] for p in plan.micro_batches[r][m])]

    # Memory: never above the budget the stock loader could reach; packed rows within capacity.
    for r in range(world):
        for m in range(k):
            rl = row_lengths(r, m)
            if layout == "varlen":
                assert sum(rl) <= budget
            else:
                assert padded_cost(rl) <= budget
            if layout == "rows4d":
                assert max(rl, default=0) <= cap
    drawn = drawn_layout(len(lengths), world, k, batch)
    if not cross:
        for r in range(world):
            assert sorted(plan.positions_of(r)) == sorted(p for mb in drawn[r] for p in mb)

    def rank_cost(r):
        if layout == "varlen":
            return sum(sequence_cost(lengths[p], coef) for p in plan.positions_of(r))
        return sum(padded_cost(row_lengths(r, m), coef) for m in range(k))

    assert max(plan.rank_loads) == pytest.approx(max(rank_cost(r) for r in range(world)))

    def drawn_cost(mbs):
        if layout == "varlen":
            return sum(sequence_cost(lengths[p], coef) for mb in mbs for p in mb)
        if layout == "padded":
            return sum(padded_cost([lengths[p] for p in mb], coef) for mb in mbs)
        total = 0.0
        for mb in mbs:
            if mb:
                rows = balanced_rows([lengths[p] for p in mb], cap, attention_coef=coef)
                total += padded_cost([sum(lengths[mb[j]] for j in row) for row in rows], coef)
        return total

    # Never worse than the layout the stock loader would have used.
    assert max(plan.rank_loads) <= max(drawn_cost(m) for m in drawn) + 1e-6


@given(st.lists(st.integers(1, 4096), min_size=32, max_size=32))
@settings(max_examples=60, deadline=None, database=None)
def test_plan_step_is_near_the_limit(lengths):
    """4 ranks x 4 micro-batches x 2: the slowest rank is within one sample of the mean."""
    plan = plan_step(lengths, 4, 4, token_budget=2 * 4096, batch_size=2)
    assert max(plan.rank_loads) <= sum(lengths) / 4 + max(lengths)
    # LPT bound: at most 4/3 of the optimum, which is at least the mean and the longest sample.
    assert max(plan.rank_loads) <= 4 / 3 * max(sum(lengths) / 4, max(lengths)) + 1e-6


def test_plan_step_gives_empty_micro_batches_when_samples_are_few():
    plan = plan_step([5, 7, 3], 2, 4, token_budget=16, batch_size=2)
    assert all(len(mbs) == 4 for mbs in plan.micro_batches)
    assert sum(1 for mbs in plan.micro_batches for mb in mbs if mb) == 3


def test_plan_step_bad_input():
    with pytest.raises(ValueError, match="layout"):
        plan_step([1, 2], 1, 1, layout="nope")
    with pytest.raises(ValueError, match="budget"):
        plan_step([10, 2], 1, 1, token_budget=8)
    with pytest.raises(ValueError, match="at least one token"):
        plan_step([0, 2], 1, 1)
    with pytest.raises(ValueError, match="batch_size"):
        plan_step([1, 2], 2, 1, cross_rank=False)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.data())
@settings(max_examples=80, deadline=None, database=None)
def test_plan_pairs_equal_counts(world, k, per_mb, data):
    n = world * k * per_mb
    lengths = data.draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    plan = plan_pairs(lengths, world, k, per_mb)
    assert all(len(mb) == per_mb for mbs in plan.micro_batches for mb in mbs)
    assert sorted(p for mbs in plan.micro_batches for mb in mbs for p in mb) == list(range(n))
    assert max(plan.rank_loads) <= sum(lengths) / world + max(lengths)


def test_plan_pairs_rejects_partial_step():
    with pytest.raises(ValueError, match="drop the last partial step"):
        plan_pairs([1, 2, 3], 2, 1, 2)


# ---------------------------------------------------------------------------
# pack(): boundaries, labels, masks, bad input
# ---------------------------------------------------------------------------


def _random_batch(gen, lengths, width=None, mask_prompt=True):
    width = width or max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    attn = torch.zeros((len(lengths), width), dtype=torch.long)
    for r, n in enumerate(lengths):
        toks = torch.randint(3, 1000, (n,), generator=gen)
        ids[r, :n] = toks
        labels[r, :n] = toks
        if mask_prompt:
            labels[r, : n // 3] = IGNORE_INDEX
        attn[r, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _segments_from_positions(position_ids_row):
    starts = (position_ids_row == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids_row.numel()]))


@given(st.lists(st.integers(2, 40), min_size=1, max_size=10), st.integers(40, 90), st.sampled_from(["4d", "varlen"]),
       st.integers(0, 2**31 - 1))
@settings(max_examples=80, deadline=None, database=None)
def test_pack_invariants(lengths, capacity, attention, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = _random_batch(gen, lengths, mask_prompt=False)
    out, segments = pack(batch, capacity, attention=attention, return_segments=True)
    ids, labels, pos = out["input_ids"], out["labels"], out["position_ids"]
    # Same multiset of samples: every sample appears exactly once, tokens intact.
    assert sorted(s.source for s in segments) == list(range(len(lengths)))
    for s in segments:
        n = lengths[s.source]
        assert s.length == n
        assert torch.equal(ids[s.row, s.start:s.start + n], batch["input_ids"][s.source, :n])
        assert labels[s.row, s.start] == IGNORE_INDEX  # no target across a boundary
        assert torch.equal(labels[s.row, s.start + 1:s.start + n], batch["labels"][s.source, 1:n])
        assert torch.equal(pos[s.row, s.start:s.start + n], torch.arange(n))
    # Targets are exactly the per-sequence targets (num_items_in_batch is unchanged).
    per_seq = sum(int((batch["labels"][r, 1:n] != IGNORE_INDEX).sum()) for r, n in enumerate(lengths))
    assert int((labels[..., 1:] != IGNORE_INDEX).sum()) == per_seq
    if attention == "4d":
        assert ids.shape[1] <= capacity
        mask = out["attention_mask"]
        allowed = mask == 0
        assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
        for s in segments:
            rows = allowed[s.row, 0, s.start:s.start + s.length]
            # Causal inside the sequence, nothing outside it.
            expected = torch.zeros_like(rows)
            expected[:, s.start:s.start + s.length] = torch.ones(s.length, s.length, dtype=torch.bool).tril()
            assert torch.equal(rows, expected)
        assert bool(allowed.any(dim=-1).all())  # no fully masked query row (padding attends to itself)
    else:
        assert ids.shape[0] == 1 and "attention_mask" not in out
        lens = [s.length for s in segments]
        assert out["cu_seq_lens_q"].tolist() == [0] + list(itertools.accumulate(lens))
        assert out["max_length_q"] == max(lens) and out["max_length_k"] == max(lens)
        assert [b - a for a, b in _segments_from_positions(pos[0])] == lens


def test_pack_accepts_lists_and_padding_free_input():
    out = pack({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[5, 6, 7], [8, 9]]}, 8, attention="varlen")
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    again = pack({"input_ids": out["input_ids"], "labels": out["labels"], "position_ids": out["position_ids"]}, 8)
    assert again["input_ids"].tolist() == [[5, 6, 7, 8, 9]]


def test_pack_left_padded_input():
    batch = {
        "input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 5, 6], [7, 8, 9, 10]]),
    }
    out = pack(batch, 6, attention="varlen")
    assert sorted(out["input_ids"][0].tolist()) == [5, 6, 7, 8, 9, 10]


def test_overflow_policies():
    batch = {"input_ids": [[1, 2, 3, 4, 5, 6, 7], [8, 9]]}
    with pytest.raises(ValueError, match="overflow='truncate'"):
        pack(batch, 4)
    out, segs = pack(batch, 4, overflow="truncate", return_segments=True)
    assert sorted(s.length for s in segs) == [2, 4]
    out, segs = pack(batch, 4, overflow="split", return_segments=True)
    assert sorted(s.length for s in segs) == [2, 3, 4]
    assert sorted(s.source for s in segs) == [0, 0, 1]
    assert out["input_ids"].shape[1] <= 4
    with pytest.raises(ValueError, match="overflow must be"):
        apply_overflow([], 4, "drop")


def test_bad_batches_raise_clear_errors():
    with pytest.raises(ValueError, match="empty batch"):
        pack({"input_ids": []}, 8)
    with pytest.raises(ValueError, match="empty batch"):
        pack({"input_ids": torch.zeros((0, 5), dtype=torch.long)}, 8)
    with pytest.raises(ValueError, match="no tokens"):
        pack({"input_ids": torch.ones((2, 3), dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])}, 8)
    with pytest.raises(ValueError, match="every label in the batch is masked"):
        pack({"input_ids": [[1, 2, 3]], "labels": [[-100, -100, -100]]}, 8)
    # Only the first token is a label: after the causal shift nothing is a target.
    with pytest.raises(ValueError, match="every label in the batch is masked"):
        pack({"input_ids": [[1, 2, 3]], "labels": [[1, -100, -100]]}, 8)
    with pytest.raises(ValueError, match="shorter than every sequence"):
        pack({"input_ids": [[1, 2, 3], [4, 5]]}, 1)
    with pytest.raises(ValueError, match="labels length"):
        pack({"input_ids": [[1, 2, 3]], "labels": [[1, 2]]}, 8)
    with pytest.raises(ValueError, match="attention"):
        pack({"input_ids": [[1, 2, 3]]}, 8, attention="flex")


def test_empty_micro_batch_is_a_tiny_all_masked_batch():
    for layout in ("varlen", "rows4d", "padded"):
        batch, segments = build_micro_batch([], [], layout=layout)
        assert batch["input_ids"].shape == (1, 2)
        assert bool((batch["labels"] == IGNORE_INDEX).all())
        assert segments[0].source == -1


def test_attention_coef_from_config():
    from types import SimpleNamespace

    from opensloth.packing import attention_coef_for

    # Qwen2.5-7B-like: attention adds about 6% to a 4096-token sequence.
    cfg = SimpleNamespace(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, head_dim=128,
                          num_key_value_heads=4, intermediate_size=18944, vocab_size=152064)
    coef = attention_coef_for(cfg)
    assert 0.03 < coef * 4096 < 0.1
    assert attention_coef_for(None) == 0.0


# --------------------------------------------------------------------------- the original OpenSloth's pack() call


def _legacy_batch():
    pad = 99  # the original inferred the pad id from the first right-padded row
    ids = torch.tensor([[1, 2, 3, 4, 5, pad, pad], [6, 7, pad, pad, pad, pad, pad], [8, 9, 10, 11, 12, 13, 14]])
    mask = (ids != pad).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def test_original_call_keeps_its_output_and_splits_long_rows(capsys):
    import opensloth.log

    opensloth.log._WARNED.discard("pack-legacy")
    out = pack(_legacy_batch(), max_seql=6, pad_label_id=-1, device="cpu", return_token_mask=True, attn_mode="tri")
    assert "original OpenSloth's arguments" in capsys.readouterr().err
    assert set(out) == {"input_ids", "labels", "position_ids", "attention_mask", "packed_lengths", "token_mask"}
    # Pieces 5, 2, 6 (+1 split off the 7-token row) in best-fit rows of 6: [6], [5, 1], [2].
    rows = {int(out["input_ids"][r, 0]): r for r in range(3)}
    a, b, c = rows[8], rows[1], rows[6]
    assert out["input_ids"][b].tolist() == [1, 2, 3, 4, 5, 14]
    assert out["input_ids"][c].tolist() == [6, 7, 99, 99, 99, 99]  # inferred pad id
    # First label of every packed sequence and split piece masked; padding gets pad_label_id.
    assert out["labels"][a].tolist() == [-100, 9, 10, 11, 12, 13]
    assert out["labels"][b].tolist() == [-100, 2, 3, 4, 5, -100]
    assert out["labels"][c].tolist() == [-100, 7, -1, -1, -1, -1]
    assert out["position_ids"][b].tolist() == [0, 1, 2, 3, 4, 0]
    assert out["position_ids"][c].tolist() == [0, 1, 0, 0, 0, 0]
    assert [out["packed_lengths"][r].item() for r in (a, b, c)] == [6, 6, 2]
    assert out["token_mask"][c].tolist() == [1, 1, 0, 0, 0, 0]
    mask = out["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (3, 6, 6)
    expected_b = torch.zeros((6, 6), dtype=torch.bool)
    expected_b[:5, :5] = torch.ones((5, 5), dtype=torch.bool).tril()
    expected_b[5, 5] = True
    assert torch.equal(mask[b], expected_b)
    assert not mask[c, 2:].any() and not mask[c, :, 2:].any()  # padding attends nowhere


def test_original_defaults_and_attention_modes():
    batch = {"input_ids": [[1, 2, 3], [4, 5]], "labels": [[1, 2, 3], [4, 5]]}
    out = pack(batch)  # max_seql defaulted to 64, token_mask on
    assert out["input_ids"].shape == (1, 5) and "token_mask" in out
    dense = pack(batch, attn_mode="dense", return_token_mask=False)
    assert "token_mask" not in dense and dense["attention_mask"][0, :3, :3].all()
    assert not dense["attention_mask"][0, :3, 3:].any()
    diag = pack(batch, attn_mode="diag")
    assert torch.equal(diag["attention_mask"][0], torch.eye(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mode"):
        pack(batch, attn_mode="full")
    with pytest.raises(ValueError, match="original OpenSloth"):
        pack(batch, 8, device="cpu", attention="varlen")
    # Without the original's arguments, the new call and its 4D float mask are unchanged.
    assert pack(batch, 8)["attention_mask"].shape == (1, 1, 5, 5)
