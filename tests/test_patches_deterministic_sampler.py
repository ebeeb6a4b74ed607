"""patch_trainer_deterministic_sampler: the swap, the changed order, idempotence, the target check (CPU)."""

from __future__ import annotations

import pytest
import torch

from opensloth.patches import applied_patches
from opensloth.patches.deterministic_sampler import (PATCH_NAME, patch_trainer_deterministic_sampler,
                                                     unpatch_trainer_deterministic_sampler)
from opensloth.patches.registry import PatchTargetError, is_patched


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i)])}


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)

    def forward(self, x):
        return {"loss": self.w(x).pow(2).mean()}


def _trainer(cls, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], seed=5,
                             remove_unused_columns=False, use_cpu=True)
    return cls(model=_Model(), args=args, train_dataset=_Rows(), eval_dataset=_Rows())


def _order(trainer) -> list[int]:
    return [int(v) for batch in trainer.get_train_dataloader() for v in batch["x"].flatten()]


@pytest.fixture
def trainer_cls():
    from transformers import Trainer

    class SomeSFTTrainer(Trainer):  # a fresh class per test: the patch never leaks into others
        pass

    yield SomeSFTTrainer
    unpatch_trainer_deterministic_sampler(SomeSFTTrainer)


def test_swaps_both_samplers_and_reads_in_dataset_order(trainer_cls, tmp_path):
    shuffled = _order(_trainer(trainer_cls, tmp_path))
    assert sorted(shuffled) == list(range(32)) and shuffled != list(range(32))  # stock: shuffled

    assert patch_trainer_deterministic_sampler(trainer_cls) is trainer_cls
    assert is_patched(trainer_cls._get_train_sampler, PATCH_NAME)
    assert is_patched(trainer_cls._get_eval_sampler, PATCH_NAME)
    trainer = _trainer(trainer_cls, tmp_path)
    assert _order(trainer) == list(range(32))
    assert isinstance(trainer._get_eval_sampler(trainer.eval_dataset), torch.utils.data.SequentialSampler)
    assert [r for r in applied_patches() if r.name == PATCH_NAME]


def test_is_idempotent_and_undone(trainer_cls, tmp_path):
    patch_trainer_deterministic_sampler(trainer_cls)
    first = trainer_cls._get_train_sampler
    patch_trainer_deterministic_sampler(trainer_cls)
    assert trainer_cls._get_train_sampler is first  # not wrapped twice
    assert unpatch_trainer_deterministic_sampler(trainer_cls)
    assert not is_patched(trainer_cls._get_train_sampler, PATCH_NAME)
    assert _order(_trainer(trainer_cls, tmp_path)) != list(range(32))


def test_a_missing_target_is_refused():
    class NotATrainer:
        def _get_train_sampler(self, dataset=None):
            return None

    with pytest.raises(PatchTargetError, match="_get_eval_sampler"):
        patch_trainer_deterministic_sampler(NotATrainer)
    assert not is_patched(NotATrainer._get_train_sampler, PATCH_NAME)  # nothing half-applied


def test_defaults_to_the_sft_trainer_in_use_and_the_original_import_path():
    import trl

    from opensloth.patching.ddp_patch import patch_trainer_deterministic_sampler as old_path

    assert old_path is patch_trainer_deterministic_sampler
    already = is_patched(trl.SFTTrainer.__dict__.get("_get_train_sampler"), PATCH_NAME)
    try:
        assert old_path() is trl.SFTTrainer
        assert is_patched(trl.SFTTrainer._get_train_sampler, PATCH_NAME)
    finally:
        if not already:
            unpatch_trainer_deterministic_sampler()
