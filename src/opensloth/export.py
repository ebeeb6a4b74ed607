"""Merge a trained LoRA adapter into its base model and save a standard Hugging Face model folder.

    python -m opensloth.export outputs/sft_ws2 outputs/sft_merged                 # bf16 (default)
    python -m opensloth.export outputs/sft_ws2 outputs/sft_merged --dtype float16
    python -m opensloth.export outputs/sft_ws2 outputs/sft_fp8 --dtype fp8        # fine-grained FP8 (Qwen/DeepSeek FP8 layout)
    python -m opensloth.export ADAPTER OUT --base data/tiny-qwen3 --verify       # other base, print the logit check

The adapter is merged in float32 (``W + scale * B @ A`` with no rounding in
between) and the merged weights are then cast to the export dtype, so bf16 and
fp16 exports round once. The output folder holds ``config.json``,
``model.safetensors``, the tokenizer (the adapter's copy when the run saved
one, else the base's) and ``opensloth_export.json`` (what was merged, how, and
the verification figures). It is written next to its final path and renamed
into place, so a reader never sees half a model, and an existing folder is
never overwritten unless ``--overwrite`` is given.

fp8: the merged weights of every linear layer except ``lm_head`` are quantised
to float8_e4m3 with one float32 scale per 128 x 128 block and saved in the
fine-grained FP8 layout (``weight`` + ``weight_scale_inv``, ``quant_method: fp8``
in config.json), the layout of Qwen's and DeepSeek's official FP8 checkpoints,
which transformers (``FineGrainedFP8Config``) and vLLM load. The quantisation is
plain torch, so it runs anywhere; the check reloads the folder through
transformers' own FP8 loader (dequantising) and compares logits. Running the
fp8 matmuls needs a GPU of compute capability 8.9+ (Ada, Hopper) with
transformers' fp8 kernels or vLLM; elsewhere transformers dequantises on load.
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

from opensloth.config import ArgumentParser
from opensloth.errors import UserInputError, run_cli

EXPORT_DTYPES = ("bfloat16", "float16", "float32", "fp8", "auto")
MARKER = "opensloth_export.json"
ADAPTER_CONFIG = "adapter_config.json"
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float8": "fp8"}
# Limits on max |logit diff| / max |logit| between the export and base + adapter. Merging in float32
# only re-associates W x + B (A x) (measured ~3e-7 relative on the embedded model); the export then
# rounds every weight once: bf16 keeps 8 mantissa bits (2^-8 = 0.4% per weight, measured 1.4% on
# the logits of the embedded model), fp16 keeps 11, fp8 (e4m3) 3 with one scale per 128 x 128 block
# (up to 6% per weight; measured 2.2% on the logits of the embedded model after an SFT).
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2, "fp8": 8e-2}


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
    """None when this torch can write an fp8 export, else the one-line reason it cannot."""
    import torch

    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn dtype; export --dtype bfloat16 or upgrade torch"
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
            report["fp8_quantized_weights"] = _quantize_fp8_in_place(tmp, merged)
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


FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8_blockwise(weight, block: int = FP8_BLOCK):
    """``(q, scale_inv)``: float8_e4m3fn weights and one float32 scale per ``block x block`` tile.

    ``weight`` is ``(out, in)``; ``scale_inv`` is ``(ceil(out/block), ceil(in/block))`` and
    ``q.float() * scale_inv`` (each scale repeated over its tile) approximates ``weight``.
    """
    import torch

    out_f, in_f = weight.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=weight.device)
    padded[:out_f, :in_f] = weight.float()
    tiles = padded.view(rows, block, cols, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:out_f, :in_f].contiguous(), scale.contiguous()


def dequantize_fp8_blockwise(q, scale_inv, block: int = FP8_BLOCK):
    """The float32 weight that ``(q, scale_inv)`` stands for (inverse of :func:`quantize_fp8_blockwise`)."""
    out_f, in_f = q.shape
    full = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return q.float() * full


def _quantize_fp8_in_place(folder: str, model) -> int:
    """Rewrite the safetensors of ``folder`` with fp8 linear weights; returns how many were quantised."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    linear = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head"}
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path, encoding="utf-8")) if os.path.isfile(index_path) else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    done = 0
    for name in files:
        path = os.path.join(folder, name)
        with safe_open(path, framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
            metadata = fh.metadata()
        out = {}
        for key, tensor in tensors.items():
            if key in linear and tensor.dim() == 2:
                out[key], out[key[: -len("weight")] + "weight_scale_inv"] = quantize_fp8_blockwise(tensor)
                if index:
                    index["weight_map"][key[: -len("weight")] + "weight_scale_inv"] = name
                done += 1
            else:
                out[key] = tensor
        save_file(out, path + ".fp8", metadata=metadata)
        os.replace(path + ".fp8", path)
    if index:
        with open(index_path, "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path, encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                                     "modules_to_not_convert": ["lm_head"]}
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    return done


def _reload_diff(folder: str, probe, reference, dtype: str) -> float:
    """Max |logit diff| between ``folder`` loaded by transformers and ``reference`` on ``probe``."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if dtype == "fp8":
        from transformers import FineGrainedFP8Config

        # transformers' own fp8 loader, dequantising: checks the layout without needing fp8 kernels.
        kwargs["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(probe.device)
    with torch.no_grad():
        return (model(input_ids=probe).logits.float() - reference).abs().max().item()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m opensloth.export", description=__doc__,
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
