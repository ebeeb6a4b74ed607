"""train_configurable.py: bad input gives one clear error line; real sources load from local copies."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, run

SCRIPT = "train_scripts/train_configurable.py"


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_per_device_batch_size_zero():
    _one_error_line(run(["python", SCRIPT, "--backend", "hf", "--per_device_batch_size", "0"]),
                    "--per_device_batch_size", ">= 1")


def test_global_batch_not_divisible():
    _one_error_line(run(["python", SCRIPT, "--backend", "hf", "--global_batch_size", "7", "--grad_accum", "2"]),
                    "--global_batch_size 7", "multiple of 2")


def test_missing_model_path():
    _one_error_line(run(["python", SCRIPT, "--backend", "hf", "--model_name", "./no/such/model"]),
                    "--model_name", "./no/such/model", "does not exist")


def test_non_integer_env_var():
    _one_error_line(run(["python", SCRIPT, "--backend", "hf"], WORLD_SIZE="two", RANK="0"),
                    "WORLD_SIZE", "not an integer")


@pytest.mark.slow
def test_missing_dataset_path():
    _one_error_line(run(["python", SCRIPT, "--backend", "hf", "--dataset", "./no_such_data.jsonl"]),
                    "no_such_data.jsonl")


@pytest.mark.slow
def test_dataset_without_expected_columns(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(4)))
    line = _one_error_line(run(["python", SCRIPT, "--backend", "hf", "--dataset", str(bad)]), "messages")
    assert "question" in line  # names the columns it found


@pytest.mark.slow
def test_local_copy_of_model_and_dataset(tmp_path):
    """A model folder and a JSONL file given by path train like the embedded default."""
    import shutil

    model_copy = tmp_path / "my-model"
    shutil.copytree(REPO / "data" / "tiny-qwen3", model_copy)
    data_file = tmp_path / "chat.jsonl"
    lines = (REPO / "data" / "sft" / "train.jsonl").read_text().splitlines()[:16]
    data_file.write_text("\n".join(lines) + "\n")
    proc = run(["python", SCRIPT, "--backend", "hf", "--model_name", str(model_copy), "--dataset", str(data_file),
                "--max_steps", "2", "--per_device_batch_size", "4", "--output_dir", str(tmp_path / "out"),
                "--cache_dir", str(tmp_path / "cache"), "--experiment_name", "local"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "local_ws1"
    assert (run_dir / "adapter_config.json").exists() and (run_dir / "adapter_model.safetensors").exists()
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert [r["step"] for r in state["log_history"] if "loss" in r] == [1, 2]
    assert list((run_dir / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file"


@pytest.mark.slow
def test_precomputed_dataset_trains_and_refuses_other_tokenizer(tmp_path):
    """precompute_dataset.py -> --skip_prepare trains; another tokenizer is one clear error."""
    import shutil

    out = tmp_path / "precomputed"
    proc = run(["python", "train_scripts/precompute_dataset.py", "--model_name", "data/tiny-qwen3",
                "--dataset", "data/sft", "--name", "tiny", "--max_seq_length", "512", "--output_root", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "tiny" / "train").is_dir() and (out / "tiny" / "cache_metadata.json").exists()
    proc = run(["python", SCRIPT, "--backend", "hf", "--skip_prepare", "--prepared_dataset_path", str(out / "tiny"),
                "--max_seq_length", "512", "--max_steps", "2", "--per_device_batch_size", "4",
                "--output_dir", str(tmp_path / "runs"), "--experiment_name", "pre"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "pre_ws1" / "adapter_model.safetensors").exists()

    # Same weights, a tokenizer with one extra special token: a different vocabulary.
    other = tmp_path / "other-model"
    shutil.copytree(REPO / "data" / "tiny-qwen3", other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config.setdefault("extra_special_tokens", {})
    tok_json = json.loads((other / "tokenizer.json").read_text())
    tok_json["added_tokens"].append({"id": max(t["id"] for t in tok_json["added_tokens"]) + 1,
                                     "content": "<|opensloth_test|>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    (other / "tokenizer.json").write_text(json.dumps(tok_json))
    proc = run(["python", SCRIPT, "--backend", "hf", "--model_name", str(other), "--skip_prepare",
                "--prepared_dataset_path", str(out / "tiny"), "--max_seq_length", "512", "--max_steps", "1",
                "--output_dir", str(tmp_path / "runs")])
    _one_error_line(proc, "tokenizer")
