"""opensloth.launch: one TrainingArguments builder for SFT and DPO, one train-and-save, LoRA settings."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from opensloth.dpo.controller import DynamicBetaConfig
from opensloth.dpo.run import DPORunSettings, make_dpo_config
from opensloth.errors import UserInputError
from opensloth.launch import LoraSettings, add_checkpoint_marker, train_and_save, training_args_kwargs
from opensloth.sft import SFTSettings, make_sft_config

SHARED = dict(per_device_batch_size=None, eval_batch_size=2, grad_accum=3, learning_rate=5e-5, num_epochs=2.0,
              max_steps=7, logging_steps=2, eval_steps=None, save_steps=4, seed=11, no_gradient_checkpointing=False)
RUN = dict(run_dir="out/x_ws2", per_device=4, world_size=2, backend="hf", dtype="float32", has_eval=True)


def test_sft_and_dpo_configs_share_every_training_argument():
    sft = make_sft_config(SFTSettings(**SHARED, warmup_steps=5), **RUN)
    dpo = make_dpo_config(DPORunSettings(**SHARED, lr_warmup_steps=5), DynamicBetaConfig(), **RUN)
    kwargs = training_args_kwargs(SimpleNamespace(**SHARED), warmup_steps=5, **RUN)
    for name, value in kwargs.items():
        assert getattr(sft, name) == getattr(dpo, name), name
    # The values themselves: eval every logging_steps x 5, checkpoints every save_steps, DDP without the
    # unused-parameter search, no bf16 for a float32 model, gradient checkpointing on the hf backend.
    assert (sft.per_device_train_batch_size, sft.per_device_eval_batch_size, sft.gradient_accumulation_steps) == (4, 2, 3)
    assert (sft.eval_steps, sft.save_strategy, sft.save_steps, sft.seed, sft.data_seed) == (10, "steps", 4, 11, 11)
    assert not sft.bf16 and not sft.fp16 and sft.gradient_checkpointing and sft.ddp_find_unused_parameters is False
    assert training_args_kwargs(SimpleNamespace(**SHARED), warmup_steps=0, **{**RUN, "dtype": "bfloat16"})["bf16"]
    assert sft.warmup_steps == dpo.warmup_steps == 5
    # What differs is theirs alone.
    assert sft.max_length == 1024 and not sft.packing and dpo.loss_type == ["sigmoid"] and dpo.max_length is None


class _Trainer:
    def __init__(self, rank0: bool):
        self.rank0, self.calls = rank0, []
        self.callback_handler = SimpleNamespace(callbacks=[])

    def add_callback(self, callback):
        self.callback_handler.callbacks.append(callback)

    def remove_callback(self, callback):
        self.callback_handler.callbacks.remove(callback)

    def train(self, resume_from_checkpoint=None):
        self.calls.append(("train", resume_from_checkpoint))

    def save_state(self):
        self.calls.append(("save_state",))

    def is_world_process_zero(self):
        return self.rank0


class _Saves:
    def __init__(self, log, what):
        self.log, self.what = log, what

    def save_pretrained(self, path):
        self.log.append((self.what, path))


def _checkpoint(run_dir, step, complete=True):
    from opensloth.checkpoint import checkpoint_dir, write_marker

    path = checkpoint_dir(str(run_dir), step)
    os.makedirs(path)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        open(os.path.join(path, name), "w").close()
    if complete:
        write_marker(path, step, world_size=1)
    return path


@pytest.mark.parametrize("rank0", [True, False])
def test_train_and_save(rank0, tmp_path):
    run = str(tmp_path / "run")
    complete = _checkpoint(run, 2)
    _checkpoint(run, 4, complete=False)  # cut short while saving
    trainer, saved = _Trainer(rank0), []
    seconds = train_and_save(trainer, _Saves(saved, "model"), _Saves(saved, "tokenizer"), run,
                             resume_from_checkpoint="last", save_extra=lambda d: saved.append(("extra", d)))
    assert seconds >= 0
    assert trainer.calls == [("train", complete), ("save_state",)]  # "last" -> the last COMPLETE checkpoint
    assert saved == ([("model", run), ("tokenizer", run), ("extra", run)] if rank0 else [])
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks] == ["CheckpointMarker"]
    train_and_save(trainer, _Saves([], "m"), _Saves([], "t"), run)
    assert len(trainer.callback_handler.callbacks) == 1  # added once, last


def test_checkpoint_marker_is_written_last_and_removed_before_a_rewrite(tmp_path):
    from opensloth.checkpoint import MARKER_FILE, is_complete

    trainer = _Trainer(True)
    add_checkpoint_marker(trainer)
    (marker,) = trainer.callback_handler.callbacks
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True, world_size=2)
    state, control = SimpleNamespace(global_step=3), SimpleNamespace(should_save=True)
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "optimizer.pt").write_text("x")
    marker.on_save(args, state, control)
    assert is_complete(folder) and json.loads((folder / MARKER_FILE).read_text())["world_size"] == 2
    marker.on_step_end(args, state, control)  # step 3 is about to be saved again (resumed from an earlier one)
    assert not is_complete(folder)
    marker.on_step_end(args, SimpleNamespace(global_step=3), SimpleNamespace(should_save=False))
    marker.on_save(SimpleNamespace(**{**vars(args), "should_save": False}), state, control)  # not rank 0
    assert not is_complete(folder)


def test_lora_settings_validate():
    assert LoraSettings().target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(UserInputError, match="lora.r=0"):
        LoraSettings(r=0)
    with pytest.raises(UserInputError, match="target_modules"):
        LoraSettings(target_modules=())
