"""opensloth.dpo.run: DPO settings from YAML and flags, through the one config mechanism of opensloth.config."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import REPO


def _script_parser():
    spec = importlib.util.spec_from_file_location("train_dpo_script", REPO / "train_scripts" / "train_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_yaml_maps_onto_dataclasses_and_flags_override(tmp_path):
    from opensloth.dpo.run import resolve_settings
    from opensloth.errors import UserInputError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 10\nlearning_rate: 0.002\ndynamic_beta:\n  alpha: 0.1\n  warmup_steps: 7\n")
    parser = _script_parser()
    settings, dyn = resolve_settings(parser.parse_args(
        ["--config", str(cfg), "--max_steps", "3", "--dynamic_beta.alpha", "0.5", "--beta_mode", "dynamic"]))
    assert settings.max_steps == 3 and settings.learning_rate == 0.002  # flag wins, YAML survives
    assert dyn.alpha == 0.5 and dyn.warmup_steps == 7 and dyn.risk_rule == "hoeffding_deadband"
    settings, _ = resolve_settings(parser.parse_args([]))
    assert settings.model_name == "data/tiny-qwen3" and settings.dataset == "data/preference"

    cfg.write_text("max_stpes: 10\n")
    with pytest.raises(UserInputError, match="max_stpes"):
        resolve_settings(parser.parse_args(["--config", str(cfg)]))
    with pytest.raises(UserInputError, match="no_patches"):
        resolve_settings(parser.parse_args(["--beta_mode", "dynamic", "--no_patches"]))
    with pytest.raises(UserInputError, match="risk_rule"):
        resolve_settings(parser.parse_args(["--dynamic_beta.risk_rule", "bogus"]))


def test_example_config_parses():
    from opensloth.dpo.run import resolve_settings

    settings, dyn = resolve_settings(_script_parser().parse_args(
        ["--config", str(REPO / "examples" / "config_dpo.yaml")]))
    assert settings.beta_mode == "dynamic" and dyn.risk_rule == "hoeffding_deadband"


def test_yaml_numbers_without_a_dot_are_floats(tmp_path):
    """PyYAML reads 5e-7 as the string '5e-7'; the settings get the float (the reference configs write it so)."""
    from opensloth.dpo.run import resolve_settings
    from opensloth.errors import UserInputError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 5e-7\ndynamic_beta:\n  alpha: 1e-3\n")
    settings, dyn = resolve_settings(_script_parser().parse_args(["--config", str(cfg)]))
    assert settings.learning_rate == 5e-7 and isinstance(settings.learning_rate, float)
    assert dyn.alpha == 1e-3
    cfg.write_text("learning_rate: abc\n")
    with pytest.raises(UserInputError, match=r"c.yaml: learning_rate: 'abc' is not a number"):
        resolve_settings(_script_parser().parse_args(["--config", str(cfg)]))

