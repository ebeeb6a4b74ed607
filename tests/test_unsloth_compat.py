"""Unsloth's GPU-path pieces next to opensloth's patches, checked on CPU.

- ``OPENSLOTH_SHARE_DEVICE=1``: the device/backend choice for several ranks on one GPU
  (CUDA faked: the logic, not NCCL/gloo on a device, which scripts/gpu_check.sh runs).
- ``UNSLOTH_TOKEN_BALANCE=1`` plus the batch patch: Unsloth's real ``TokenBalancedSampler``
  (loaded from the installed file) is bypassed with one warning, and the step keeps its samples.
- A trainer built from a class the batch patch did not reach is refused.
- Unsloth's compiled trainer classes (generated on CPU as the GPU path generates them) take
  opensloth's SFT and DPO patches, and Unsloth's own loss-scaling rewrite is recognised.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import textwrap

import pytest
import torch
from helpers import requires_unsloth, run

from opensloth.errors import UserInputError
from opensloth.patches import applied_patches
from opensloth.patches.registry import PatchTargetError
from opensloth.patches.unsloth_compat import (
    TOKEN_BALANCE_BYPASS,
    bypass_unsloth_token_balance,
    check_trainer_patched,
    compiled_cache_digest,
    is_unsloth_token_balanced_sampler,
    unsloth_token_balance_requested,
)
from opensloth.distributed import SHARE_DEVICE_ENV, preferred_backend, share_device_requested


# --- OPENSLOTH_SHARE_DEVICE ---------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False),
                                             ("", False), ("no", False)])
def test_share_device_values(value, expected):
    assert share_device_requested({SHARE_DEVICE_ENV: value}) is expected
    assert share_device_requested({}) is False


def test_share_device_bad_value_names_the_variable():
    with pytest.raises(UserInputError, match=SHARE_DEVICE_ENV):
        share_device_requested({SHARE_DEVICE_ENV: "maybe"})


@pytest.fixture
def one_fake_gpu(monkeypatch):
    """torch.cuda reports one device; set_device records instead of touching a driver."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    monkeypatch.delenv("ACCELERATE_BYPASS_DEVICE_MAP", raising=False)
    return calls


def test_shared_device_puts_rank_1_on_cuda_0_with_gloo(monkeypatch, one_fake_gpu):
    from opensloth.patches.ddp import _pin_device

    monkeypatch.setenv(SHARE_DEVICE_ENV, "1")
    assert preferred_backend() == "gloo"
    assert _pin_device(1) == torch.device("cuda:0")
    assert one_fake_gpu == [0]
    # accelerate must wrap DDP without device_ids=[LOCAL_RANK] (cuda:1 does not exist here).
    assert os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] == "true"


def test_without_the_override_rank_1_needs_a_second_gpu(monkeypatch, one_fake_gpu):
    from opensloth.patches.ddp import _pin_device

    monkeypatch.delenv(SHARE_DEVICE_ENV, raising=False)
    assert preferred_backend() == "nccl"
    assert _pin_device(0) == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=1 but only 1 CUDA device"):
        _pin_device(1)
    assert "ACCELERATE_BYPASS_DEVICE_MAP" not in os.environ


# --- UNSLOTH_TOKEN_BALANCE ---------------------------------------------------------------------

def _unsloth_token_budget_module():
    """Unsloth's utils/token_budget.py, loaded from the installed file without importing Unsloth."""
    spec = importlib.util.find_spec("unsloth")
    path = os.path.join(os.path.dirname(spec.origin), "utils", "token_budget.py")
    mod_spec = importlib.util.spec_from_file_location("unsloth.utils.token_budget", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_token_balance_env_parsed_like_unsloth(value, expected):
    assert unsloth_token_balance_requested({"UNSLOTH_TOKEN_BALANCE": value}) is expected


@pytest.fixture
def forget_bypass():
    from opensloth.patches import registry

    registry._APPLIED.pop(TOKEN_BALANCE_BYPASS, None)
    yield
    registry._APPLIED.pop(TOKEN_BALANCE_BYPASS, None)


@requires_unsloth
def test_unsloth_token_balanced_sampler_is_unwrapped_once_with_a_warning(capfd, forget_bypass):
    tb = _unsloth_token_budget_module()
    inner = torch.utils.data.SequentialSampler(range(16))
    sampler = tb.TokenBalancedSampler(inner, lengths=list(range(1, 17)), batch_size=2, grad_accum=2)
    assert is_unsloth_token_balanced_sampler(sampler)
    assert list(sampler) != list(inner)  # Unsloth's reorder is real, so bypassing it changes the order
    capfd.readouterr()
    assert bypass_unsloth_token_balance(sampler) is inner
    assert bypass_unsloth_token_balance(sampler) is inner
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if "UNSLOTH_TOKEN_BALANCE=1" in ln]
    assert len(warnings) == 1 and "--no_patches" in warnings[0]
    assert TOKEN_BALANCE_BYPASS in [p.name for p in applied_patches()]
    assert bypass_unsloth_token_balance(inner) is inner  # anything else passes through


@requires_unsloth
def test_batch_patch_over_token_balanced_loader_keeps_the_step(tmp_path, forget_bypass):
    """The patched step over a loader Unsloth balanced holds the same samples as the stock step."""
    from datasets import load_dataset
    from test_patches_batch_samples import _sequences, _trainer
    from transformers import AutoTokenizer

    from opensloth.patches.batch_samples import (
        patch_optimize_sft_trainer_batch_samples,
        unpatch_optimize_sft_trainer_batch_samples,
    )

    from helpers import SFT_DATA, TINY_MODEL

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    data = load_dataset("json", data_files=str(SFT_DATA / "train.jsonl"), split="train")
    tb = _unsloth_token_budget_module()
    cls = patch_optimize_sft_trainer_batch_samples()
    try:
        trainer = _trainer(tmp_path, tok, data, 12, batch=2, accum=3)
        loader = trainer.get_train_dataloader()
        stock, stock_items = cls.get_batch_samples.__wrapped__(trainer, iter(loader), 3, trainer.args.device)
        loader = trainer.get_train_dataloader()
        batch_sampler = loader.batch_sampler
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
        batch_sampler.sampler = tb.TokenBalancedSampler(batch_sampler.sampler, lengths, 2, 3)
        trainer.callback_handler.train_dataloader = loader
        ours, our_items = trainer.get_batch_samples(iter(loader), 3, trainer.args.device)
    finally:
        unpatch_optimize_sft_trainer_batch_samples()
    assert int(our_items) == int(stock_items)
    assert (collections.Counter(s for b in ours for s in _sequences(b))
            == collections.Counter(s for b in stock for s in _sequences(b)))
    assert TOKEN_BALANCE_BYPASS in [p.name for p in applied_patches()]


# --- the trainer in use must carry the patch ----------------------------------------------------

def test_trainer_from_a_stale_class_is_refused(monkeypatch):
    import trl

    from opensloth.patches.batch_samples import (
        PATCH_NAME,
        patch_optimize_sft_trainer_batch_samples,
        unpatch_optimize_sft_trainer_batch_samples,
    )

    stock = trl.SFTTrainer
    rebound = type("UnslothSFTTrainer", (stock,), {})  # what `import unsloth` binds on a GPU
    monkeypatch.setattr(trl, "SFTTrainer", rebound)
    patch_optimize_sft_trainer_batch_samples()
    try:
        check_trainer_patched(object.__new__(rebound), "get_batch_samples", PATCH_NAME)
        with pytest.raises(PatchTargetError, match="does not carry it"):
            check_trainer_patched(object.__new__(stock), "get_batch_samples", PATCH_NAME)
    finally:
        unpatch_optimize_sft_trainer_batch_samples(rebound)
    check_trainer_patched(object.__new__(stock), "get_batch_samples", PATCH_NAME)  # patch off: nothing to check


def test_compiled_cache_digest(tmp_path):
    (tmp_path / "A.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("ignored")
    first = compiled_cache_digest(str(tmp_path))
    assert list(first) == ["A.py"]
    (tmp_path / "A.py").write_text("x = 2\n")
    assert compiled_cache_digest(str(tmp_path)) != first
    assert compiled_cache_digest(str(tmp_path / "missing")) == {}


# --- Unsloth's compiled trainers, generated on CPU ----------------------------------------------

COMPILED_CHECK = textwrap.dedent(r"""
    import json, os, sys
    import unsloth  # noqa: F401  (UNSLOTH_ALLOW_CPU=1: the CUDA-shaped import path, no device)
    from unsloth.models import rl
    from unsloth.models._utils import patch_gradient_accumulation_fix
    import trl
    stock_sft, stock_dpo = trl.SFTTrainer, trl.DPOTrainer
    for name in ("sft_trainer", "dpo_trainer"):   # what PatchFastRL does at import on a GPU machine
        rl._patch_trl_rl_trainers_impl(name)
    from transformers import Trainer
    from opensloth.patches.ddp import ddp_patch
    from opensloth.patches.batch_samples import PATCH_NAME, patch_optimize_sft_trainer_batch_samples
    from opensloth.patches.unsloth_compat import check_trainer_patched, compiled_cache_digest, loss_scaling_owner
    from opensloth.patches.dpo_dynamic_beta import LOSS_PATCH, patch_dpo_trainer_dynamic_beta
    from opensloth.patches import applied_patches
    out = {"sft_rebound": trl.SFTTrainer is not stock_sft, "dpo_rebound": trl.DPOTrainer is not stock_dpo}
    ddp_patch()
    out["owner_after_ddp_patch"] = loss_scaling_owner()
    patch_gradient_accumulation_fix(Trainer)        # what FastLanguageModel.from_pretrained runs on a GPU
    out["owner_after_unsloth_fix"] = loss_scaling_owner()
    ddp_patch()
    out["owner_after_second_ddp_patch"] = loss_scaling_owner()
    sft = patch_optimize_sft_trainer_batch_samples()
    dpo = patch_dpo_trainer_dynamic_beta(trl.DPOTrainer)
    out["sft_patched"] = f"{sft.__module__}.{sft.__qualname__}"
    out["dpo_patched"] = f"{dpo.__module__}.{dpo.__qualname__}"
    check_trainer_patched(object.__new__(trl.SFTTrainer), "get_batch_samples", PATCH_NAME)
    try:
        check_trainer_patched(object.__new__(stock_sft), "get_batch_samples", PATCH_NAME)
        out["stale_refused"] = False
    except Exception as exc:
        out["stale_refused"] = type(exc).__name__
    out["patches"] = [p.name for p in applied_patches()]
    out["cache"] = sorted(compiled_cache_digest(os.environ["UNSLOTH_COMPILE_LOCATION"]))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@requires_unsloth
def test_patches_land_on_unsloth_compiled_trainers(tmp_path):
    script = tmp_path / "compiled_check.py"
    script.write_text(COMPILED_CHECK)
    cache = tmp_path / "unsloth_compiled_cache"
    proc = run(["python", str(script)], timeout=600, UNSLOTH_ALLOW_CPU="1", UNSLOTH_COMPILE_LOCATION=str(cache))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])
    assert res["sft_rebound"] and res["dpo_rebound"]
    assert res["sft_patched"] == "UnslothSFTTrainer.UnslothSFTTrainer"
    assert res["dpo_patched"] == "UnslothDPOTrainer.UnslothDPOTrainer"
    assert res["stale_refused"] == "PatchTargetError"
    # Unsloth's from_pretrained replaces Trainer.compute_loss with its own out-of-place copy; a later
    # ddp_patch() wraps it again (the factor is then applied once, by ours).
    assert res["owner_after_ddp_patch"] == "opensloth"
    assert res["owner_after_unsloth_fix"] == "unsloth"
    assert res["owner_after_second_ddp_patch"] == "opensloth"
    assert {"optimize_sft_trainer_batch_samples", "dpo_dynamic_beta_loss"} <= set(res["patches"])
    assert {"UnslothSFTTrainer.py", "UnslothDPOTrainer.py"} <= set(res["cache"])



def test_shared_device_training_args_default_to_gloo(monkeypatch):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from opensloth.patches.ddp import (
        SHARED_DEVICE_PATCH,
        _make_shared_device_post_init,
        patch_training_args_shared_device,
    )
    from opensloth.patches.registry import is_patched, unpatch

    # The swap: on the real class, once, listed.
    assert patch_training_args_shared_device() is True
    try:
        assert patch_training_args_shared_device() is False
        assert is_patched(TrainingArguments.__post_init__, SHARED_DEVICE_PATCH)
        assert SHARED_DEVICE_PATCH in [p.name for p in applied_patches()]
    finally:
        assert unpatch(TrainingArguments, "__post_init__", SHARED_DEVICE_PATCH)
    assert not is_patched(TrainingArguments.__post_init__, SHARED_DEVICE_PATCH)

    # The behaviour (on a stand-in: a real TrainingArguments under WORLD_SIZE=2 would rendezvous).
    post_init = _make_shared_device_post_init(lambda self: "original ran")
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", SHARE_DEVICE_ENV: "1"}.items():
        monkeypatch.setenv(k, v)
    args = SimpleNamespace(ddp_backend=None)
    assert post_init(args) == "original ran" and args.ddp_backend == "gloo"
    explicit = SimpleNamespace(ddp_backend="nccl")
    post_init(explicit)
    assert explicit.ddp_backend == "nccl"  # an explicit choice wins
    monkeypatch.setenv(SHARE_DEVICE_ENV, "0")
    off = SimpleNamespace(ddp_backend=None)
    post_init(off)
    assert off.ddp_backend is None
    monkeypatch.setenv(SHARE_DEVICE_ENV, "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    single = SimpleNamespace(ddp_backend=None)
    post_init(single)
    assert single.ddp_backend is None  # one process: no group, nothing to match


# --- padding-free: explicit in opensloth's SFTConfig --------------------------------------------

def _unsloth_function(relative_path: str, name: str, **module_globals):
    """One top-level function of an installed Unsloth file, compiled alone (Unsloth is not imported)."""
    import ast

    spec = importlib.util.find_spec("unsloth")
    path = os.path.join(os.path.dirname(spec.origin), relative_path)
    with open(path) as fh:
        tree = ast.parse(fh.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = dict(module_globals)
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


def _sft_config_kwargs(monkeypatch, tmp_path, **make_kwargs) -> dict:
    """The keyword arguments make_sft_config hands to SFTConfig (TRL's own default is already False;
    Unsloth's SFTConfig on the GPU path defaults to None, so the argument itself must be there)."""
    from types import SimpleNamespace

    import trl

    from opensloth.sft import SFTSettings, make_sft_config

    seen = {}

    def recording_config(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(**kwargs)

    monkeypatch.setattr(trl, "SFTConfig", recording_config)
    make_sft_config(SFTSettings(), run_dir=str(tmp_path), per_device=8, backend="hf", dtype="float32", **make_kwargs)
    return seen


def test_sft_config_turns_padding_free_off_explicitly(monkeypatch, tmp_path):
    """Run 1 on an H200: Unsloth auto-enabled padding-free on the cache builder only (raw data)."""
    raw = _sft_config_kwargs(monkeypatch, tmp_path, world_size=2, has_eval=False, dataset_kwargs=None)
    tokenized = _sft_config_kwargs(monkeypatch, tmp_path, world_size=2, has_eval=False,
                                   dataset_kwargs={"skip_prepare_dataset": True})
    assert raw["padding_free"] is False and tokenized["padding_free"] is False  # never None ("auto" to Unsloth)
    assert raw["packing"] is False and raw["max_length"] == tokenized["max_length"]


@requires_unsloth
def test_explicit_padding_free_false_stops_unsloths_auto_enable(monkeypatch, tmp_path):
    from types import SimpleNamespace

    should_auto = _unsloth_function("trainer.py", "_should_auto_padding_free", _AUTO_PADDING_FREE_ENV_DISABLED=False)
    kwargs = _sft_config_kwargs(monkeypatch, tmp_path, world_size=1, has_eval=False)
    assert should_auto(SimpleNamespace(**kwargs)) is False
    kwargs.pop("padding_free")  # a config without the argument: Unsloth's SFTConfig leaves it None
    assert should_auto(SimpleNamespace(**kwargs, padding_free=None)) is True


CACHE_ON_UNSLOTH_GPU_PATH = textwrap.dedent(r"""
    import json, os, sys
    import unsloth  # noqa: F401  (UNSLOTH_ALLOW_CPU=1: the CUDA-shaped import path, no device)
    import unsloth.trainer as unsloth_trainer
    from unsloth.models import rl
    rl._patch_trl_rl_trainers_impl("sft_trainer")  # what `import unsloth` does on a GPU machine:
    unsloth_trainer._patch_trl_trainer()  # the compiled SFTTrainer, and the auto padding-free __init__
    import torch, trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from opensloth.data import load_records
    from opensloth.patches.batch_samples import patch_optimize_sft_trainer_batch_samples
    from opensloth.sft import SFTSettings, build_sft_trainer, make_sft_config
    from opensloth.cache import DatasetCacheConfig, DatasetCacheMismatchError, cache_dataset_wrapper, sft_dataset_kwargs
    from opensloth.cache.key import trainer_prepare_args

    tiny, sft, work = sys.argv[1:4]
    patch_optimize_sft_trainer_batch_samples()
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    raw = load_records(sft, "train[:24]").select_columns(["messages"])

    def unset(model, tokenizer, train, val, world_size, settings, *, run_dir, per_device, backend):
        # a config that leaves padding_free None
        config = make_sft_config(settings, run_dir=run_dir, per_device=per_device, world_size=world_size,
                                 backend=backend, dtype="float32", has_eval=False,
                                 dataset_kwargs=sft_dataset_kwargs(train))
        config.padding_free = None
        return trl.SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)

    out = {}
    for name, factory in (("unset", unset), ("opensloth", build_sft_trainer)):
        settings = SFTSettings(max_seq_length=512, max_steps=1)
        where = dict(run_dir=os.path.join(work, name), per_device=8, backend="unsloth")
        wrapped = cache_dataset_wrapper(DatasetCacheConfig(cache_dir=os.path.join(work, "cache_" + name)),
                                        {"max_seq_length": 512})(factory)
        builder = wrapped(model, tok, raw, None, 1, settings, **where)  # tokenizes the raw data, publishes it
        out[name] = {"class": type(builder).__name__, "builder": trainer_prepare_args(builder)}
        try:
            reader = wrapped(model, tok, raw, None, 1, settings, **where)  # the tokenized cache, as another rank reads it
            out[name]["reader"] = trainer_prepare_args(reader)
        except DatasetCacheMismatchError as exc:
            out[name]["error"] = str(exc)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@requires_unsloth
def test_cache_builder_and_readers_agree_on_unsloths_gpu_path(tmp_path):
    """Run 1 on an H200, reproduced on CPU: with padding_free unset, Unsloth's SFTTrainer turned padding-free
    on for the builder (raw data, max_length cleared) and off for the readers (tokenized rows)."""
    from helpers import SFT_DATA, TINY_MODEL

    script = tmp_path / "cache_gpu_path.py"
    script.write_text(CACHE_ON_UNSLOTH_GPU_PATH)
    proc = run(["python", str(script), str(TINY_MODEL), str(SFT_DATA), str(tmp_path)], timeout=600,
               UNSLOTH_ALLOW_CPU="1", UNSLOTH_COMPILE_LOCATION=str(tmp_path / "unsloth_compiled_cache"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])
    unset, ours = res["unset"], res["opensloth"]
    assert unset["class"] == ours["class"] == "UnslothSFTTrainer"
    # Without the explicit flag: the failure of run 1, now named as Unsloth's own rewrite.
    assert unset["builder"]["padding_free"] is True and unset["builder"]["max_length"] is None
    assert "Unsloth's UnslothSFTTrainer rewrote them itself" in unset["error"]
    assert "padding_free: cached True vs now False" in unset["error"]
    # opensloth's config: builder and reader prepared alike, padding-free off on both.
    assert "error" not in ours, ours.get("error")
    assert ours["builder"] == ours["reader"] and ours["builder"]["padding_free"] is False
    assert ours["builder"]["max_length"] == 512
