"""Drop-in for users of the original OpenSloth: its import lines, signatures, flags, folders and scripts.

Fast checks run in this process or in one cheap subprocess: every original
import line (without loading torch), the version, the original flags of
``train_configurable.py`` and ``precompute_dataset.py``, ``CacheConfig`` and
the wrapper's original keywords, and a prepared folder written the original's
way. The slow ones launch scripts written in the original's style on 1 and 2
ranks (``tests/original_style_sft.py``), ``train_configurable.py`` with the
original's flags, and the three ``examples/`` on the embedded default.
docs/compat.md lists every name these tests cover.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib

import pytest

from helpers import REPO, SFT_DATA, TINY_MODEL, clean_env, run, torchrun_cmd

# The original's import lines (README, TRAINING_README, examples, train_scripts, seed 004).
ORIGINAL_IMPORTS = """
from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples
from opensloth.patching.ddp_patch import patch_trainer_loss_scaling, patch_trainer_deterministic_sampler
from opensloth import simple_cache_dataset_wrapper, cache_dataset_wrapper, CacheConfig, OPENSLOTH_DATA_DIR
from opensloth.utils import simple_cache_dataset_wrapper, cache_dataset_wrapper, CacheConfig
from opensloth.utils.dataset_cache import cache_dataset_wrapper, CacheConfig, _check_distributed_environment
from opensloth.utils.packing import pack
from opensloth._debug_dataloader import debug_chat_dataloader_for_training
from opensloth.scripts.lora_save_fp8 import main
import opensloth.patching.ddp_patch as ddp_module
"""

# train_configurable.py as the original's TRAINING_README and sanity script call it.
ORIGINAL_TRAIN_FLAGS = ["--model_name", str(TINY_MODEL), "--max_seq_length", "512", "--num_epochs", "1",
                        "--train_samples", "16", "--test_samples", "0", "--learning_rate", "2e-4",
                        "--per_device_batch_size", "2", "--grad_accum", "2", "--experiment_name", "sanity"]


def _script_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "train_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- names, version, flags


def test_every_original_import_line_works_without_loading_torch():
    probe = (ORIGINAL_IMPORTS + "import sys\n"
             "assert set(ddp_module.__all__) >= {'ddp_patch', 'patch_optimize_sft_trainer_batch_samples', "
             "'patch_trainer_loss_scaling', 'patch_trainer_deterministic_sampler'}\n"
             "assert str(OPENSLOTH_DATA_DIR).endswith('.cache/opensloth')\n"
             "print(sorted(m for m in ('torch', 'transformers', 'trl', 'unsloth', 'datasets') if m in sys.modules))")
    proc = run([sys.executable, "-c", probe])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # the original's import opensloth loaded trl and torch


def test_each_original_import_line_is_checked():
    """The probe above fails when a line breaks: a removed name is an ImportError."""
    proc = run([sys.executable, "-c", "from opensloth.patching.ddp_patch import patch_that_never_existed"])
    assert proc.returncode != 0 and "ImportError" in proc.stderr


def test_version_satisfies_pins_on_the_original():
    import opensloth

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert declared == opensloth.__version__
    assert tuple(int(x) for x in declared.split(".")[:3]) >= (0, 2, 1)  # `opensloth>=0.2.1` resolves to us
    assert f"## {declared}" in (REPO / "CHANGELOG.md").read_text()


def test_original_train_configurable_flags(tmp_path):
    parser = _script_module("train_configurable").build_parser()
    from opensloth.errors import UserInputError
    from opensloth.sft import resolve_settings

    settings = resolve_settings(parser.parse_args([*ORIGINAL_TRAIN_FLAGS, "--use_patches"]))
    assert (settings.use_patches, settings.no_patches, settings.num_epochs, settings.grad_accum) == (True, False, 1, 2)
    assert resolve_settings(parser.parse_args([*ORIGINAL_TRAIN_FLAGS, "--no_patches"])).no_patches
    settings = resolve_settings(parser.parse_args(["--skip_prepare", "--prepared_dataset_path", str(tmp_path)]))
    assert settings.skip_prepare and settings.prepared_dataset_path == str(tmp_path)
    # The original silently trained on other data here; the lone flag is refused with the fix.
    with pytest.raises(UserInputError, match="add --skip_prepare"):
        resolve_settings(parser.parse_args(["--prepared_dataset_path", str(tmp_path)]))


def test_original_precompute_flags():
    module = _script_module("precompute_dataset")
    args = module.build_parser().parse_args([
        "--model_name", "unsloth/Qwen3-0.6B-bnb-4bit", "--max_seq_length", "16000", "--dataset_name",
        "trl-lib/Capybara", "--train_split", "train[:2000]", "--val_split", "train[2000:2200]",
        "--target_token_only", "--instruction_part", "<|im_start|>user\n", "--response_part",
        "<|im_start|>assistant\n", "--output_dir", "data/precomputed", "--dataset_name_suffix", "v2",
        "--num_proc", "4", "--batch_size", "1000"])
    assert (args.dataset, args.output_root, args.target_token_only, args.name) == (
        "trl-lib/Capybara", "data/precomputed", True, None)
    # The folder name the original derived (without --name).
    assert module.original_folder_name(args.model_name, args.dataset, True, "v2") == (
        "unsloth_Qwen3_0.6B_bnb_4bit_trl-lib_Capybara_target_only_v2_processed")


# --------------------------------------------------------------------------- cache wrapper, original keywords


class _Trainer:
    def __init__(self, train_dataset, eval_dataset):
        self.train_dataset, self.eval_dataset, self.args = train_dataset, eval_dataset, None


def _tokenizing_factory(calls):
    def build_trainer(model, tokenizer, train_dataset, val_dataset, world_size):
        tokenized = "input_ids" in train_dataset.column_names
        calls.append(("tokenized" if tokenized else "raw", world_size))
        if not tokenized:
            def tok(row):
                ids = tokenizer(row["text"])["input_ids"][:64]
                return {"input_ids": ids}

            train_dataset = train_dataset.map(tok, remove_columns=["text"])
            val_dataset = val_dataset.map(tok, remove_columns=["text"]) if val_dataset is not None else None
        return _Trainer(train_dataset, val_dataset)

    return build_trainer


def test_cache_config_and_the_wrappers_original_keywords(tmp_path, tokenizer, one_process):
    import datasets

    from opensloth import CacheConfig, cache_dataset_wrapper, simple_cache_dataset_wrapper

    raw = datasets.Dataset.from_dict({"text": [f"sample {i} " * (i + 1) for i in range(12)]})
    val = datasets.Dataset.from_dict({"text": ["held out", "also held out"]})
    calls = []
    config = CacheConfig(cache_dir=str(tmp_path), timeout_seconds=120, enable_validation=True)
    assert (config.cache_dir, config.timeout_seconds, config.train_subdir, config.ready_flag_name) == (
        str(tmp_path), 120, "train_dataset", ".ready")
    # train_samples / val_samples as key params made the original raise a TypeError.
    key = {"model_name": "tiny", "max_seq_length": 64, "train_samples": 12, "val_samples": 2}
    wrapped = cache_dataset_wrapper(cache_config=config, cache_key_params=key, validate_cache=False)(
        _tokenizing_factory(calls))
    assert wrapped.cache_config.timeout_minutes == 2 and wrapped.cache_config.verify == "size"
    first = wrapped(model=None, tokenizer=tokenizer, train_dataset=raw, val_dataset=val, world_size=1)  # by keyword
    assert calls == [("raw", 1)] and len(first.train_dataset) == 12 and len(first.eval_dataset) == 2
    # simple_cache_dataset_wrapper with the same key: the cache is reused, nobody tokenizes.
    again = simple_cache_dataset_wrapper(cache_dir=str(tmp_path), timeout_minutes=60, **key)(
        _tokenizing_factory(calls))(None, tokenizer, raw, val, 1)
    assert calls[-1] == ("tokenized", 1) and again.train_dataset["input_ids"] == first.train_dataset["input_ids"]


def test_cache_config_warns_once_about_layout_names(capsys):
    from opensloth import CacheConfig

    CacheConfig(train_subdir="tr", ready_flag_name="done")
    assert "train_subdir" in capsys.readouterr().err


# --------------------------------------------------------------------------- a prepared folder of the original


def write_original_prepared(path, tokenizer, rows: int = 24, *, bad_id: bool = False, model_name=None):
    """What the original's precompute_dataset.py left: train/ and val/ from save_to_disk, dataset_config.json."""
    import datasets

    from opensloth.data import load_records

    def tokenized(split):
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in load_records(str(SFT_DATA), split)]
        enc = tokenizer(texts, truncation=True, max_length=256)
        ids = [list(x) for x in enc["input_ids"]]
        if bad_id:
            ids[0][1] = len(tokenizer) + 5
        return datasets.Dataset.from_dict({"text": texts, "input_ids": ids, "attention_mask": enc["attention_mask"]})

    os.makedirs(path)
    tokenized(f"train[:{rows}]").save_to_disk(os.path.join(path, "train"))
    tokenized("test[:4]").save_to_disk(os.path.join(path, "val"))
    with open(os.path.join(path, "dataset_config.json"), "w") as fh:
        json.dump({"model_name": model_name or str(TINY_MODEL), "max_seq_length": 256, "dataset_name": "local",
                   "train_split": f"train[:{rows}]", "val_split": "test[:4]", "target_token_only": False,
                   "instruction_part": None, "response_part": None, "processed_at": str(path)}, fh)
    return str(path)


def test_original_prepared_folder_is_accepted_after_checks(tmp_path, tokenizer, capsys):
    from opensloth.cache import PreparedDatasetError, PreparedDatasetMismatchError, load_prepared_dataset

    good = write_original_prepared(tmp_path / "good", tokenizer, model_name="unsloth/Qwen3-0.6B-bnb-4bit")
    train, val = load_prepared_dataset(good, tokenizer, max_seq_length=256)
    assert len(train) == 24 and len(val) == 4 and "input_ids" in train.column_names
    warning = capsys.readouterr().err
    assert "original OpenSloth's precompute_dataset.py" in warning and "unsloth/Qwen3-0.6B-bnb-4bit" in warning
    with pytest.raises(PreparedDatasetMismatchError, match="longer than max_seq_length=16"):
        load_prepared_dataset(good, tokenizer, max_seq_length=16)
    bad = write_original_prepared(tmp_path / "bad", tokenizer, bad_id=True)
    with pytest.raises(PreparedDatasetMismatchError, match="outside this tokenizer's vocabulary"):
        load_prepared_dataset(bad, tokenizer)
    # One of ours that lost its READY marker (an interrupted build) is still refused, not read as an old one.
    os.makedirs(tmp_path / "ours" / "train")
    for name in ("state.json", "dataset_info.json"):
        (tmp_path / "ours" / "train" / name).write_text("{}")
    (tmp_path / "ours" / "cache_metadata.json").write_text("{}")
    with pytest.raises(PreparedDatasetError, match="no READY marker"):
        load_prepared_dataset(str(tmp_path / "ours"), tokenizer)


def test_target_token_only_trains_responses(tokenizer):
    import datasets

    from opensloth.data.response_markers import mask_to_responses

    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    ds, report = mask_to_responses(datasets.Dataset.from_dict({"input_ids": [ids], "labels": [ids]}), tokenizer)
    trained = [t for t, label in zip(ids, ds[0]["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "4<|im_end|>\n6<|im_end|>\n" and report.total_dropped == 0
    from opensloth.errors import UserInputError

    with pytest.raises(UserInputError, match="--response_part"):
        mask_to_responses(datasets.Dataset.from_dict({"input_ids": [ids], "labels": [ids]}), tokenizer,
                          response_part="### Response:")


# --------------------------------------------------------------------------- scripts, 1 and 2 ranks


def _result(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_original_style_script_on_one_then_two_ranks(tmp_path):
    """The original's example code (imports, patches, wrapper keywords, tuple unpacking) trains on 1 and 2 ranks."""
    script = "tests/original_style_sft.py"
    out, cache = str(tmp_path / "outputs"), str(tmp_path / "cache")
    one = run(torchrun_cmd(1, script, out, cache, "simple"))
    result = _result(one)
    assert result["env"] == [0, 1, 0] and result["steps"] == 4
    assert "optimize_sft_trainer_batch_samples" in result["patches"]
    assert result["pack_keys"] == ["attention_mask", "input_ids", "labels", "packed_lengths", "position_ids",
                                   "token_mask"]
    assert "built the tokenized dataset cache" in one.stderr
    assert os.path.isdir(os.path.join(out, "opensloth_sanity_ws1", "checkpoint-4"))

    two = run(torchrun_cmd(2, script, out, cache, "config"))
    result = _result(two)
    assert result["env"] == [0, 2, 0] and result["steps"] == 2  # same global batch per step: 16 samples / (2x2x2)
    assert {"trainer_deterministic_sampler", "process_group_backend"} <= set(result["patches"])
    assert result["sampler"] == "SequentialSampler"
    # The world size is not in the cache key: the 2-rank launch reuses what the 1-rank one tokenized.
    assert "reusing the tokenized dataset cache" in two.stderr and "built the tokenized" not in two.stderr


@pytest.mark.slow
def test_original_train_configurable_command_lines(tmp_path, tokenizer):
    """The original sanity script's runs: patched and --no_patches keep apart; a rerun never overwrites.

    The unpatched run trains from a folder the original's precompute_dataset.py wrote.
    """
    script = "train_scripts/train_configurable.py"
    ours = ["--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    patched = run(torchrun_cmd(2, script, *ORIGINAL_TRAIN_FLAGS, "--use_patches", *ours))
    assert patched.returncode == 0, patched.stderr[-4000:]
    prepared = write_original_prepared(tmp_path / "precomputed", tokenizer, rows=16)
    plain = run(torchrun_cmd(2, script, *ORIGINAL_TRAIN_FLAGS, "--no_patches", "--skip_prepare",
                             "--prepared_dataset_path", prepared, *ours))
    assert plain.returncode == 0, plain.stderr[-4000:]
    assert "original OpenSloth's precompute_dataset.py" in plain.stderr
    for name in ("sanity_ws2", "sanity_ws2_nopatches"):
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        assert state["global_step"] == 2 and (tmp_path / name / "adapter_model.safetensors").exists(), name
    # The same command again refuses in one line, before loading anything, and leaves the run alone
    # (the original sanity script's one-process environment, with the 2-rank world size).
    before = (tmp_path / "sanity_ws2" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run([sys.executable, script, *ORIGINAL_TRAIN_FLAGS, "--use_patches", *ours], timeout=120,
                WORLD_SIZE="2", LOCAL_RANK="0", RANK="0", MASTER_ADDR="localhost", MASTER_PORT="29531")
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1 and "already holds a run" in errors[0], again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert (tmp_path / "sanity_ws2" / "adapter_model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_examples_are_working_templates(tmp_path):
    """The three examples train on the embedded default; the adapter exports with the original's lora_save_fp8."""
    out = tmp_path / "outputs"
    for example, run_name in (("qwen_sft.py", "qwen_sft_ws1"), ("qwen_sft_cache_dataset.py", "qwen_sft_cache_ws1"),
                              ("zephyr_dpo_ddp.py", "zephyr_dpo_ws1")):
        proc = run([sys.executable, f"examples/{example}"], MAX_STEPS="2", OUTPUT_DIR=str(out),
                   CACHE_DIR=str(tmp_path / "cache"))
        assert proc.returncode == 0, (example, proc.stderr[-4000:])
        state = json.loads((out / run_name / "trainer_state.json").read_text())
        assert state["global_step"] == 2 and (out / run_name / "adapter_model.safetensors").exists(), example
    again = run([sys.executable, "examples/qwen_sft.py"], MAX_STEPS="2", OUTPUT_DIR=str(out))
    assert again.returncode == 2 and re.search(r"^error: run dir .*qwen_sft_ws1 already holds a run", again.stderr,
                                               re.M), again.stderr[-2000:]
    export = run([sys.executable, "-m", "opensloth.scripts.lora_save_fp8", str(TINY_MODEL),
                  str(out / "qwen_sft_ws1"), str(tmp_path / "fp8")], timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
