"""opensloth.export: a merged adapter is the same model as base + adapter, written atomically."""

from __future__ import annotations

import json
import os

import pytest

from helpers import TINY_MODEL, random_lora_adapter, run

PROBE = "Every wumpus is a yumpus. Max is a wumpus. True or false: Max is a yumpus."


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return random_lora_adapter(str(tmp_path_factory.mktemp("adapter")))


def _logits(model):
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(TINY_MODEL))(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def _base_plus_adapter(adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


# bf16 rounds each weight to 2^-8 relative; through 4 layers of the pretrained base (0.25-std embeddings)
# the largest logit moves by up to 4.7% of itself (measured 0.047; it passed 3e-2 on the earlier base).
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("bfloat16", 6e-2), ("float16", 5e-3)])
def test_merged_logits_equal_base_plus_adapter(adapter, tmp_path, dtype, rtol):
    import torch
    from transformers import AutoModelForCausalLM

    from opensloth.export import MARKER, merge_lora

    out = str(tmp_path / "merged")
    report = merge_lora(adapter, out, dtype=dtype)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    stored = {t.dtype for t in AutoModelForCausalLM.from_pretrained(out).state_dict().values()}
    assert stored == {getattr(torch, dtype)}
    expected = _logits(_base_plus_adapter(adapter))
    # Relative to the largest logit: the export rounds each weight once (bf16: 2^-8).
    diff = (_logits(merged) - expected).abs().max().item() / expected.abs().max().item()
    assert diff < rtol, f"{dtype}: merged model is {diff:.3g} (relative) away from base + adapter"
    # The adapter really changes the model, so the comparison above is not vacuous.
    assert (expected - _logits(AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)))).abs().max() > 1.0
    assert json.load(open(os.path.join(out, MARKER)))["dtype"] == dtype == report["dtype"]
    assert report["max_abs_logit_diff_float32"] < 1e-3
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n], "temporary folder left behind"


def test_existing_folder_is_refused_then_overwritten_on_request(adapter, tmp_path):
    from opensloth.errors import UserInputError
    from opensloth.export import merge_lora

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    with pytest.raises(UserInputError, match="already exists"):
        merge_lora(adapter, str(out), dtype="float32")
    assert (out / "keep.txt").read_text() == "someone's file"
    merge_lora(adapter, str(out), dtype="float32", overwrite=True, verify=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_cli_errors_are_one_line(adapter, tmp_path):
    cases = [
        (["-m", "opensloth.export", str(tmp_path / "missing"), str(tmp_path / "o1")], "does not exist"),
        (["-m", "opensloth.export", adapter, str(tmp_path / "o2"), "--dtype", "int3"], "is not one of"),
    ]
    cases += [
        (["-m", "opensloth.export", adapter, str(tmp_path / "o3"), "--base", str(tmp_path / "nobase")],
         "cannot be loaded"),
        (["-m", "opensloth.scripts.lora_save_fp8", str(TINY_MODEL), str(tmp_path / "nolora"), str(tmp_path / "o4")],
         "does not exist"),
    ]
    for args, needle in cases:
        out = next(a for a in args if a.startswith(str(tmp_path / "o")))
        proc = run(["python", *args], timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not os.path.exists(out)


def test_legacy_command_line_exports_fp8_that_transformers_loads(tmp_path):
    """The original's ``lora_save_fp8.py BASE LORA OUTDIR``: fine-grained FP8 that transformers' loader reads.

    The adapter's B ~ N(0, 0.05) is the size a trained adapter reaches here; with the N(0, 0.5) one of the
    other tests the merged weights carry outliers that fp8's 3 mantissa bits round by ~20% of a logit.
    """
    import torch

    adapter = random_lora_adapter(str(tmp_path / "adapter"), scale=0.05)
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    out = tmp_path / "legacy"
    proc = run(["python", "-m", "opensloth.scripts.lora_save_fp8", str(TINY_MODEL), adapter, str(out)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.load(open(out / "config.json"))
    assert config["quantization_config"]["quant_method"] == "fp8"
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        dtypes = {key: fh.get_tensor(key).dtype for key in fh.keys()}
    q_proj = "model.layers.0.self_attn.q_proj"
    assert dtypes[f"{q_proj}.weight"] == torch.float8_e4m3fn and dtypes[f"{q_proj}.weight_scale_inv"] == torch.float32
    assert sum(d == torch.float8_e4m3fn for d in dtypes.values()) == 4 * 7  # every projection of the 4 layers
    loaded = AutoModelForCausalLM.from_pretrained(str(out), quantization_config=FineGrainedFP8Config(dequantize=True))
    expected = _logits(_base_plus_adapter(adapter))
    diff = (_logits(loaded.float()) - expected).abs().max().item() / expected.abs().max().item()
    assert diff < 8e-2, f"fp8 export is {diff:.3g} (relative) away from base + adapter"


def test_fp8_blocks_round_trip():
    import torch

    from opensloth.export import dequantize_fp8_blockwise, quantize_fp8_blockwise

    torch.manual_seed(0)
    w = torch.randn(200, 300) * torch.logspace(-3, 1, 300)  # columns of very different scale
    q, scale = quantize_fp8_blockwise(w)
    assert q.shape == w.shape and q.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    back = dequantize_fp8_blockwise(q, scale)
    # Each block keeps ~3 mantissa bits relative to its own largest entry: error <= 2^-4 of that block max.
    for bi in range(2):
        for bj in range(3):
            block = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            assert (back[block] - w[block]).abs().max() <= w[block].abs().max() * 2 ** -4 + 1e-12
    wrong = q.float() / scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    assert (wrong - w).abs().max() > 1.0, "an inverted scale convention must be detectable"
