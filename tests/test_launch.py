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


def test_run_dir_names_keep_patched_and_unpatched_runs_apart(tmp_path):
    from opensloth.launch import run_dir_for

    assert run_dir_for("o", "exp", 4) == "o/exp_ws4"
    assert run_dir_for("o", "exp", 4, no_patches=True) == "o/exp_ws4_nopatches"  # the original's suffix


def test_a_run_never_overwrites_another_but_may_resume_itself(tmp_path):
    from opensloth.launch import claim_run_dir

    out = str(tmp_path)
    assert claim_run_dir(out, "exp", 2) == str(tmp_path / "exp_ws2")  # nothing there yet
    (tmp_path / "exp_ws2" / "runs").mkdir(parents=True)  # TensorBoard files of a run that died early
    assert claim_run_dir(out, "exp", 2) == str(tmp_path / "exp_ws2")
    (tmp_path / "exp_ws2" / "checkpoint-4").mkdir()
    (tmp_path / "exp_ws2" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(UserInputError, match=r"exp_ws2 already holds a run \(adapter_model.safetensors, "
                                             r"checkpoint-4\).*--experiment_name"):
        claim_run_dir(out, "exp", 2)
    # Resuming that run, into its own folder, stays possible.
    assert claim_run_dir(out, "exp", 2, resume_from_checkpoint="last") == str(tmp_path / "exp_ws2")
    inside = str(tmp_path / "exp_ws2" / "checkpoint-4")
    assert claim_run_dir(out, "exp", 2, resume_from_checkpoint=inside) == str(tmp_path / "exp_ws2")
    # Resuming another run's checkpoint does not license overwriting this one.
    (tmp_path / "other_ws2" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(UserInputError, match="already holds a run"):
        claim_run_dir(out, "exp", 2, resume_from_checkpoint=str(tmp_path / "other_ws2" / "checkpoint-2"))
    # Other world sizes and the unpatched run have folders of their own.
    assert claim_run_dir(out, "exp", 1) == str(tmp_path / "exp_ws1")
    assert claim_run_dir(out, "exp", 2, no_patches=True) == str(tmp_path / "exp_ws2_nopatches")


def test_fsdp_launch_checks(monkeypatch):
    """--fsdp: one process is refused, Unsloth's native FSDP2 needs triton, the hf backend gets the Trainer's FSDP2."""
    import importlib.util
    import os
    from types import SimpleNamespace

    from opensloth.distributed import DistEnv
    from opensloth.errors import UserInputError
    from opensloth.launch import check_fsdp, fsdp_trainer_kwargs

    for name in ("UNSLOTH_FSDP2", "ACCELERATE_USE_FSDP"):
        monkeypatch.setenv(name, "0")  # and restored afterwards: check_fsdp sets UNSLOTH_FSDP2
    on = SimpleNamespace(fsdp=True, no_gradient_checkpointing=False)
    two, one = DistEnv(0, 0, 2, 2), DistEnv(0, 0, 1, 1)
    assert check_fsdp(SimpleNamespace(fsdp=False), two, "unsloth") is False
    with pytest.raises(UserInputError, match="nproc_per_node >= 2"):
        check_fsdp(on, one, "hf")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real_find_spec(n, *a))
    with pytest.raises(UserInputError, match="pip install triton"):
        check_fsdp(on, two, "unsloth")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "triton" else real_find_spec(n, *a))
    assert check_fsdp(on, two, "unsloth") is True and os.environ["UNSLOTH_FSDP2"] == "1"
    kwargs = fsdp_trainer_kwargs(on, "hf")
    assert kwargs["fsdp"] == "full_shard auto_wrap" and kwargs["fsdp_config"]["fsdp_version"] == 2
    assert kwargs["gradient_checkpointing"] is False and kwargs["fsdp_config"]["activation_checkpointing"] is True
    assert fsdp_trainer_kwargs(on, "unsloth") == {}  # Unsloth shards inside Trainer.__init__
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --config_file examples/fsdp.yaml
    assert fsdp_trainer_kwargs(SimpleNamespace(fsdp=False), "hf") == {"gradient_checkpointing": False}
