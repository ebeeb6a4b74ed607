"""The get_batch_samples patch: the swap, the changed batches, the unchanged loss and gradient.

In-process tests use one rank on the tiny model (float32, one thread). The
distributed test runs two gloo ranks under torchrun for a whole epoch (with
accelerate's end-of-epoch wrap-around) in three layouts, and compares every
step's all-reduced gradient with the gradient of the same samples computed in
one process: the mean token loss over the step's window.
"""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import SFT_DATA, TINY_MODEL, run, torchrun_cmd

from opensloth.patches import applied_patches
from opensloth.patches.batch_samples import (
    PATCH_NAME,
    _sample_sequences,
    patch_optimize_sft_trainer_batch_samples,
    settings_for,
    unpatch_optimize_sft_trainer_batch_samples,
)
from opensloth.patches.registry import PatchTargetError, is_patched


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def data():
    from datasets import load_dataset

    return load_dataset("json", data_files=str(SFT_DATA / "train.jsonl"), split="train")


@pytest.fixture
def patched():
    import trl

    already = is_patched(trl.SFTTrainer.__dict__.get("get_batch_samples"), PATCH_NAME)
    patch_optimize_sft_trainer_batch_samples()
    yield trl.SFTTrainer
    if not already:  # leave a patch someone else applied in place
        unpatch_optimize_sft_trainer_batch_samples()


def _trainer(tmp_path, tok, data, n, batch, accum, **overrides):
    import trl
    from transformers import AutoModelForCausalLM

    from opensloth.patches.trl_cpu_logprobs import patch_trl_cpu_logprobs

    patch_trl_cpu_logprobs()  # TRL's fused LM head needs Triton otherwise
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    args = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        num_train_epochs=1, learning_rate=0.0, max_length=256, seed=0, data_seed=0, report_to="none",
        save_strategy="no", bf16=False, gradient_checkpointing=False, disable_tqdm=True, logging_steps=1,
        use_cpu=True,
    )
    args.update(overrides)
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**args), train_dataset=data.select(range(n)),
                          processing_class=tok)


def _sequences(batch, pad_token_id: int = 0) -> list[tuple[int, ...]]:
    """Token sequences of a micro-batch (padded rows, or packed rows split at position 0)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return [tuple(ids[r][mask[r] != 0].tolist()) for r in range(ids.shape[0])]
    out = []
    for r in range(ids.shape[0]):
        pos = batch["position_ids"][r]
        starts = (pos == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        segments = [ids[r, a:b] for a, b in zip(starts[:-1], starts[1:])]
        out += [tuple(x.tolist()) for x in segments if bool((x != pad_token_id).any())]  # drop padding tails
    return out


# ---------------------------------------------------------------------------
# The swap
# ---------------------------------------------------------------------------


def test_patch_swaps_the_class_in_use_once_and_unpatches(monkeypatch):
    import trl

    # Unsloth rebinds trl.SFTTrainer to a subclass; the patch must land on what is bound at call time.
    original_cls = trl.SFTTrainer
    base_entry = original_cls.__dict__.get("get_batch_samples")
    sub = type("SFTTrainerAsRebound", (original_cls,), {})
    monkeypatch.setattr(trl, "SFTTrainer", sub)
    before = sub.get_batch_samples
    assert patch_optimize_sft_trainer_batch_samples() is sub
    try:
        assert is_patched(sub.__dict__["get_batch_samples"], PATCH_NAME)
        assert original_cls.__dict__.get("get_batch_samples") is base_entry  # the base class is untouched
        assert PATCH_NAME in [p.name for p in applied_patches()]
        swapped = sub.__dict__["get_batch_samples"]
        patch_optimize_sft_trainer_batch_samples(layout="padded")  # again: settings only, no double wrap
        assert sub.__dict__["get_batch_samples"] is swapped
        assert swapped.__wrapped__ is before
    finally:
        assert unpatch_optimize_sft_trainer_batch_samples(sub)
    assert sub.get_batch_samples is before
    assert PATCH_NAME not in [p.name for p in applied_patches()]


def test_patch_refuses_a_target_without_get_batch_samples():
    with pytest.raises(PatchTargetError, match="get_batch_samples"):
        patch_optimize_sft_trainer_batch_samples(trainer_cls=type("NotATrainer", (), {}))
    with pytest.raises(ValueError, match="layout"):
        patch_optimize_sft_trainer_batch_samples(layout="diagonal")


# ---------------------------------------------------------------------------
# Changed behaviour, same step
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["varlen", "rows4d", "padded"])
def test_patched_step_has_the_same_samples_loss_and_token_count(tmp_path, tok, data, patched, layout):
    trainer = _trainer(tmp_path, tok, data, 12, batch=2, accum=3)
    trainer._opensloth_packing_settings = settings_for(trainer, layout=layout)
    loader = trainer.get_train_dataloader()
    trainer.callback_handler.train_dataloader = loader
    stock, stock_items = patched.get_batch_samples.__wrapped__(trainer, iter(loader), 3, trainer.args.device)
    ours, our_items = trainer.get_batch_samples(iter(loader), 3, trainer.args.device)

    assert len(ours) == 3
    assert int(our_items) == int(stock_items)
    stock_seqs = collections.Counter(s for b in stock for s in _sequences(b))
    our_seqs = collections.Counter(s for b in ours for s in _sequences(b))
    assert our_seqs == stock_seqs
    stock_pad = sum(int((b["attention_mask"] == 0).sum()) for b in stock)
    if layout == "varlen":
        assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in ours)
        assert all(b["cu_seq_lens_q"][-1] == b["input_ids"].shape[1] for b in ours)
        assert stock_pad > 0  # the stock step pads, the packed one does not
    elif layout == "rows4d":
        assert all(b["attention_mask"].dim() == 4 for b in ours)
    else:
        ours_pad = sum(int((b["attention_mask"] == 0).sum()) for b in ours)
        assert ours_pad <= stock_pad

    # Same loss: the micro-batch losses, each divided by the step's token count, add up the same.
    trainer.model.eval()
    with torch.no_grad():
        stock_loss = sum(float(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=stock_items))
                         for b in stock)
        our_loss = sum(float(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=our_items))
                       for b in ours)
    assert our_loss == pytest.approx(stock_loss, rel=1e-5)


def test_one_epoch_uses_every_sample_once_with_full_step_counts(tmp_path, tok, data, patched):
    # 11 samples, batch 2, accum 2: 6 micro-batches -> steps of 2, 2, 2 micro-batches (last one short).
    trainer = _trainer(tmp_path, tok, data, 11, batch=2, accum=2)
    passes = []
    original_step = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None, *a, **k):
        passes.append(int(inputs["input_ids"].numel()))
        return original_step(model, inputs, num_items_in_batch, *a, **k)

    trainer.training_step = counting_step
    trainer.train()
    stats = trainer._opensloth_packing_stats
    assert trainer.state.global_step == 3 and stats.steps == 3
    assert len(passes) == 6
    assert sorted(i for w in stats.history for i in w) == list(range(11))
    assert stats.slowest_rank_cost <= stats.drawn_slowest_rank_cost


def test_collator_output_the_patch_cannot_pack_is_refused():
    def collator(rows):
        return {"input_ids": torch.tensor([rows[0]["input_ids"]]), "pixel_values": torch.zeros(1, 3)}

    with pytest.raises(ValueError, match="pixel_values"):
        _sample_sequences(collator, {"input_ids": [1, 2, 3]}, 0)


def test_iterable_dataset_is_refused(tmp_path, tok, data, patched):
    trainer = _trainer(tmp_path, tok, data, 8, batch=2, accum=1)
    trainer.callback_handler.train_dataloader = [{"input_ids": torch.ones(1, 3, dtype=torch.long)}]
    with pytest.raises(TypeError, match="--no_patches"):
        trainer.get_batch_samples(iter([]), 1, trainer.args.device)


# ---------------------------------------------------------------------------
# Two gloo ranks vs one process
# ---------------------------------------------------------------------------


def _reference_grads(rows, window):
    """Gradient of (sum of token NLL over the window's samples) / (their target count), in one process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    model.train()
    total, count = 0.0, 0
    for i in window:  # duplicates (accelerate's wrap-around) count twice, as in the stock step
        ids, labels = (torch.tensor(x) for x in rows[i])
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
        target = labels[1:]
        keep = target != -100
        total = total + torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    return {n: p.grad for n, p in model.named_parameters()}, count


@pytest.mark.slow
def test_two_ranks_balanced_gradient_equals_one_process(tmp_path):
    layouts = ["varlen", "padded", "rows4d"]
    proc = run(torchrun_cmd(2, "tests/packing_ddp_worker.py", str(tmp_path), *layouts), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for layout in layouts:
        steps0, steps1 = ranks[0][layout]["steps"], ranks[1][layout]["steps"]
        rows = ranks[0][layout]["rows"]
        assert len(steps0) == len(steps1) == 2  # ceil(3 micro-batches per rank / accum 2)
        # The last window holds accelerate's wrap-around duplicate: 11 samples fill 12 slots.
        assert len(steps0[1]["window"]) == 4 and len(set(steps0[0]["window"] + steps0[1]["window"])) == 11
        for s0, s1 in zip(steps0, steps1):
            assert s0["window"] == s1["window"]
            assert s0["passes"] == s1["passes"]  # same number of forward/backward passes on every rank
            window_seqs = collections.Counter(tuple(rows[i][0]) for i in s0["window"])
            assert collections.Counter(s0["seqs"] + s1["seqs"]) == window_seqs  # no sample lost or repeated
            ref, count = _reference_grads(rows, s0["window"])
            assert s0["num_items"] == count == s1["num_items"]
            scale = max(float(g.abs().max()) for g in ref.values())
            for name, g in ref.items():
                assert torch.allclose(s0["grads"][name], s1["grads"][name])
                err = float((s0["grads"][name] - g).abs().max())
                assert err < 1e-4 * scale, f"{layout} {name}: {err:.2e} vs scale {scale:.2e}"


# ---------------------------------------------------------------------------
# Debug preview
# ---------------------------------------------------------------------------


def test_debug_preview_shows_targets_masks_and_boundaries(tmp_path, tok, data, patched):
    from opensloth.debug.dataloader_preview import debug_chat_dataloader_for_training
    from opensloth.packing import pack

    trainer = _trainer(tmp_path, tok, data, 8, batch=2, accum=2)
    # No attention term in the cost model: short samples then always share rows, so the page has boundaries
    # whatever the lengths of the shipped data.
    trainer._opensloth_packing_settings = settings_for(trainer, layout="rows4d", attention_coef=0.0)
    path = debug_chat_dataloader_for_training(trainer, tok, 2, out_dir=tmp_path / ".log")
    page = path.read_text()
    assert path.parent == tmp_path / ".log"
    assert page.count("<h2>micro-batch") == 2
    assert "4D block-causal mask" in page and 'class="boundary">seq 1<' in page
    assert 'tok trained' in page and 'tok masked' in page
    assert not hasattr(trainer, "_opensloth_packing_stats")  # the preview leaves train() untouched

    padded = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
              "labels": torch.tensor([[-100, 6, 7, -100], [-100, 9, -100, -100]])}
    varlen = pack({"input_ids": [[5, 6, 7], [8, 9]]}, 8, attention="varlen")
    page = debug_chat_dataloader_for_training([padded, varlen], tok, 2, out_dir=tmp_path, filename="b.html").read_text()
    assert "padded rows" in page and "padding-free (varlen) row" in page
    assert 'tok pad' in page
    with pytest.raises(ValueError, match="no batch"):
        debug_chat_dataloader_for_training([], tok, out_dir=tmp_path)


# ---------------------------------------------------------------------------
# layout="auto"
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device, fast, impl, varlen_kernel, expected", [
    ("cpu", True, "sdpa", None, "varlen"),  # CPU: unchanged
    ("cpu", False, "sdpa", None, "varlen"),
    ("cpu", False, "eager", None, "rows4d"),
    ("cpu", True, "eager", None, "varlen"),
    ("cuda", True, "sdpa", False, "padded"),  # run 1 (H200, torch 2.11): SDPA, no flash-attn / xformers
    ("cuda", True, "sdpa", None, "padded"),
    ("cuda", True, "sdpa", True, "varlen"),
    ("cuda", False, "sdpa", None, "padded"),
    ("cuda", False, "eager", None, "padded"),
    ("cuda", False, "flash_attention_2", None, "varlen"),
    ("cuda", False, "flash_attention_3", None, "varlen"),
])
def test_auto_layout_decision(device, fast, impl, varlen_kernel, expected):
    from opensloth.patches.batch_samples import choose_layout

    layout, reason = choose_layout("auto", device_type=device, fast_forward=fast, attn_implementation=impl,
                                   varlen_kernel=varlen_kernel)
    assert layout == expected and reason
    assert choose_layout("varlen", device_type=device, fast_forward=fast, attn_implementation=impl,
                         varlen_kernel=varlen_kernel) == ("varlen", "configured")


def _stub_model(device: str, fast: bool, impl: str = "sdpa"):
    from types import SimpleNamespace

    def forward(self, *args, **kwargs):
        return None

    if fast:
        forward.__module__ = "unsloth.models.llama"
    cls = type("StubModel", (), {"forward": forward,
                                 "parameters": lambda self: iter([SimpleNamespace(device=torch.device(device))])})
    model = cls()
    model.config = SimpleNamespace(_attn_implementation=impl)
    return model


@pytest.mark.parametrize("flash, xformers, torch_varlen, expected", [
    (False, False, None, "padded"), (True, False, None, "varlen"), (False, True, None, "varlen"),
    (False, False, object(), "varlen"),
])
def test_auto_layout_reads_unsloths_attention_flags(monkeypatch, flash, xformers, torch_varlen, expected):
    import sys
    from types import SimpleNamespace

    from opensloth.patches.batch_samples import auto_layout_for, unsloth_varlen_kernel

    monkeypatch.setitem(sys.modules, "unsloth.models._utils", SimpleNamespace(HAS_FLASH_ATTENTION=flash))
    monkeypatch.setitem(sys.modules, "unsloth.utils.attention_dispatch",
                        SimpleNamespace(HAS_XFORMERS=xformers, _TORCH_VARLEN_ATTN=torch_varlen))
    assert unsloth_varlen_kernel() is (expected == "varlen")
    assert auto_layout_for(_stub_model("cuda", fast=True))[0] == expected
    assert auto_layout_for(_stub_model("cpu", fast=True))[0] == "varlen"  # CPU ignores the flags
    monkeypatch.delitem(sys.modules, "unsloth.models._utils")
    monkeypatch.delitem(sys.modules, "unsloth.utils.attention_dispatch")
    assert unsloth_varlen_kernel() is None
    assert auto_layout_for(_stub_model("cuda", fast=True))[0] == "padded"  # unknown: no packed rows on CUDA


def test_auto_layout_on_cpu_is_unchanged_and_logged_once(tmp_path, tok, data, patched, caplog):
    import logging

    from opensloth.log import get_logger
    from opensloth.patches import batch_samples

    batch_samples._LAYOUT_LOGGED.clear()
    logger = get_logger()
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    try:
        for _ in range(2):
            trainer = _trainer(tmp_path, tok, data, 8, batch=2, accum=2, max_steps=1)
            trainer.train()
            assert trainer._opensloth_packing_stats.layout == "varlen"  # tiny model: sdpa on CPU
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "batch repacking layout" in r.getMessage()]
    assert len(lines) == 1 and "varlen" in lines[0] and "cpu" in lines[0], lines


def test_right_padded_rows_need_no_mask_under_causal_attention():
    """layout='padded' on Unsloth's fast forward (which drops attention_mask while training) is exact."""
    from transformers import AutoModelForCausalLM

    from opensloth.packing import build_micro_batch

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 500, (n,), generator=g) for n in (37, 12, 25)]
    batch, segments = build_micro_batch([(s, s.clone()) for s in seqs], [[0], [1], [2]], layout="padded")
    assert batch["input_ids"].shape == (3, 37) and (batch["input_ids"][1, 12:] == 0).all()  # right padding
    assert (batch["labels"][1, 12:] == -100).all()  # pads train nothing
    with torch.no_grad():
        masked = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        unmasked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = [model(input_ids=s[None]).logits[0] for s in seqs]
    for seg in segments:
        real = slice(seg.start, seg.start + seg.length)
        ref = alone[seg.source]
        assert torch.allclose(masked[seg.row, real], ref, atol=1e-4)
        assert torch.allclose(unmasked[seg.row, real], ref, atol=1e-4)
    # The check can fail: left padding without a mask changes the real tokens' logits.
    left = torch.cat([torch.zeros(12, dtype=torch.long), seqs[2]])[None]
    with torch.no_grad():
        shifted = model(input_ids=left, position_ids=torch.arange(37)[None]).logits[0, 12:]
    assert not torch.allclose(shifted, alone[2], atol=1e-2)
