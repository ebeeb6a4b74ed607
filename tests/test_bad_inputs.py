"""Bad input, one line: every case exits 2 with one ``error:`` line naming the culprit, and no traceback.

The cases run in this process through each entry point's ``main`` and
:func:`opensloth.errors.run_cli` (they stop before anything heavy loads, so a
case costs milliseconds, not a subprocess). The rank behaviour under torchrun
and a real ``accelerate launch`` are the subprocess tests at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import sys

import pytest

from helpers import PREF_DATA, REPO, SFT_DATA, TINY_MODEL, run, torchrun_cmd, write_lines

if not (TINY_MODEL.is_dir() and SFT_DATA.is_dir() and PREF_DATA.is_dir()):
    pytest.skip("embedded tiny model / data missing", allow_module_level=True)

SCRIPTS = REPO / "train_scripts"
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_ERROR_FILE", "OPENSLOTH_DEBUG")


def _script(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # train_configurable --task dpo imports its sibling
    spec = importlib.util.spec_from_file_location(f"_bad_inputs_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- broken things to point at


def _model_copy(tmp, name="model"):
    dst = tmp / name
    shutil.copytree(TINY_MODEL, dst)
    return dst


def _truncated_model(tmp):
    model = _model_copy(tmp)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return str(model), "model.safetensors", "truncated"


def _garbage_header_model(tmp):
    model = _model_copy(tmp)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json at all, a broken header......}")
    return str(model), "model.safetensors", "corrupt safetensors header"


def _bad_config_model(tmp):
    model = _model_copy(tmp)
    (model / "config.json").write_text("{\"model_type\": ")
    return str(model), "config.json", "not valid JSON"


def _no_tokenizer_model(tmp):
    model = _model_copy(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    return str(model), "has no tokenizer"


def _no_config_model(tmp):
    model = _model_copy(tmp)
    (model / "config.json").unlink()
    return str(model), "without config.json"


def _missing_shard_model(tmp):
    model = _model_copy(tmp)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    return str(model), "model-00002.safetensors"


def _data(tmp, lines, name="data.jsonl"):
    return write_lines(tmp / name, lines)


def _non_utf8(tmp):
    path = tmp / "latin1.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path.write_bytes(good.encode() + b"\n" + '{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1")
                     + b"\n")
    return str(path), "latin1.jsonl:2:", "UTF-8"


def _malformed(tmp):
    return _data(tmp, ['{"messages": []}', '{"messages": []}', '{"messages": [}']), "data.jsonl:3:", "malformed JSON"


def _empty(tmp):
    (tmp / "empty.jsonl").write_text("")
    return str(tmp / "empty.jsonl"), "empty.jsonl", "is empty"


def _array_line(tmp):
    return _data(tmp, ['{"messages": []}', '[1, 2]']), "data.jsonl:2:", "JSON object"


def _wrong_columns(tmp):
    return _data(tmp, ['{"question": "q", "answer": "a"}']), "'messages'", "question"


def _chat_for_dpo(tmp):
    return str(SFT_DATA / "train.jsonl"), "train.jsonl", "preference data", "messages"


def _folder_without_split(tmp):
    folder = tmp / "only_train"
    folder.mkdir()
    shutil.copy(SFT_DATA / "train.jsonl", folder / "train.jsonl")
    return str(folder), "no split 'test'", "train"


def _yaml(tmp, text):
    path = tmp / "run.yaml"
    path.write_text(text)
    return str(path)


def _a_file(tmp):
    path = tmp / "not_a_folder"
    path.write_text("x")
    return str(path)


def _incomplete_checkpoint(tmp):
    ckpt = tmp / "out" / "sft_ws1" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    (ckpt / "optimizer.pt").write_bytes(b"")  # cut short: no scheduler, no state, no marker
    return str(ckpt)


def _checkpoint_without_beta(tmp):
    ckpt = tmp / "ckpt" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        (ckpt / name).write_text("x")
    (ckpt / "opensloth_checkpoint.json").write_text(json.dumps({"step": 2}))
    return str(ckpt)


def _prepared_folder(tmp):
    folder = tmp / "prepared"
    folder.mkdir()
    (folder / "cache_metadata.json").write_text(json.dumps({"source": {"dataset": "data/preference"}}))
    return str(folder)


# --------------------------------------------------------------------------- the battery

SFT, DPO, PRE = "train_configurable", "train_dpo", "precompute_dataset"
FAST = ["--backend", "hf"]

# (id, script, argv builder (tmp -> (argv, needles)), extra environment)
CASES = [
    # numbers and choices (settings dataclasses, argparse)
    ("lr_negative", SFT, lambda t: ([*FAST, "--learning_rate", "-1"], ["--learning_rate -1.0", "> 0"]), {}),
    ("lr_not_a_number", SFT, lambda t: ([*FAST, "--learning_rate", "abc"], ["--learning_rate", "'abc'"]), {}),
    ("max_steps_zero", SFT, lambda t: ([*FAST, "--max_steps", "0"], ["--max_steps 0", "-1"]), {}),
    ("max_steps_negative", SFT, lambda t: ([*FAST, "--max_steps", "-5"], ["--max_steps -5"]), {}),
    ("epochs_zero", SFT, lambda t: ([*FAST, "--num_epochs", "0"], ["--num_epochs 0"]), {}),
    ("grad_accum_zero", SFT, lambda t: ([*FAST, "--grad_accum", "0"], ["--grad_accum 0"]), {}),
    ("batch_zero", SFT, lambda t: ([*FAST, "--per_device_batch_size", "0"], ["--per_device_batch_size 0"]), {}),
    ("global_batch_indivisible", SFT,
     lambda t: ([*FAST, "--global_batch_size", "7", "--grad_accum", "2"], ["--global_batch_size 7", "multiple of 2"]),
     {}),
    ("seq_len_tiny", SFT, lambda t: ([*FAST, "--max_seq_length", "4"], ["--max_seq_length 4"]), {}),
    ("backend_unknown", SFT, lambda t: (["--backend", "tensorflow"], ["--backend", "tensorflow"]), {}),
    ("cache_builder_unknown", SFT, lambda t: ([*FAST, "--cache_builder", "node"], ["--cache_builder", "node"]), {}),
    ("flag_unknown", SFT, lambda t: ([*FAST, "--lerning_rate", "1"], ["unrecognized arguments", "--lerning_rate"]),
     {}),
    # YAML
    ("yaml_not_a_number", SFT, lambda t: (["--config", _yaml(t, "learning_rate: abc\n"), *FAST],
                                          ["run.yaml", "learning_rate", "not a number"]), {}),
    ("yaml_unknown_key", SFT, lambda t: (["--config", _yaml(t, "lerning_rate: 1e-4\n"), *FAST],
                                         ["run.yaml", "lerning_rate"]), {}),
    ("yaml_syntax", SFT, lambda t: (["--config", _yaml(t, "max_steps: [1\n"), *FAST], ["run.yaml", "not valid YAML"]),
     {}),
    ("yaml_missing", SFT, lambda t: (["--config", str(t / "nope.yaml"), *FAST], ["nope.yaml", "does not exist"]), {}),
    ("yaml_bad_dpo_section", DPO, lambda t: (["--config", _yaml(t, "dynamic_beta:\n  alpha: abc\n"), *FAST],
                                             ["run.yaml", "dynamic_beta.alpha"]), {}),
    # the model
    ("model_missing", SFT, lambda t: ([*FAST, "--model_name", "./no/such/model"], ["./no/such/model",
                                                                                  "does not exist"]), {}),
    ("model_typo", SFT, lambda t: ([*FAST, "--model_name", "data/tiny-qwen"], ["data/tiny-qwen'",
                                                                              "did you mean data/tiny-qwen3"]), {}),
    ("model_no_config", SFT, lambda t: ((lambda m: ([*FAST, "--model_name", m[0]], [m[1]]))(_no_config_model(t))),
     {}),
    ("model_truncated", SFT, lambda t: ((lambda m: ([*FAST, "--model_name", m[0]], list(m[1:])))(_truncated_model(t))),
     {}),
    ("model_corrupt_header", SFT,
     lambda t: ((lambda m: ([*FAST, "--model_name", m[0]], list(m[1:])))(_garbage_header_model(t))), {}),
    ("model_config_not_json", SFT,
     lambda t: ((lambda m: ([*FAST, "--model_name", m[0]], list(m[1:])))(_bad_config_model(t))), {}),
    ("model_no_tokenizer", SFT,
     lambda t: ((lambda m: ([*FAST, "--model_name", m[0]], [m[1]]))(_no_tokenizer_model(t))), {}),
    ("model_missing_shard", DPO,
     lambda t: ((lambda m: ([*FAST, "--model_name", m[0]], [m[1]]))(_missing_shard_model(t))), {}),
    # the data
    ("data_typo", SFT, lambda t: ([*FAST, "--dataset", "data/sftt"], ["data/sftt", "did you mean data/sft"]), {}),
    ("data_missing_file", SFT, lambda t: ([*FAST, "--dataset", "./no_such_data.jsonl"], ["no_such_data.jsonl"]), {}),
    ("data_not_utf8", SFT, lambda t: ((lambda d: ([*FAST, "--dataset", d[0]], list(d[1:])))(_non_utf8(t))), {}),
    ("data_malformed_json", SFT, lambda t: ((lambda d: ([*FAST, "--dataset", d[0]], list(d[1:])))(_malformed(t))), {}),
    ("data_empty_file", SFT, lambda t: ((lambda d: ([*FAST, "--dataset", d[0]], list(d[1:])))(_empty(t))), {}),
    ("data_line_not_object", SFT,
     lambda t: ((lambda d: ([*FAST, "--dataset", d[0]], list(d[1:])))(_array_line(t))), {}),
    ("data_wrong_columns", SFT,
     lambda t: ((lambda d: ([*FAST, "--dataset", d[0]], list(d[1:])))(_wrong_columns(t))), {}),
    ("data_missing_eval_split", SFT,
     lambda t: ((lambda d: ([*FAST, "--dataset", d[0], "--test_samples", "4"], list(d[1:])))(_folder_without_split(t))),
     {}),
    ("dpo_data_is_chat", DPO, lambda t: ((lambda d: ([*FAST, "--dataset", d[0]], list(d[1:])))(_chat_for_dpo(t))), {}),
    ("dpo_data_is_tokenized", DPO, lambda t: ([*FAST, "--dataset", _prepared_folder(t)], ["already tokenized"]), {}),
    ("prepared_path_missing", SFT, lambda t: ([*FAST, "--skip_prepare", "--prepared_dataset_path", str(t / "none")],
                                              ["--prepared_dataset_path", "not usable"]), {}),
    # the output folder and checkpoints
    ("output_dir_is_a_file", SFT, lambda t: ([*FAST, "--output_dir", _a_file(t)], ["--output_dir", "is a file"]), {}),
    ("resume_last_nothing", SFT, lambda t: ([*FAST, "--output_dir", str(t / "out"), "--resume_from_checkpoint", "last"],
                                            ["--resume_from_checkpoint last", "no complete checkpoint"]), {}),
    ("resume_incomplete", SFT,
     lambda t: ([*FAST, "--output_dir", str(t / "out"), "--resume_from_checkpoint", _incomplete_checkpoint(t)],
                ["checkpoint-4", "incomplete", "scheduler.pt"]), {}),
    ("resume_last_only_partial", SFT,
     lambda t: (_incomplete_checkpoint(t) and [*FAST, "--output_dir", str(t / "out"), "--resume_from_checkpoint", "last"],
                ["only checkpoint-4, without opensloth_checkpoint.json"]), {}),
    ("resume_not_a_folder", DPO, lambda t: ([*FAST, "--resume_from_checkpoint", str(t / "gone")], ["is not a folder"]),
     {}),
    ("resume_dpo_without_beta_state", DPO,
     lambda t: ([*FAST, "--output_dir", str(t / "out"), "--resume_from_checkpoint", _checkpoint_without_beta(t)],
                ["dynamic_beta_state.json"]), {}),
    # DPO settings
    ("dpo_lr_zero", DPO, lambda t: ([*FAST, "--learning_rate", "0"], ["learning_rate=0.0", "> 0"]), {}),
    ("dpo_beta_negative", DPO, lambda t: ([*FAST, "--beta_mode", "fixed", "--beta", "-1"], ["beta=-1.0"]), {}),
    # the launch environment
    ("env_not_integer", SFT, lambda t: (FAST, ["WORLD_SIZE", "not an integer"]), {"WORLD_SIZE": "two", "RANK": "0"}),
    ("accelerate_started_one", SFT, lambda t: (FAST, ["accelerate launch", "--multi_gpu"]),
     {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_DYNAMO_BACKEND": "NO"}),
    # precompute_dataset.py
    ("pre_data_missing", PRE, lambda t: (["--name", "x", "--output_root", str(t), "--dataset", "./nope.jsonl"],
                                         ["nope.jsonl", "does not exist"]), {}),
    ("pre_data_not_utf8", PRE,
     lambda t: ((lambda d: (["--name", "x", "--output_root", str(t), "--dataset", d[0]], list(d[1:])))(_non_utf8(t))),
     {}),
    ("pre_seq_len_tiny", PRE, lambda t: (["--name", "x", "--output_root", str(t), "--max_seq_length", "4"],
                                         ["--max_seq_length 4"]), {}),
    ("pre_model_missing", PRE, lambda t: (["--name", "x", "--output_root", str(t), "--model_name", "./no_model"],
                                          ["./no_model"]), {}),
    ("pre_pref_columns", PRE, lambda t: (["--name", "x", "--output_root", str(t), "--format", "preference",
                                          "--dataset", str(SFT_DATA)], ["train.jsonl", "preference data"]), {}),
    ("pre_output_root_file", PRE, lambda t: (["--name", "x", "--output_root", _a_file(t)], ["--output_root",
                                                                                          "is a file"]), {}),
    ("pre_flag_abbreviated", PRE, lambda t: (["--name", "x", "--output_root", str(t), "--max_seq_len", "9"],
                                             ["unrecognized arguments", "--max_seq_len"]), {}),
    ("pre_samples_zero", PRE, lambda t: (["--name", "x", "--output_root", str(t), "--train_samples", "0"],
                                         ["--train_samples 0"]), {}),
]


@pytest.fixture
def quiet_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(REPO)


def assert_one_error_line(code: int, err: str, needles, exit_code: int = 2) -> str:
    assert code == exit_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, tmp_path, capsys, monkeypatch, quiet_env):
    from opensloth.errors import run_cli

    _, script, build, env = case
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv, needles = build(tmp_path)
    code = run_cli(_script(script).main, ["--output_dir", str(tmp_path / "runs"), *argv] if script != PRE
                   and "--output_dir" not in argv else argv)
    assert_one_error_line(code, capsys.readouterr().err, needles)


def test_the_battery_is_big_enough():
    assert len(CASES) >= 30


def test_read_only_and_full_output_folder(tmp_path, capsys, monkeypatch, quiet_env):
    """A read-only folder and a disk without room for one checkpoint (both simulated: tests may run as root)."""
    import errno

    import opensloth.preflight as preflight
    from opensloth.errors import run_cli

    main = _script(SFT).main
    out = tmp_path / "out"

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(preflight, "open", read_only, raising=False)  # only the write probe opens for writing
    monkeypatch.setattr(preflight, "check_model_folder", lambda folder, weights=True: [])
    code = run_cli(main, [*FAST, "--output_dir", str(out)])
    assert_one_error_line(code, capsys.readouterr().err, ["--output_dir", "cannot write", "Read-only file system"])
    monkeypatch.undo()

    need = preflight.checkpoint_bytes(str(TINY_MODEL), [str(TINY_MODEL / "model.safetensors")], 8,
                                      ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert 14_336 * 12 < need < 14_336 * 12 + 16 * 2**20  # 14,336 LoRA parameters (the trainer's own count)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    code = run_cli(main, [*FAST, "--output_dir", str(out)])
    assert_one_error_line(code, capsys.readouterr().err, ["only 1000 B free", "checkpoint of this run needs"])


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, quiet_env):
    from opensloth.errors import run_cli

    code = run_cli(_script(SFT).main, [*FAST, "--learning_rate", "-1", "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --learning_rate")


# --------------------------------------------------------------------------- ranks: torchrun and accelerate


def _torchrun_one_line(proc, *needles) -> str:
    """Under torchrun: one ``error:`` line (rank 0), no traceback of ours, and torchrun's summary names it."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    ours = [line for line in out.splitlines() if line.startswith("error")]
    assert len(ours) == 1 and ours[0].startswith("error: "), out[-4000:]
    for needle in needles:
        assert needle in ours[0], ours[0]
    # The only traceback is torchrun's own (ChildFailedError); its root cause is our line, from the error file.
    tracebacks = out.count("Traceback (most recent call last)")
    assert tracebacks <= 1 and "ChildFailedError" in out, out[-4000:]
    assert f"traceback : {ours[0]}" in out, out[-3000:]
    return ours[0]


@pytest.mark.slow
def test_torchrun_two_ranks_print_one_line(tmp_path):
    """A settings error and a pre-flight error (found by rank 0, shared): one line, printed by rank 0."""
    script = str(SCRIPTS / "train_configurable.py")
    settings = run(torchrun_cmd(2, script, *FAST, "--learning_rate", "-1"), timeout=300)
    _torchrun_one_line(settings, "--learning_rate -1.0")
    bad = _non_utf8(tmp_path)[0]
    shared = run(torchrun_cmd(2, script, *FAST, "--dataset", bad, "--output_dir", str(tmp_path / "o")), timeout=300)
    _torchrun_one_line(shared, "latin1.jsonl:2:", "UTF-8")


@pytest.mark.slow
def test_accelerate_launch_without_multi_gpu_is_refused(tmp_path):
    """``accelerate launch --num_processes 2`` starts one process on this machine: refused in one line.

    accelerate then raises its own CalledProcessError (exit 1); with ``--quiet`` it only exits 1.
    """
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    proc = run([accelerate, "launch", "--quiet", "--num_processes", "2", str(SCRIPTS / "train_configurable.py"),
                *FAST, "--output_dir", str(tmp_path)], timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "--multi_gpu --num_processes N" in lines[0], proc.stderr[-3000:]
    assert not os.listdir(tmp_path)
