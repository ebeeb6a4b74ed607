"""opensloth.sft.run: SFT settings get the same config path as DPO (--config run.yaml + flag overrides)."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import REPO
from opensloth.errors import UserInputError
from opensloth.sft import SFTSettings, resolve_settings

# The flags train_configurable.py had before its parser was generated from SFTSettings (and the original
# OpenSloth's --use_patches): name -> default. --learning_rate keeps its name; its default now depends on the
# model (test_learning_rate_default_depends_on_the_model).
OLD_FLAGS = {
    "model_name": "data/tiny-qwen3", "dataset": "data/sft", "train_split": "train", "test_split": "test",
    "max_seq_length": 1024, "num_epochs": 1.0, "max_steps": -1, "train_samples": None, "test_samples": 0,
    "eval_steps": None, "eval_batch_size": None, "warmup_steps": 0,
    "per_device_batch_size": None, "global_batch_size": None, "grad_accum": 1, "logging_steps": 1, "save_steps": 0,
    "seed": 3407, "no_patches": False, "use_patches": False, "packing_layout": "auto", "debug_dataloader": False, "experiment_name": "sft",
    "output_dir": "outputs", "backend": "auto", "dtype": "auto", "load_in_4bit": False, "assistant_only_loss": False,
    "no_gradient_checkpointing": False, "skip_prepare": False, "prepared_dataset_path": None, "cache_dir": None,
}


def _parser():
    spec = importlib.util.spec_from_file_location("train_configurable_script",
                                                  REPO / "train_scripts" / "train_configurable.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_every_old_flag_keeps_its_name_and_default():
    settings = resolve_settings(_parser().parse_args([]))
    assert {name: getattr(settings, name) for name in OLD_FLAGS} == OLD_FLAGS
    help_text = _parser().format_help()
    for name in OLD_FLAGS:
        assert f"--{name}" in help_text
    assert "--task" in help_text and "--config" in help_text and "--learning_rate" in help_text


def test_learning_rate_default_depends_on_the_model(tmp_path):
    from opensloth.sft.run import EMBEDDED_SFT_LEARNING_RATE, SFT_LEARNING_RATE, default_sft_learning_rate

    assert resolve_settings(_parser().parse_args([])).learning_rate == EMBEDDED_SFT_LEARNING_RATE == 1e-2
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert default_sft_learning_rate(str(other)) == SFT_LEARNING_RATE == 2e-4
    assert default_sft_learning_rate("Qwen/Qwen3-0.6B") == 2e-4  # a hub id is never the embedded model
    assert default_sft_learning_rate(str(REPO / "data" / "tiny-qwen3")) == 1e-2  # the same folder, spelled absolute
    # A learning rate given on the command line or in the YAML wins over the model's default.
    assert resolve_settings(_parser().parse_args(["--learning_rate", "3e-4"])).learning_rate == 3e-4
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 5e-5\n")
    assert resolve_settings(_parser().parse_args(["--config", str(cfg)])).learning_rate == 5e-5


def test_lora_settings_default_to_all_seven_linear_layers():
    settings = resolve_settings(_parser().parse_args([]))
    assert settings.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")
    assert (settings.lora.r, settings.lora.alpha) == (8, 16)
    attention = resolve_settings(_parser().parse_args(["--lora_target_modules", "q_proj", "v_proj", "--lora_r", "4"]))
    assert attention.lora.target_modules == ("q_proj", "v_proj") and attention.lora.r == 4
    with pytest.raises(UserInputError, match="--lora_r 0 must be"):
        SFTSettings(lora_r=0)


def test_yaml_then_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 50\nlearning_rate: 5e-5\nno_patches: true\npacking_layout: rows4d\n")
    settings = resolve_settings(_parser().parse_args(["--config", str(cfg), "--max_steps", "5"]))
    assert settings == SFTSettings(max_steps=5, learning_rate=5e-5, no_patches=True, packing_layout="rows4d")


@pytest.mark.parametrize("text, message", [
    ("max_step: 5\n", r"unknown keys \['max_step'\]"),
    ("packing_layout: dense\n", "packing_layout: 'dense' is not one of"),
    ("max_seq_length: 4\n", "--max_seq_length 4 is too small"),
    ("skip_prepare: true\n", "--skip_prepare needs --prepared_dataset_path"),
    ("model_name: ./no/such/model\n", "does not exist"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(UserInputError, match=message):
        resolve_settings(_parser().parse_args(["--config", str(cfg)]))
