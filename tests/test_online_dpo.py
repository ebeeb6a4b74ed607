"""The OaK-DPO loop: layout and resume markers, settings, the SFT reference, and the loop end to end.

End to end (``@pytest.mark.slow``), on the embedded tiny model with a LoRA
"SFT" adapter (random, so the merge is not a no-op), the transformers + PEFT
backend and a scripted judge (``tests/oak_scripted_judge.py``):

1. ``torchrun --nproc_per_node=2`` of the loop, ``--samples 2 --iterations 1
   --limit 8``: manifest, pair counts, checkpoint layout;
2. one process, ``--iterations 2`` with a judge returning non-numeric scores:
   one ``error:`` line, exit 2, iteration 1 untouched;
3. the same launch with a sane judge: resumes at iteration 2 from iteration 1's adapter;
4. ``--iterations 3`` with a judge that ties every candidate: no pairs, one
   ``error:`` line, iterations 1-2 untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from helpers import HAS_UNSLOTH, REPO, SFT_DATA, TINY_MODEL, clean_env, pythonpath, torchrun_cmd

from opensloth.errors import UserInputError
from opensloth.online_dpo import layout
from opensloth.distributed import DistEnv

SCRIPT = str(REPO / "train_scripts" / "run_oak_dpo.py")
CONFIG = str(REPO / "examples" / "config_oak_dpo.yaml")
ONE_PROCESS = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)

# --------------------------------------------------------------------------- layout and resume markers


def test_markers_define_the_completed_iterations_and_partials_are_cleared(tmp_path):
    out = str(tmp_path)
    assert layout.completed_iterations(out) == [] and layout.next_iteration(out) == 1
    for k in (1, 2, 4):  # 3 missing: 4 does not count
        os.makedirs(layout.dpo_dir(out, k))
        layout.write_marker(out, k, {"eval": None})
    assert layout.completed_iterations(out) == [1, 2] and layout.next_iteration(out) == 3
    assert os.listdir(layout.dpo_dir(out, 1)) == [layout.MARKER]  # no temporary file left behind
    assert layout.dpo_dir(out, 3) == os.path.join(out, "dpo", "iter_3")
    os.makedirs(os.path.join(layout.dpo_dir(out, 3), "logs"))
    os.makedirs(layout.rollout_dir(out, 3))
    assert sorted(layout.clear_partial(out, 3)) == sorted([layout.dpo_dir(out, 3), layout.rollout_dir(out, 3)])
    with pytest.raises(ValueError, match="complete"):
        layout.clear_partial(out, 2)
    with open(layout.marker_path(out, 2), "w") as fh:
        json.dump({"iteration": 7}, fh)
    with pytest.raises(ValueError, match="records iteration 7"):
        layout.read_marker(out, 2)


# --------------------------------------------------------------------------- settings


def _write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_config_sections_flags_and_fresh_copies_per_iteration(tmp_path):
    from opensloth.online_dpo.config import iteration_settings, prompt_window, resolve_oak_config

    cfg_path = _write_yaml(tmp_path / "c.yaml", "beta_mode: fixed\nlearning_rate: 0.002\nrollout:\n  samples: 3\n"
                                                  "  temperature: 0.7\nlora:\n  r: 4\n  target_modules: [q_proj]\n"
                                                  "oak:\n  nll_weight: 0.5\ndynamic_beta:\n  warmup_steps: 2\n")
    # --samples (a shortcut of --rollout.samples) 5 and two more flags override the YAML
    given = {"rollout__samples": 5, "rollout__max_new_tokens": 9, "dpo__learning_rate": 0.01}
    cfg = resolve_oak_config(cfg_path, given)
    assert (cfg.rollout.samples, cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (5, 0.7, 9)
    assert cfg.dpo.learning_rate == 0.01 and cfg.dpo.beta_mode == "fixed" and cfg.dynamic.warmup_steps == 2
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ("q_proj",) and cfg.nll_weight == 0.5
    first = iteration_settings(cfg.dpo, iteration=1, reference_path="ref", pairs_path="p1", output="o")
    second = iteration_settings(cfg.dpo, iteration=2, reference_path="ref", pairs_path="p2", output="o")
    assert first is not cfg.dpo and (first.dataset, second.dataset) == ("p1", "p2")
    assert cfg.dpo.dataset == "data/preference" and cfg.dpo.model_name == "data/tiny-qwen3"  # base untouched
    assert (second.output_dir, second.experiment_name, second.save_steps) == (os.path.join("o", "dpo"), "iter_2", 0)
    pool = [{"index": i} for i in range(5)]
    assert [p["index"] for p in prompt_window(pool, 1, 3)] == [0, 1, 2]
    assert [p["index"] for p in prompt_window(pool, 3, 3)] == [1, 2, 3]
    assert prompt_window(pool, 9, None) == pool


def test_example_config_and_the_script_flags():
    """examples/config_oak_dpo.yaml parses, and the shortcut flags land in their sections."""
    import importlib.util

    from opensloth.online_dpo.config import resolve_oak_config

    spec = importlib.util.spec_from_file_location("run_oak_dpo", REPO / "train_scripts" / "run_oak_dpo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.build_parser().parse_args([
        "--iterations", "1", "--train-data", "p", "--sft-model", "s", "--config", "examples/config_oak_dpo.yaml",
        "--samples", "2", "--backend", "hf", "--beta-mode", "fixed", "--nll_weight", "0.5", "--lora.target_modules",
        "q_proj", "v_proj", "--dpo.learning_rate", "1e-3"])
    cfg = resolve_oak_config(str(REPO / args.config), vars(args))
    assert (cfg.rollout.samples, cfg.dpo.backend, cfg.nll_weight, cfg.dpo.learning_rate) == (2, "hf", 0.5, 1e-3)
    assert cfg.lora.target_modules == ("q_proj", "v_proj") and cfg.lora.r == 8 and cfg.dynamic.warmup_steps == 4


@pytest.mark.parametrize("text, given, message", [
    ("beta_mode: fixed\nlearning_rat: 0.1\n", {}, "unknown keys \\['learning_rat'\\]"),
    ("model_name: x\n", {}, "set by the OaK loop"),
    ("beta_mode: dynamic\noak:\n  nll_weight: 1.0\n", {}, "needs beta_mode fixed"),
    ("beta_mode: fixed\nrollout:\n  temperature: -1\n", {}, "temperature"),
    ("beta_mode: fixed\nlora:\n  rank: 4\n", {}, "unknown keys \\['rank'\\]"),
    ("beta_mode: fixed\n", {"oak__nll_weight": -1.0}, "nll_weight"),
    ("beta_mode: fixed\nlearning_rate: abc\n", {}, "learning_rate: 'abc' is not a number"),
])
def test_config_errors_name_the_key(tmp_path, text, given, message):
    from opensloth.online_dpo.config import resolve_oak_config

    with pytest.raises(UserInputError, match=message):
        resolve_oak_config(_write_yaml(tmp_path / "c.yaml", text), given)


def test_a_resume_with_other_settings_is_refused(tmp_path):
    from opensloth.online_dpo.run_record import check_run_record, differing_keys

    assert differing_keys({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5, "d": 3}, "e": 0}) == ["b.c", "e"]
    out = str(tmp_path)
    check_run_record(out, ONE_PROCESS, {"sft_model": "/m", "config": {"lr": 1}})
    check_run_record(out, ONE_PROCESS, {"sft_model": "/m", "config": {"lr": 1}})
    with pytest.raises(UserInputError, match="config.lr differ"):
        check_run_record(out, ONE_PROCESS, {"sft_model": "/m", "config": {"lr": 2}})


def test_report_rebuilds_the_table_from_markers(tmp_path):
    from opensloth.online_dpo.report import SFT_EVAL, collect_summary, summary_markdown

    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "eval"))
    with open(os.path.join(out, SFT_EVAL), "w") as fh:
        json.dump({"accuracy": 0.5, "n": 10, "sampled_accuracy": 0.52}, fh)
    os.makedirs(layout.dpo_dir(out, 1))
    layout.write_marker(out, 1, {"eval": {"accuracy": 0.9, "n": 10, "sampled_accuracy": 0.6},
                                 "rollout": {"mean_score": 0.51, "pairs": 7, "skipped": {"tie": 3}},
                                 "dpo": {"steps": 2, "final_beta": 0.1}, "seconds": 1.5})
    rows = collect_summary(out)
    assert [(r["iteration"], r["accuracy"], r.get("sampled_accuracy")) for r in rows] == [(0, 0.5, 0.52), (1, 0.9, 0.6)]
    table = summary_markdown(rows)
    assert "| 1 | DPO round 1 | 0.900 (10) | 0.600 | 0.510 | 7 | tie 3 | 2 | 0.1 | 1.5 |" in table


# --------------------------------------------------------------------------- the reference is the SFT policy


def _random_lora_adapter(path, seed: int, base=str(TINY_MODEL)):
    """A LoRA adapter with non-zero B (so it changes the model), saved like train_configurable saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft_adapter"))
    model = _random_lora_adapter(path, seed=1)
    return path, model.eval()


def _logits(model, text="Every wumpus is a yumpus. Max is a wumpus. True or false: Max is a yumpus."):
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(TINY_MODEL))(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def test_lora_sft_is_merged_once_and_adapter_disabled_is_the_sft_policy(sft_adapter, tmp_path):
    import torch

    from opensloth.online_dpo.sft_reference import prepare_reference
    from opensloth.rollout.policy import load_adapter_weights, load_policy

    adapter_dir, sft_model = sft_adapter
    ref = prepare_reference(adapter_dir, str(tmp_path), ONE_PROCESS)
    assert ref["kind"] == "adapter" and ref["path"] == os.path.join(str(tmp_path), "sft_merged")
    stamp = os.path.getmtime(os.path.join(ref["path"], "model.safetensors"))
    assert prepare_reference(adapter_dir, str(tmp_path), ONE_PROCESS)["path"] == ref["path"]
    assert os.path.getmtime(os.path.join(ref["path"], "model.safetensors")) == stamp  # not merged twice

    sft_logits = _logits(sft_model)
    policy, _ = load_policy(ref["path"], adapter=None, backend="hf", device="cpu", seed=0, dtype="float32")
    # merged vs unmerged: float32 re-association of W + BA, measured 1.9e-5 on the pretrained base
    torch.testing.assert_close(_logits(policy), sft_logits, atol=1e-4, rtol=1e-4)  # fresh adapter: SFT itself
    assert not torch.allclose(sft_logits, _logits(_plain_base()), atol=1e-3), "the SFT adapter must change the model"

    # A continued DPO adapter changes the policy; with adapters disabled it is the SFT policy again.
    dpo_dir = str(tmp_path / "dpo_adapter")
    _random_lora_adapter(dpo_dir, seed=2, base=ref["path"])
    load_adapter_weights(policy, dpo_dir)
    assert not torch.allclose(_logits(policy), sft_logits, atol=1e-3)
    with policy.disable_adapter():  # merged SFT weights vs the unmerged SFT adapter: same 1.9e-5 as above
        torch.testing.assert_close(_logits(policy), sft_logits, atol=1e-4, rtol=1e-4)


def _plain_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)).eval()


def test_continued_adapter_trains_against_the_sft_reference_not_trl_ref_copy(sft_adapter, tmp_path):
    from opensloth.dpo.run import DPORunSettings, build_dpo_trainer, dpo_trainer_class, make_dpo_config
    from opensloth.dpo.controller import DynamicBetaConfig
    from opensloth.online_dpo.sft_reference import prepare_reference
    from opensloth.data.preference import pairs_to_dataset
    from opensloth.online_dpo.round import use_sft_as_reference
    from opensloth.rollout.policy import load_policy

    ref = prepare_reference(sft_adapter[0], str(tmp_path), ONE_PROCESS)
    dpo_dir = str(tmp_path / "dpo_adapter")
    _random_lora_adapter(dpo_dir, seed=3, base=ref["path"])
    policy, tok = load_policy(ref["path"], adapter=dpo_dir, backend="hf", device="cpu", seed=0, dtype="float32",
                              gradient_checkpointing=False)
    pairs = [{"prompt": "What is 1 + 1?", "chosen": "Answer: 2", "rejected": "Answer: 3"}] * 2
    settings = DPORunSettings(beta_mode="fixed", max_steps=1, backend="hf", dtype="float32")
    config = make_dpo_config(settings, DynamicBetaConfig(), run_dir=str(tmp_path / "run"), per_device=2,
                             world_size=1, backend="hf", dtype="float32", has_eval=False)
    trainer = build_dpo_trainer(dpo_trainer_class(dynamic=False, backend="hf"), policy, tok,
                                pairs_to_dataset(pairs, as_messages=True), None, config, left_truncate_to=64)
    assert "ref" in policy.peft_config  # TRL's copy of the pretrained adapter: reference = round start
    assert use_sft_as_reference(trainer) == "deleted_ref_adapter_of_continued_policy"
    assert set(policy.peft_config) == {"default"} and policy.active_adapter == "default"
    assert trainer.ref_model is None
    assert trainer.train_dataset[0]["prompt_ids"] == tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"]  # pairs are rendered with the chat template, as the rollout was


# --------------------------------------------------------------------------- the command line


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=600)


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _loop_args(out, sft, *extra):
    return ["--config", CONFIG, "--backend", "hf", "--train-data", str(SFT_DATA), "--limit", "8",
            "--sft-model", sft, "--output", out, "--judge", "oak_scripted_judge:score",
            "--rollout.max_new_tokens", "4", "--dpo.max_seq_length", "64", *extra]


def test_missing_sft_checkpoint_is_one_error_line(tmp_path):
    proc = _run([sys.executable, SCRIPT, "--iterations", "1",
                 *_loop_args(str(tmp_path / "run"), str(tmp_path / "no_such_sft"))])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and "--sft-model" in errors[0] and "does not exist" in errors[0]
    assert "Traceback" not in proc.stderr


def test_empty_rollout_is_one_error_line(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    args = _loop_args(str(tmp_path / "run"), str(TINY_MODEL))
    args[args.index("--train-data") + 1] = str(empty)
    proc = _run([sys.executable, SCRIPT, "--iterations", "1", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and "empty rollout" in errors[0], proc.stderr[-2000:]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_loop_on_two_ranks_then_bad_judges_and_resume(sft_adapter, tmp_path):
    out = str(tmp_path / "run")
    eval_args = ["--eval-data", str(SFT_DATA), "--eval-split", "test", "--eval-limit", "4"]
    judge_path = pythonpath(REPO / "tests")  # the scripted judge

    # 1. two ranks, one iteration
    proc = _run(torchrun_cmd(2, SCRIPT, "--iterations", "1", "--samples", "2",
                             *_loop_args(out, sft_adapter[0], *eval_args)), PYTHONPATH=judge_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    roll = layout.rollout_dir(out, 1)
    manifest = json.load(open(os.path.join(roll, "manifest.json")))
    counts = manifest["counts"]
    assert manifest["world_size"] == 2 and manifest["iteration"] == 1 and manifest["config"]["samples"] == 2
    assert (counts["prompts"], counts["candidates"], counts["prompts_per_rank"]) == (8, 16, [4, 4])
    assert manifest["model"]["reference"] == os.path.join(out, "sft_merged") and manifest["model"]["adapter"] is None
    assert set(manifest["timings"]) >= {"generate_s_per_rank", "judge_s_per_rank", "total_s"}
    pairs = [json.loads(line) for line in open(os.path.join(roll, "pairs.jsonl"))]
    assert counts["pairs"] == len(pairs) >= 1 and counts["pairs"] + sum(counts["skipped"].values()) == 8
    rollouts = [json.loads(line) for line in open(os.path.join(roll, "rollouts.jsonl"))]
    assert [r["index"] for r in rollouts] == list(range(8)) and {r["rank"] for r in rollouts} == {0, 1}
    assert all(c["trace"].startswith(r["prompt_text"]) for r in rollouts for c in r["candidates"])

    run_dir = layout.dpo_dir(out, 1)
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "eval.json",
                 "opensloth_dpo_settings.json", layout.MARKER):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    nested = [root for root, dirs, _ in os.walk(os.path.join(out, "dpo")) for d in dirs
              if d.startswith("iter_") and root != os.path.join(out, "dpo")]
    assert nested == [], f"nested iteration folders: {nested}"
    assert json.load(open(os.path.join(run_dir, "opensloth_dpo_settings.json")))["model_name"] == \
        os.path.join(out, "sft_merged")
    state = json.load(open(os.path.join(run_dir, "trainer_state.json")))
    assert state["global_step"] >= 1
    marker = layout.read_marker(out, 1)
    assert marker["world_size"] == 2 and marker["rollout"]["pairs"] == len(pairs) and marker["eval"]["n"] == 4
    adapter_hash = _sha(os.path.join(run_dir, "adapter_model.safetensors"))

    # 2. a judge returning non-numeric scores: one error line, iteration 1 untouched
    proc = _run([sys.executable, SCRIPT, "--iterations", "2", "--samples", "2",
                 *_loop_args(out, sft_adapter[0], *eval_args)], PYTHONPATH=judge_path, OAK_TEST_JUDGE="garbage")
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and "non-numeric score 'high'" in errors[0], proc.stderr[-2000:]
    assert layout.completed_iterations(out) == [1]
    assert _sha(os.path.join(run_dir, "adapter_model.safetensors")) == adapter_hash

    # 3. resume with a sane judge: iteration 2 continues iteration 1's adapter
    proc = _run([sys.executable, SCRIPT, "--iterations", "2", "--samples", "2",
                 *_loop_args(out, sft_adapter[0], *eval_args)], PYTHONPATH=judge_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming" in proc.stderr and layout.completed_iterations(out) == [1, 2]
    second = json.load(open(os.path.join(layout.rollout_dir(out, 2), "manifest.json")))
    assert second["model"]["adapter"] == run_dir and second["world_size"] == 1
    assert _sha(os.path.join(run_dir, "adapter_model.safetensors")) == adapter_hash
    summary = open(os.path.join(out, "oak_summary.md")).read()
    assert "| 2 | DPO round 2 |" in summary and "| 0 | SFT |" in summary

    # 4. every candidate tied: skips are counted, no pairs is an error, iterations 1-2 untouched
    proc = _run([sys.executable, SCRIPT, "--iterations", "3", "--samples", "2",
                 *_loop_args(out, sft_adapter[0], *eval_args)], PYTHONPATH=judge_path, OAK_TEST_JUDGE="tie")
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and "no preference pairs" in errors[0], proc.stderr[-2000:]
    assert layout.completed_iterations(out) == [1, 2]
    third = json.load(open(os.path.join(layout.rollout_dir(out, 3), "manifest.json")))
    assert third["counts"]["pairs"] == 0 and third["counts"]["skipped"] == {"tie": 8}


def test_rollout_command_line_writes_traces_and_manifest(tmp_path):
    """Backend auto: Unsloth's generation path (inference mode on and off again) when it is installed."""
    out = str(tmp_path / "rollout_output")
    proc = _run([sys.executable, "-m", "opensloth.rollout", "--model", str(TINY_MODEL), "--prompts", str(SFT_DATA),
                 "--split", "test", "--limit", "3", "--samples", "2", "--max_new_tokens", "4", "--backend", "auto",
                 "--judge", "verifier", "--iteration", "5", "--output_dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.load(open(os.path.join(out, "iter_5", "manifest.json")))
    assert manifest["counts"]["prompts"] == 3 and manifest["counts"]["candidates"] == 6
    assert manifest["judge"] == "verifier:auto" and manifest["config"]["max_new_tokens"] == 4
    assert manifest["model"]["backend"] == ("unsloth" if HAS_UNSLOTH else "hf")
    # random weights never answer right: every prompt ties, which is counted, not an error
    assert manifest["counts"]["pairs"] == 0 and manifest["counts"]["skipped"] == {"tie": 3}
    for name in ("rollouts.jsonl", "judged.jsonl", "pairs.jsonl"):
        assert os.path.isfile(os.path.join(out, "iter_5", name))
