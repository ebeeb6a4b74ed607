"""The original OpenSloth's ``lora_save_fp8.py`` command line: ``BASE LORA OUTDIR`` (merge, then fp8).

    python -m opensloth.scripts.lora_save_fp8 unsloth/Qwen3-0.6B outputs/sft_ws2 outputs/sft_fp8
    python -m opensloth.scripts.lora_save_fp8 data/tiny-qwen3 outputs/sft_ws2 outputs/sft_bf16 --dtype bfloat16

Same positionals as the original; the work is :func:`opensloth.export.merge_lora`.
The original quantised with llmcompressor's FP8_DYNAMIC scheme; this one uses
transformers' FineGrainedFP8Config (CUDA, compute capability >= 8.9) and says
so in one line elsewhere. ``--dtype`` picks a bf16/fp16 export instead.
"""

from __future__ import annotations

import argparse
import sys

from opensloth.config import ArgumentParser
from opensloth.errors import run_cli
from opensloth.export import EXPORT_DTYPES, merge_lora


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m opensloth.scripts.lora_save_fp8", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="base model folder or hub id")
    p.add_argument("lora", help="LoRA adapter folder")
    p.add_argument("outdir", help="output folder")
    p.add_argument("--dtype", default="fp8", help=f"one of {EXPORT_DTYPES} (default fp8, as the original)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    report = merge_lora(args.lora, args.outdir, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"saved {report['dtype']} merged model to {args.outdir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
