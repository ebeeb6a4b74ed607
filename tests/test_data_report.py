"""Drop reports and the steps-per-epoch arithmetic, checked against accelerate's sampler."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _accelerate_batches(num_records, world_size, per_device, drop_last=False):
    """Batches per rank as the Trainer's prepared dataloader yields them (rank 0 and last rank)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    sampler = BatchSampler(SequentialSampler(range(num_records)), per_device, drop_last)
    lengths = {len(list(BatchSamplerShard(sampler, world_size, rank, split_batches=False, even_batches=True)))
               for rank in range(world_size)}
    assert len(lengths) == 1  # even batches: every rank the same
    return lengths.pop()


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_per_rank_matches_accelerate(drop_last):
    from opensloth.data.report import batches_per_rank

    for num_records in (0, 1, 7, 8, 9, 63, 64, 65, 200):
        for world_size in (1, 2, 3, 8):
            for per_device in (1, 4, 8):
                expected = _accelerate_batches(num_records, world_size, per_device, drop_last)
                assert batches_per_rank(num_records, world_size, per_device, drop_last) == expected, (
                    num_records, world_size, per_device)


def test_steps_per_epoch_matches_trainer_formula():
    from opensloth.data.report import expected_steps_per_epoch

    # transformers.Trainer: max(len_dataloader // accum + int(len_dataloader % accum > 0), 1)
    for batches in range(0, 40):
        for accum in (1, 2, 3, 8):
            trainer = max(batches // accum + int(batches % accum > 0), 1)
            assert expected_steps_per_epoch(batches * 4, 1, 4, accum) == trainer
    assert expected_steps_per_epoch(2000, 2, 8, 2) == 63
    with pytest.raises(ValueError, match="world_size"):
        expected_steps_per_epoch(10, 0, 8, 1)


def test_drop_report_merge_and_empty():
    from opensloth.data import DropReport, EmptyDatasetError

    a = DropReport("x", total_in=3)
    a.drop("empty", 0)
    b = DropReport("x", total_in=2, truncated=1)
    b.drop("empty", 1)
    b.drop("too_long", 0)
    a.merge(b)
    assert (a.total_in, a.total_out, a.truncated, a.dropped) == (5, 2, 1, {"empty": 2, "too_long": 1})
    assert "2 dropped (empty)" in a.summary()
    c = DropReport("y", total_in=1)
    c.drop("tie")
    with pytest.raises(EmptyDatasetError, match="1 tie"):
        c.raise_if_empty()


def test_debug_dataset_size_script(capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import debug_dataset_size
    finally:
        sys.path.pop(0)
    judged = os.path.join(ROOT, "data", "formats", "judged_rollouts.jsonl")
    debug_dataset_size.main(["--format", "preference", "--dataset", judged, "--max_seq_length", "128",
                             "--max_prompt_length", "32", "--world_size", "2", "--per_device_batch_size", "4",
                             "--json"])
    out = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s["records"] for s in out["stages"]}
    assert stages["dropped: tie"] == -4 and stages["dropped: single candidate"] == -4
    assert out["kept"] == 28 and out["batches_per_rank"] == 4 and out["steps_per_epoch"] == 4
    assert stages["  of which truncated"] > 0
