"""opensloth.export: a merged adapter is the same model as base + adapter, written atomically."""

from __future__ import annotations

import json
import os

import pytest

from conftest import TINY_MODEL, run

PROBE = "Every wumpus is a yumpus. Max is a wumpus. True or false: Max is a yumpus."


def _random_adapter(path: str, seed: int = 1) -> str:
    """A LoRA adapter with non-zero B (so merging changes the weights), saved as a training run saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(TINY_MODEL)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return _random_adapter(str(tmp_path_factory.mktemp("adapter")))


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


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("bfloat16", 3e-2), ("float16", 5e-3)])
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
    if not __import__("torch").cuda.is_available():
        cases += [
            (["-m", "opensloth.export", adapter, str(tmp_path / "o3"), "--dtype", "fp8"], "CUDA GPU"),
            # The original OpenSloth's command line: BASE LORA OUTDIR, fp8 by default.
            (["-m", "opensloth.scripts.lora_save_fp8", str(TINY_MODEL), adapter, str(tmp_path / "o4")], "CUDA GPU"),
        ]
    for args, needle in cases:
        out = next(a for a in args if a.startswith(str(tmp_path / "o")))
        proc = run(["python", *args], timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not os.path.exists(out)


def test_legacy_command_line_exports_bf16(adapter, tmp_path):
    out = tmp_path / "legacy"
    proc = run(["python", "-m", "opensloth.scripts.lora_save_fp8", str(TINY_MODEL), adapter, str(out),
                "--dtype", "bfloat16"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
