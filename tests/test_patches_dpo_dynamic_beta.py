"""Dynamic beta inside TRL's DPOTrainer, in process (transformers + PEFT backend, float32, CPU).

- With alpha = 0 the patched trainer reproduces stock TRL's per-step losses.
- With a large alpha the loss changes from the first step after the update,
  and the recorded margins match TRL's own ``rewards/margins`` metric.
- The reference is the base model: no second set of base weights, no 'ref'
  adapter copy for a fresh LoRA adapter.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
from helpers import PREF_DATA, TINY_MODEL

pytestmark = pytest.mark.slow

MODEL = str(TINY_MODEL)
DATA = str(PREF_DATA / "train.jsonl")
MAX_LEN = 96
STEPS = 4

if not (os.path.isdir(MODEL) and os.path.isfile(DATA)):
    pytest.skip("embedded tiny model / preference data missing (scripts/build_tiny_model.py, make_sample_data.py)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def env():
    """trl imported, CPU log-prob router in place, short pairs that need no truncation."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from opensloth.patches.ddp import ddp_patch

    ddp_patch()
    tok = AutoTokenizer.from_pretrained(MODEL)
    ds = load_dataset("json", data_files=DATA, split="train")

    def fits(ex):
        longest = max(len(tok(ex["prompt"] + ex["chosen"])["input_ids"]),
                      len(tok(ex["prompt"] + ex["rejected"])["input_ids"]))
        return longest + 1 <= MAX_LEN  # +1: the EOS TRL appends

    short = ds.select(range(200)).filter(fits)
    assert len(short) >= 16
    return SimpleNamespace(dataset=short.select(range(16)))


def _model():
    from opensloth.launch import load_model_and_tokenizer

    return load_model_and_tokenizer(MODEL, backend="hf", max_seq_length=MAX_LEN, device="cpu", seed=0,
                                    dtype="float32", gradient_checkpointing=False)


def _config(out_dir, **overrides):
    """One DPOConfig for every run here; the pairs are short, so no truncation happens anywhere."""
    from trl import DPOConfig

    kw = dict(output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=1,
              max_steps=STEPS, logging_steps=1, learning_rate=2e-2, lr_scheduler_type="constant",
              report_to=[], save_strategy="no", bf16=False, seed=0, data_seed=0, beta=0.1,
              max_length=MAX_LEN, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True)
    kw.update(overrides)
    return DPOConfig(**kw)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def stock_run(env, tmp_path_factory):
    """Stock TRL, untouched: its own collator and its 'ref' adapter copy."""
    import trl

    from opensloth.patches.dpo_dynamic_beta import LOSS_PATCH
    from opensloth.patches.registry import is_patched

    assert not is_patched(trl.DPOTrainer._compute_loss, LOSS_PATCH)
    model, tok = _model()
    trainer = trl.DPOTrainer(model=model, args=_config(tmp_path_factory.mktemp("stock")),
                             train_dataset=env.dataset, processing_class=tok)
    assert "ref" in trainer.model.peft_config  # what TRL does with an already-wrapped PeftModel
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def patched_cls(stock_run):
    import trl

    from opensloth.patches.dpo_dynamic_beta import LOSS_PATCH, RESUME_PATCH, patch_dpo_trainer_dynamic_beta
    from opensloth.patches.registry import unpatch

    cls = patch_dpo_trainer_dynamic_beta()
    yield cls
    unpatch(trl.DPOTrainer, "_compute_loss", LOSS_PATCH)
    unpatch(trl.DPOTrainer, "train", RESUME_PATCH)


def _dynamic_run(cls, env, out_dir, **dyn):
    from opensloth.dpo.controller import DynamicBetaConfig
    from opensloth.dpo.lora_reference import use_base_model_as_reference
    from opensloth.dpo.run import build_dpo_trainer
    from opensloth.patches.dpo_dynamic_beta import attach_dynamic_beta

    model, tok = _model()
    trainer = build_dpo_trainer(cls, model, tok, env.dataset, None, _config(out_dir), left_truncate_to=MAX_LEN)
    assert use_base_model_as_reference(trainer) == "deleted_ref_adapter"
    runtime = attach_dynamic_beta(trainer, DynamicBetaConfig(**dyn))
    trainer.train()
    records = [json.loads(line) for line in open(runtime.margins_log_path)]
    return trainer, runtime, [r for r in records if r["type"] == "step"]


def test_patch_is_recorded_idempotent_and_targets_the_class_in_use(patched_cls):
    import trl

    from opensloth.patches.dpo_dynamic_beta import LOSS_PATCH, RESUME_PATCH, patch_dpo_trainer_dynamic_beta
    from opensloth.patches import applied_patches
    from opensloth.patches.registry import is_patched

    assert patched_cls is trl.DPOTrainer
    names = [p.name for p in applied_patches()]
    assert LOSS_PATCH in names and RESUME_PATCH in names
    first = trl.DPOTrainer._compute_loss
    assert patch_dpo_trainer_dynamic_beta() is trl.DPOTrainer
    assert trl.DPOTrainer._compute_loss is first  # no double wrap
    assert not is_patched(first.__wrapped__, LOSS_PATCH)


def test_alpha_zero_reproduces_stock_trl_losses(stock_run, patched_cls, env, tmp_path):
    trainer, runtime, steps = _dynamic_run(patched_cls, env, tmp_path, alpha=0.0, warmup_steps=1)
    stock = _losses(stock_run)
    assert len(stock) == STEPS and _losses(trainer) == pytest.approx(stock, abs=1e-6)
    assert [r["beta_used"] for r in steps] == [0.1] * STEPS
    assert [r["margins"]["n"] for r in steps] == [4] * STEPS
    # TRL's own metric: rewards/margins = mean(beta * M) over the batch
    trl_margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert [0.1 * r["margins"]["mean"] for r in steps] == pytest.approx(trl_margins, rel=1e-4, abs=1e-7)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("dynamic_beta/beta" in h and "dynamic_beta/margin_p90" in h for h in logged)
    assert "dynamic_beta/tau" in logged[-1] and "dynamic_beta/p_hat" in logged[-1]


def test_large_alpha_changes_beta_and_the_loss_from_the_next_step(stock_run, patched_cls, env, tmp_path):
    _, runtime, steps = _dynamic_run(patched_cls, env, tmp_path, alpha=2.0, warmup_steps=1, risk_rule="zscore")
    stock = _losses(stock_run)
    betas = [r["beta_used"] for r in steps]
    # beta of step t is fixed before it; warmup ends after step 0, the first update lands at step 2
    assert betas[:2] == [0.1, 0.1] and betas[2] != 0.1
    losses = _losses(runtime.trainer)
    assert losses[:2] == pytest.approx(stock[:2], abs=1e-6)
    assert losses[2] != pytest.approx(stock[2], abs=1e-6)


def test_precomputed_reference_log_probs(patched_cls, env, tmp_path):
    from opensloth.dpo.controller import DynamicBetaConfig
    from opensloth.dpo.run import build_dpo_trainer
    from opensloth.patches.dpo_dynamic_beta import attach_dynamic_beta

    model, tok = _model()
    trainer = build_dpo_trainer(patched_cls, model, tok, env.dataset, None,
                                _config(tmp_path, precompute_ref_log_probs=True, max_steps=2))
    runtime = attach_dynamic_beta(trainer, DynamicBetaConfig(warmup_steps=1, alpha=1.0, risk_rule="zscore"))
    trainer.train()  # the loss check inside the patch compares margins with TRL's loss every step
    assert runtime.controller.step == 2


def test_reference_is_the_base_model_without_a_second_copy(patched_cls, env, tmp_path):
    from transformers import AutoModelForCausalLM

    from opensloth.dpo.lora_reference import parameter_report, use_base_model_as_reference
    from opensloth.dpo.run import build_dpo_trainer

    bare = parameter_report(AutoModelForCausalLM.from_pretrained(MODEL, dtype="float32"))
    base_config = _config(tmp_path)
    before = base_config.to_dict()

    model, tok = _model()
    trainer = build_dpo_trainer(patched_cls, model, tok, env.dataset, None, base_config)
    assert trainer.args is not base_config and base_config.to_dict() == before  # own copy, caller's intact
    with_ref = parameter_report(trainer)
    assert with_ref["lora_ref"] == with_ref["lora_default"] > 0 and with_ref["ref_model"] == 0
    assert use_base_model_as_reference(trainer) == "deleted_ref_adapter"
    report = parameter_report(trainer)
    assert "ref" not in trainer.model.peft_config and trainer.ref_model is None
    assert report["lora_ref"] == 0 and report["base"] == bare["total"]
    assert report["storage_elements"] == bare["storage_elements"] + report["lora_default"]

    # A pretrained adapter keeps TRL's frozen 'ref' copy (the right reference), still no base copy.
    import torch

    model, tok = _model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    trainer = build_dpo_trainer(patched_cls, model, tok, env.dataset, None, base_config)
    assert use_base_model_as_reference(trainer) == "kept_ref_adapter"
    report = parameter_report(trainer)
    assert report["lora_ref"] == report["lora_default"]
    assert report["storage_elements"] == bare["storage_elements"] + 2 * report["lora_default"]


def test_full_finetune_with_a_separate_frozen_reference(patched_cls, env, tmp_path):
    """Every weight trains against a frozen ref_model: the margins come from both models' passes (the loss check
    inside the patch compares them with TRL's loss every step), the reference never moves, and alpha 0 gives the
    losses of a fixed-beta run."""
    import torch

    from opensloth.dpo.controller import DynamicBetaConfig
    from opensloth.dpo.run import build_dpo_trainer
    from opensloth.launch import load_frozen_model, load_model_and_tokenizer
    from opensloth.patches.dpo_dynamic_beta import attach_dynamic_beta

    def run(out, **dyn):
        model, tok = load_model_and_tokenizer(MODEL, backend="hf", max_seq_length=MAX_LEN, device="cpu", seed=0,
                                              dtype="float32", gradient_checkpointing=False, full_finetune=True)
        assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())
        ref = load_frozen_model(MODEL, device="cpu", dtype="float32", backend="hf")
        before = {k: v.clone() for k, v in ref.state_dict().items()}
        trainer = build_dpo_trainer(patched_cls, model, tok, env.dataset, None, _config(out, learning_rate=1e-3),
                                    left_truncate_to=MAX_LEN, ref_model=ref)
        runtime = attach_dynamic_beta(trainer, DynamicBetaConfig(warmup_steps=1, **dyn)) if dyn else None
        trainer.train()
        assert all(torch.equal(before[k], v) for k, v in trainer.ref_model.state_dict().items())
        moved = any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), trainer.ref_model.parameters()))
        return trainer, runtime, moved

    fixed, _, moved = run(tmp_path / "fixed")
    zero, runtime, _ = run(tmp_path / "zero", alpha=0.0)
    assert moved and runtime.controller.step == STEPS
    assert _losses(zero) == pytest.approx(_losses(fixed), abs=1e-6)
    _, moving, _ = run(tmp_path / "moving", alpha=2.0, risk_rule="zscore")
    assert moving.beta != 0.1


def test_attach_refuses_unpatched_classes_and_other_losses(patched_cls, env, tmp_path):
    from opensloth.dpo.controller import DynamicBetaConfig
    from opensloth.dpo.run import build_dpo_trainer
    from opensloth.patches.dpo_dynamic_beta import attach_dynamic_beta

    model, tok = _model()
    trainer = build_dpo_trainer(patched_cls, model, tok, env.dataset, None, _config(tmp_path))
    fake = SimpleNamespace(**{k: getattr(trainer, k) for k in ("args", "accelerator")})
    with pytest.raises(RuntimeError, match="not patched"):
        attach_dynamic_beta(fake, DynamicBetaConfig())
    trainer.loss_types = ["ipo"]
    with pytest.raises(ValueError, match="sigmoid"):
        attach_dynamic_beta(trainer, DynamicBetaConfig())


def _fake_runtime(tmp_path):
    from opensloth.dpo.controller import DynamicBetaConfig
    from opensloth.patches.dpo_dynamic_beta import DynamicBetaRuntime

    trainer = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True),
                              _metrics={"train": defaultdict(list)})
    return DynamicBetaRuntime(trainer, DynamicBetaConfig(warmup_steps=1), str(tmp_path / "m.jsonl"))


def test_ranks_that_disagree_stop_training(tmp_path, monkeypatch):
    import opensloth.patches.dpo_dynamic_beta as dist_utils  # the module that calls the gather

    runtime = _fake_runtime(tmp_path)
    runtime.pending = [0.1, 0.2]
    good = runtime.controller.digest()
    bad = (good[0], good[1], good[2] + 1e-12, good[3], good[4])
    monkeypatch.setattr(dist_utils, "all_gather_object_list",
                        lambda obj: [obj, {"digest": bad, "margins": [0.3]}])
    with pytest.raises(RuntimeError, match="differs across ranks"):
        runtime.end_step(1)

    monkeypatch.setattr(dist_utils, "all_gather_object_list",
                        lambda obj: [obj, {"digest": obj["digest"], "margins": [0.3, float("nan")]}])
    runtime.pending = [0.1, 0.2]
    records = runtime.end_step(1)
    assert records[-1]["margins"]["n"] == 3 and records[-1]["n_nonfinite"] == 1  # rank order: 0.1, 0.2, 0.3
    assert runtime.trainer._metrics["train"]["dynamic_beta/beta"] == [0.1]


def test_checkpoint_state_is_atomic_and_required_on_resume(tmp_path):
    runtime = _fake_runtime(tmp_path)
    runtime.controller.observe_step([0.5, 1.0])
    path = runtime.save(str(tmp_path / "checkpoint-1"))
    assert json.load(open(path))["step"] == 1
    assert not [p for p in os.listdir(tmp_path / "checkpoint-1") if ".tmp" in p]
    other = _fake_runtime(tmp_path)
    other.load_checkpoint(str(tmp_path / "checkpoint-1"))
    assert other.controller.state_dict() == runtime.controller.state_dict()
    with pytest.raises(FileNotFoundError, match="dynamic-beta"):
        other.load_checkpoint(str(tmp_path))


def test_loss_check_catches_margins_that_do_not_reproduce_the_loss():
    import torch

    from opensloth.patches.dpo_dynamic_beta import check_loss_matches

    loss = (-torch.nn.functional.logsigmoid(0.1 * torch.tensor([0.5, -1.0, 2.0]))).mean()
    check_loss_matches(loss, [0.5, -1.0, 2.0], 0.1, 1.0)
    with pytest.raises(RuntimeError, match="do not reproduce"):
        check_loss_matches(loss, [-0.5, 1.0, -2.0], 0.1, 1.0)  # e.g. chosen/rejected swapped
    with pytest.raises(RuntimeError, match="do not reproduce"):
        check_loss_matches(loss, [0.5, -1.0, 2.0], 0.2, 1.0)  # a different beta
    check_loss_matches(torch.tensor(float("nan")), [float("nan")], 0.1, 1.0)  # non-finite: left to the controller


def test_resume_forgets_the_records_of_steps_it_redoes(tmp_path):
    """Resuming in the run dir of a run that got to step 5 from checkpoint-3: steps 4-5 are logged once, anew."""
    runtime = _fake_runtime(tmp_path)
    for step in range(5):
        runtime.controller.observe_step([0.5, 1.0])
        if step == 2:
            runtime.save(str(tmp_path / "checkpoint-3"))
    runtime.margins_log_path = str(tmp_path / "margins.jsonl")
    with open(runtime.margins_log_path, "w") as fh:
        for step in range(1, 6):
            fh.write(json.dumps({"type": "step", "global_step": step}) + "\n")
        fh.write("not json: kept as it is\n")
    resumed = _fake_runtime(tmp_path)
    resumed.margins_log_path = runtime.margins_log_path
    resumed.load_checkpoint(str(tmp_path / "checkpoint-3"))
    resumed.close()
    lines = open(runtime.margins_log_path).read().splitlines()
    assert [json.loads(line).get("global_step") for line in lines[:3]] == [1, 2, 3]
    assert lines[3] == "not json: kept as it is"
    assert json.loads(lines[4])["type"] == "resume" and json.loads(lines[4])["step"] == 3 and len(lines) == 5
