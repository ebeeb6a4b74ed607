"""Merge a trained LoRA adapter into its base model and save a standard Hugging Face model folder.

    python -m opensloth.export outputs/sft_ws2 outputs/sft_merged                 # bf16 (default)
    python -m opensloth.export outputs/sft_ws2 outputs/sft_merged --dtype float16
    python -m opensloth.export outputs/sft_ws2 outputs/sft_fp8 --dtype fp8        # CUDA, compute capability >= 8.9
    python -m opensloth.export ADAPTER OUT --base data/tiny-qwen3 --verify       # other base, print the logit check

The adapter is merged in float32 (``W + scale * B @ A`` with no rounding in
between) and the merged weights are then cast to the export dtype, so bf16 and
fp16 exports round once. The output folder holds ``config.json``,
``model.safetensors``, the tokenizer (the adapter's copy when the run saved
one, else the base's) and ``opensloth_export.json`` (what was merged, how, and
the verification figures). It is written next to its final path and renamed
into place, so a reader never sees half a model, and an existing folder is
never overwritten unless ``--overwrite`` is given.

fp8: the merged model is quantised with transformers' ``FineGrainedFP8Config``
(float8_e4m3 weights with block scales, ``quant_method: fp8`` in config.json,
loadable by transformers and vLLM). transformers implements that quantisation
for CUDA GPUs of compute capability 8.9 or newer (Ada, Hopper) only; anywhere
else the export stops with one line that says so, before anything is loaded.
The original OpenSloth's ``lora_save_fp8.py`` used llmcompressor instead;
``python -m opensloth.scripts.lora_save_fp8 BASE LORA OUT`` keeps its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from opensloth.errors import UserInputError, run_cli

EXPORT_DTYPES = ("bfloat16", "float16", "float32", "fp8", "auto")
MARKER = "opensloth_export.json"
ADAPTER_CONFIG = "adapter_config.json"
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float8": "fp8"}
# Limits on max |logit diff| / max |logit| between the export and base + adapter. Merging in float32
# only re-associates W x + B (A x) (measured ~3e-7 relative on the embedded model); the export then
# rounds every weight once: bf16 keeps 8 mantissa bits (2^-8 = 0.4% per weight, measured 1.4% on
# the logits of the embedded model), fp16 keeps 11, fp8 (e4m3) 3 with per-block scales.
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2, "fp8": 0.15}


def canonical_dtype(name: str) -> str:
    """``bf16`` -> ``bfloat16`` etc.; raises UserInputError for anything not in :data:`EXPORT_DTYPES`."""
    name = _DTYPE_ALIASES.get(name, name)
    if name not in EXPORT_DTYPES:
        raise UserInputError(f"--dtype {name!r} is not one of {EXPORT_DTYPES} (aliases: {sorted(_DTYPE_ALIASES)})")
    return name


def adapter_base(adapter_dir: str) -> str:
    """The base model an adapter was trained on (``base_model_name_or_path`` of its adapter_config.json).

    Raises UserInputError when ``adapter_dir`` is not a LoRA adapter folder.
    """
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        what = "does not exist" if not os.path.exists(adapter_dir) else f"has no {ADAPTER_CONFIG}"
        raise UserInputError(f"adapter {adapter_dir!r} {what}; pass the run directory of a LoRA training run "
                             "(e.g. outputs/sft_ws2) or a folder written by PeftModel.save_pretrained")
    with open(config_path, encoding="utf-8") as fh:
        base = json.load(fh).get("base_model_name_or_path")
    if not base:
        raise UserInputError(f"{config_path}: base_model_name_or_path is empty; pass --base MODEL")
    return base


def fp8_support() -> str | None:
    """None when this machine can write an fp8 export, else the one-line reason it cannot."""
    import torch

    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn dtype"
    if not torch.cuda.is_available():
        return ("fp8 export quantises with transformers' FineGrainedFP8Config, which needs a CUDA GPU of compute "
                "capability >= 8.9 (Ada/Hopper); this machine has no CUDA device. Export --dtype bfloat16 here "
                "and quantise on the GPU machine")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return (f"fp8 export needs compute capability >= 8.9; {torch.cuda.get_device_name()} has {major}.{minor}. "
                "Export --dtype bfloat16 instead")
    try:
        from transformers import FineGrainedFP8Config  # noqa: F401
    except ImportError:
        import transformers

        return f"transformers {transformers.__version__} has no FineGrainedFP8Config; export --dtype bfloat16"
    return None


def _probe_ids(tokenizer, vocab_size: int):
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                         add_generation_prompt=True) if getattr(tokenizer, "chat_template", None) \
        else "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    return torch.tensor([[i % vocab_size for i in ids]])


def merge_lora(adapter_dir: str, out_dir: str, *, base: str | None = None, dtype: str = "bfloat16",
               overwrite: bool = False, verify: bool = True, device: str = "auto") -> dict:
    """Merge ``adapter_dir`` into its base and save a plain model folder at ``out_dir``.

    Args:
        adapter_dir: a LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        out_dir: the folder to write; refused when it exists, unless ``overwrite``.
        base: the base model (folder or hub id); default: the adapter's ``base_model_name_or_path``.
        dtype: ``bfloat16``, ``float16``, ``float32``, ``fp8`` or ``auto`` (the base's stored dtype).
        verify: compare the merged model's logits with base + adapter on a probe prompt, in float32
            before the cast and again after saving and reloading the export.
        device: where to merge: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

    Returns the report written to ``out_dir/opensloth_export.json``.

    Raises:
        UserInputError: a missing adapter/base, an existing ``out_dir``, an unsupported dtype, an fp8
            export on a machine without fp8 support, or a verification failure.
    """
    dtype = canonical_dtype(dtype)
    if base is None:
        base = adapter_base(adapter_dir)
    elif not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
        adapter_base(adapter_dir)  # raises the one-line error naming the folder
    if os.path.exists(out_dir) and not overwrite:
        raise UserInputError(f"{out_dir!r} already exists; pick another output folder or pass --overwrite")
    if os.path.abspath(out_dir) in (os.path.abspath(adapter_dir), os.path.abspath(base)):
        raise UserInputError(f"output folder {out_dir!r} is the adapter or base folder; pick a new folder")
    if dtype == "fp8":
        reason = fp8_support()
        if reason:
            raise UserInputError(reason)

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    try:
        stored = getattr(AutoConfig.from_pretrained(base), "dtype", None)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"base model {base!r} of adapter {adapter_dir!r} cannot be loaded: {first}. "
                             "Pass --base with a local model folder") from exc
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    has_tokenizer = any(os.path.isfile(os.path.join(adapter_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    peft_model.eval()
    report: dict = {"base": base, "adapter": os.path.abspath(adapter_dir), "dtype": dtype, "device": device}
    probe = _probe_ids(tokenizer, model.config.vocab_size).to(device) if verify else None
    with torch.no_grad():
        reference = peft_model(input_ids=probe).logits.float() if verify else None
        merged = peft_model.merge_and_unload()
        if verify:
            scale = reference.abs().max().item() or 1.0
            report["max_abs_logit"] = scale
            report["max_abs_logit_diff_float32"] = (merged(input_ids=probe).logits.float() - reference).abs().max().item()
    save_dtype = {"auto": stored if isinstance(stored, torch.dtype) else torch.float32, "fp8": torch.bfloat16}.get(
        dtype, getattr(torch, dtype, None))
    merged = merged.to(save_dtype)

    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dtype == "fp8":
            _quantize_fp8_in_place(tmp, device)
        if verify:
            report["max_abs_logit_diff_export"] = _reload_diff(tmp, probe, reference, dtype)
            saved_name = str(save_dtype).removeprefix("torch.") if dtype == "auto" else dtype
            limit = VERIFY_TOLERANCE.get(saved_name, VERIFY_TOLERANCE["float32"])
            report["verify_relative_tolerance"] = limit
            relative = (report["max_abs_logit_diff_float32"] / scale, report["max_abs_logit_diff_export"] / scale)
            if not (relative[0] < VERIFY_TOLERANCE["float32"] and relative[1] < limit):
                raise UserInputError(
                    f"the merged model does not reproduce base + adapter: max |logit diff| / max |logit| = "
                    f"{relative[0]:.3g} merged in float32, {relative[1]:.3g} exported as {saved_name} (limit {limit})")
        report["seconds"] = round(time.perf_counter() - start, 2)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, sort_keys=True)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _quantize_fp8_in_place(folder: str, device: str) -> None:
    """Reload ``folder`` with FineGrainedFP8Config on the GPU and save it back quantised."""
    import torch
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device},
                                                 quantization_config=FineGrainedFP8Config())
    for name in os.listdir(folder):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(folder, name))
    model.save_pretrained(folder)


def _reload_diff(folder: str, probe, reference, dtype: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": {"": str(probe.device)}} if dtype == "fp8" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(probe.device)
    with torch.no_grad():
        return (model(input_ids=probe).logits.float() - reference).abs().max().item()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opensloth.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="LoRA adapter folder (a run directory such as outputs/sft_ws2)")
    p.add_argument("out_dir", help="folder to write the merged model to (must not exist unless --overwrite)")
    p.add_argument("--base", default=None, help="base model folder or hub id (default: the adapter's base)")
    p.add_argument("--dtype", default="bfloat16", help=f"export dtype: one of {EXPORT_DTYPES} (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.add_argument("--no_verify", action="store_true", help="skip the logit comparison with base + adapter")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to merge")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = merge_lora(args.adapter, args.out_dir, base=args.base, dtype=args.dtype, overwrite=args.overwrite,
                        verify=not args.no_verify, device=args.device)
    check = ""
    if "max_abs_logit_diff_export" in report:
        check = (f"; max |logit diff| vs base + adapter: {report['max_abs_logit_diff_float32']:.2g} merged (float32), "
                 f"{report['max_abs_logit_diff_export']:.2g} exported ({report['dtype']}), "
                 f"max |logit| {report['max_abs_logit']:.3g}")
    print(f"merged {args.adapter} into {report['base']} -> {args.out_dir} ({report['dtype']}){check}")
    print(f"next: python -m opensloth.chat --model {args.out_dir} --prompt \"What is 12 + 7?\"")


if __name__ == "__main__":
    sys.exit(run_cli(main))
