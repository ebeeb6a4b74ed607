"""The dynamic-DPO repositories' config_dpo.yaml -> opensloth's DPO settings (opensloth.dpo.reference_config).

The fixtures under examples/reference_configs/ hold the same keys and values as
the two repositories' files. Every check runs on the resolved dataclasses, the
way train_dpo.py sees them, plus one subprocess that shows a wrong type is one
error line before anything heavy loads.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, clean_env

from opensloth.config import add_config_flags
from opensloth.dpo.reference_config import (VARIANT_NEW, VARIANT_OLD, is_reference_config, mapping_table_markdown,
                                            translate_reference_config)
from opensloth.dpo.run import SECTIONS, DPORunSettings, resolve_settings
from opensloth.errors import UserInputError

OLD = REPO / "examples" / "reference_configs" / "dynamic_beta.yaml"
NEW = REPO / "examples" / "reference_configs" / "dynamic_dpo_v1.yaml"


def _resolve(path, *flags):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, SECTIONS)
    return resolve_settings(parser.parse_args(["--config", str(path), *flags]))


def _write(tmp_path, base, **changes):
    """``base`` with ``changes`` ({"section.key": value}, None deletes) written to a new YAML file."""
    data = yaml.safe_load(open(base))
    for dotted, value in changes.items():
        *section, key = dotted.split(".")
        target = data[section[0]] if section else data
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    path = tmp_path / "config_dpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_old_variant_keeps_its_meanings():
    settings, dynamic = _resolve(OLD)
    assert settings.reference_variant == VARIANT_OLD
    assert settings.learning_rate == 5e-7 and isinstance(settings.learning_rate, float)  # '5e-7' is a str to PyYAML
    assert (settings.full_finetune, settings.model_name, settings.ref_model) == (True, "meta-llama/Llama-3.2-1B",
                                                                                 "meta-llama/Llama-3.2-1B")
    assert (settings.dataset, settings.train_split, settings.val_ratio, settings.split_seed) == (
        "Anthropic/hh-rlhf", "train[:20%]", 0.1, 42)
    assert (settings.max_seq_length, settings.per_device_batch_size, settings.grad_accum) == (512, 16, 1)
    assert (settings.max_grad_norm, settings.weight_decay, settings.lr_scheduler_type, settings.lr_warmup_steps) == (
        10.0, 0.01, "constant", 0)
    assert (settings.dtype, settings.hh_parser, settings.seed, settings.eval_strategy) == (
        "bfloat16", "reference", 42, "epoch")
    assert (settings.margins_log_dir, settings.reference_logs, settings.output_dir) == (
        "logs/margins", True, "dynamic_dpo_model")
    # dpo_training.warmup_steps is the BETA warmup in this repository
    assert (dynamic.warmup_steps, dynamic.delta, dynamic.q, dynamic.eps0, dynamic.ema_lambda) == (
        120, 0.1, 0.9, 0.05, 0.05)
    assert (dynamic.beta_0, dynamic.gamma, dynamic.alpha, dynamic.beta_min, dynamic.beta_max) == (
        0.1, 2.0, 0.0015, 0.0, 2.0)
    assert (dynamic.preset, dynamic.risk_rule, dynamic.p_hat_inclusive, dynamic.beta_timing) == (
        "reference", "hoeffding", True, "same_batch")


def test_new_variant_keeps_its_meanings():
    settings, dynamic = _resolve(NEW)
    assert settings.reference_variant == VARIANT_NEW
    # dpo_training.warmup_steps is the LR warmup here; the beta warmup is risk_test.beta_warmup
    assert (settings.lr_warmup_steps, dynamic.warmup_steps) == (120, 120)
    assert (settings.grad_accum, settings.eval_steps, settings.save_steps, settings.eval_batch_size) == (4, 500, 500, 16)
    assert (settings.dtype, settings.mixed_precision) == ("float32", "bf16")  # fp32 weights + HF bf16 AMP
    assert (settings.lr_scheduler_type, settings.weight_decay, settings.max_grad_norm) == ("linear", 0.0, 10.0)
    assert (settings.max_seq_length, settings.experiment_name, settings.reference_log_sample) == (
        1024, "trl-dynamic-beta", 64)
    assert (dynamic.ema_lambda, dynamic.alpha, dynamic.q, dynamic.risk_rule) == (0.1, 0.005, 0.9, "zscore")
    assert (dynamic.preset, dynamic.p_hat_inclusive, dynamic.beta_timing) == ("reference_v1", True, "micro_batch")


def test_flags_override_a_reference_config():
    settings, dynamic = _resolve(OLD, "--model_name", "data/tiny-qwen3", "--max_steps", "3",
                                 "--dynamic_beta.alpha", "0.5")
    assert (settings.model_name, settings.max_steps, dynamic.alpha) == ("data/tiny-qwen3", 3, 0.5)
    assert settings.ref_model == "meta-llama/Llama-3.2-1B"  # ref_name is its own key


def test_ignored_keys_are_explained_one_line_each(caplog):
    data = yaml.safe_load(open(NEW))
    notes = translate_reference_config(data, "c.yaml", DPORunSettings).notes
    for key in ("'sft_training:'", "dataset.max_len", "dpo_training.report", "dpo_training.save_dpo_dir",
                "margin_log.dpo_log_dir"):
        assert sum(key in n and "ignored" in n for n in notes) == 1, (key, notes)
    assert all("\n" not in n for n in notes)
    old_notes = translate_reference_config(yaml.safe_load(open(OLD)), "c.yaml", DPORunSettings).notes
    assert sum("'test:'" in n for n in old_notes) == 1  # one line for the whole section, not ten


@pytest.mark.parametrize("changes, message", [
    ({"dpo_training.learning_rate": "abc"}, "c: dpo_training.learning_rate (-> learning_rate): 'abc' is not a number"),
    ({"dpo_training.lerning_rate": 1e-6}, "unknown keys ['dpo_training.lerning_rate']"),
    ({"dpo_training.warmup_steps": 0}, "never ends the beta warmup"),
    ({"beta_update.beta_min": "1e-8"}, None),  # a string on their branches: typed, accepted
])
def test_old_variant_errors(tmp_path, changes, message):
    path = _write(tmp_path, OLD, **changes)
    if message is None:
        assert _resolve(path)[1].beta_min == 1e-8
        return
    with pytest.raises(UserInputError) as err:
        _resolve(path)
    assert message.replace("c:", str(path) + ":") in str(err.value) if message.startswith("c:") else message in str(
        err.value)
    assert "\n" not in str(err.value)


def test_new_variant_refuses_per_rank_controllers(tmp_path):
    with pytest.raises(UserInputError, match="save_per_rank: false"):
        _resolve(_write(tmp_path, NEW, **{"margin_log.save_per_rank": True}))


def test_variant_detection_and_override(tmp_path):
    with pytest.raises(UserInputError, match="keys of both"):
        _resolve(_write(tmp_path, OLD, **{"risk_test.beta_warmup": 10}))
    neither = {"policy_name": "m", "dataset": {"dataset_name": "d"}, "dpo_training": {"warmup_steps": 7}}
    assert is_reference_config(neither)
    with pytest.raises(UserInputError, match="--reference_variant"):
        translate_reference_config(neither, "x.yaml", DPORunSettings)
    path = tmp_path / "neither.yaml"
    path.write_text(yaml.safe_dump(neither))
    assert _resolve(path, "--reference_variant", VARIANT_OLD)[1].warmup_steps == 7  # beta warmup there
    assert _resolve(path, "--reference_variant", VARIANT_NEW)[0].lr_warmup_steps == 7  # LR warmup there
    with pytest.raises(UserInputError, match="mixes opensloth keys"):
        translate_reference_config({**neither, "max_steps": 3}, "x.yaml", DPORunSettings, VARIANT_OLD)
    assert not is_reference_config({"model_name": "m", "dataset": "data/preference", "dynamic_beta": {}})


def test_training_readme_mapping_table_is_current():
    text = (REPO / "TRAINING_README.md").read_text()
    start, end = "<!-- reference_config:start -->", "<!-- reference_config:end -->"
    assert text.split(start)[1].split(end)[0].strip() == mapping_table_markdown().strip()


@pytest.mark.parametrize("script", [["train_dpo.py"], ["train_configurable.py", "--task", "dpo"]])
def test_a_wrong_type_is_one_line_before_heavy_imports(tmp_path, script):
    path = _write(tmp_path, OLD, **{"risk_test.lambda": "often"})
    probe = ("import runpy, sys; sys.argv = [sys.argv[1], *sys.argv[2:]]; sys.path.insert(0, 'train_scripts');"
             "import opensloth.errors as e; rc = e.run_cli(runpy.run_path(sys.argv[0])['main']);"
             "print('heavy', [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, str(REPO / "train_scripts" / script[0]), *script[1:],
                           "--config", str(path)], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "risk_test.lambda" in errors[0] and "'often' is not a number" in errors[0]
    assert "heavy []" in proc.stdout


def test_optimizer_settings_reach_the_training_arguments():
    from opensloth.launch import training_args_kwargs
    from opensloth.sft.run import SFTSettings

    settings, _ = _resolve(OLD, "--model_name", "data/tiny-qwen3")
    kwargs = training_args_kwargs(settings, run_dir="r", per_device=16, world_size=1, backend="hf", dtype="bfloat16",
                                  has_eval=True, warmup_steps=settings.lr_warmup_steps)
    assert (kwargs["max_grad_norm"], kwargs["weight_decay"], kwargs["lr_scheduler_type"]) == (10.0, 0.01, "constant")
    assert (kwargs["eval_strategy"], kwargs["eval_steps"], kwargs["bf16"]) == ("epoch", None, True)
    new, _ = _resolve(NEW)
    kwargs = training_args_kwargs(new, run_dir="r", per_device=16, world_size=1, backend="hf", dtype="float32",
                                  has_eval=True, warmup_steps=new.lr_warmup_steps)
    assert (kwargs["bf16"], kwargs["fp16"], kwargs["warmup_steps"], kwargs["eval_steps"]) == (True, False, 120, 500)
    sft = training_args_kwargs(SFTSettings(), run_dir="r", per_device=8, world_size=1, backend="hf", dtype="float32",
                               has_eval=False, warmup_steps=0)
    assert (sft["max_grad_norm"], sft["weight_decay"], sft["lr_scheduler_type"], sft["bf16"]) == (
        1.0, 0.0, "linear", False)  # TRL's defaults
    with pytest.raises(UserInputError, match="lr_scheduler_type"):
        SFTSettings(lr_scheduler_type="cosine_typo")


def test_which_reference_model_is_loaded():
    from opensloth.dpo.run import reference_model_source

    base = dict(model_name="data/tiny-qwen3")
    assert reference_model_source(DPORunSettings(**base)) is None  # LoRA: the adapter-disabled policy
    assert reference_model_source(DPORunSettings(**base, full_finetune=True)) == "data/tiny-qwen3"
    assert reference_model_source(DPORunSettings(**base, full_finetune=True, ref_model="other")) == "other"
    # precomputed reference log-probs from the starting policy: no second copy
    assert reference_model_source(DPORunSettings(**base, full_finetune=True, precompute_ref_log_probs=True)) is None
    with pytest.raises(UserInputError, match="needs --full_finetune|Add --full_finetune"):
        DPORunSettings(**base, ref_model="other")
