"""fp8 / bf16 export of a LoRA adapter on a CUDA GPU: merge, quantise, reload, compare logits.

    python scripts/gpu_export_check.py OUT.json            # GPU: fp8 and bf16 exports
    python scripts/gpu_export_check.py OUT.json --cpu      # CPU: the same two exports, merged on the CPU

Builds a small random Qwen3 (dimensions multiples of 128, as FineGrainedFP8's 128x128 weight blocks
need) with the embedded tokenizer, puts a random LoRA adapter (non-zero B) on all seven projections,
and runs :func:`opensloth.export.merge_lora` for each dtype. Writes the reports as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))


def main() -> int:
    out_json, cpu = sys.argv[1], "--cpu" in sys.argv
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from opensloth.errors import UserInputError
    from opensloth.export import merge_lora

    work = tempfile.mkdtemp(prefix="export_check_")
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=2048, tie_word_embeddings=False)
    base = os.path.join(work, "base")
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(os.path.join(REPO, "data", "tiny-qwen3")).save_pretrained(base)
    model = get_peft_model(Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=16, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = os.path.join(work, "adapter")
    model.save_pretrained(adapter)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__}
    for dtype in ("bfloat16", "fp8"):
        start = time.perf_counter()
        try:
            report = merge_lora(adapter, os.path.join(work, dtype), dtype=dtype,
                                device="cpu" if cpu else "auto")
            files = os.listdir(os.path.join(work, dtype))
            cfg = json.load(open(os.path.join(work, dtype, "config.json")))
            report.update(status="ok", files=sorted(files), quantization_config=cfg.get("quantization_config"),
                          wall_s=round(time.perf_counter() - start, 2))
        except UserInputError as exc:
            report = {"status": "refused", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a report, not a crash: the GPU run must return its figures
            report = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        results[dtype] = report
        print(dtype, json.dumps(report, default=str)[:1500], flush=True)
    with open(out_json, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    ok = all(results[d].get("status") == "ok" for d in ("bfloat16", "fp8"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
