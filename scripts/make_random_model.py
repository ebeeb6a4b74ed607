"""Write a randomly initialised model with a real architecture (no weights download).

    python scripts/make_random_model.py --arch qwen3-0.6b --out /tmp/qwen3-0.6b-random
    python scripts/make_random_model.py --arch qwen3-tiny --out /tmp/qwen3-tiny-random --dtype float32

The tokenizer is the embedded one (data/tiny-qwen3); its ids are a subset of
the model's vocabulary, which is all a throughput check needs.
"""

from __future__ import annotations

import argparse

ARCHS = {
    # Published Qwen3-0.6B config.json values.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # The dimensions of the embedded data/tiny-qwen3 (CPU dry runs of scripts/gpu_check.sh).
    "qwen3-tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=2048, max_position_embeddings=4096,
                       rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen3-0.6b", help="architecture to instantiate")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="data/tiny-qwen3", help="tokenizer to save beside the model")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="saved weight dtype")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where the random weights are drawn (auto: cuda when available); the GPU draws "
                        "Qwen3-0.6B's 0.6B weights in a fraction of the ~30 s a CPU needs")
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**ARCHS[args.arch])
    dtype = getattr(torch, args.dtype)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the saved dtype: half the memory and time for bf16
    try:
        try:
            with torch.device(device):
                model = Qwen3ForCausalLM(config)
        except Exception as exc:  # a GPU init problem must not cost the check its model
            if device == "cpu":
                raise
            print(f"initialising on {device} failed ({type(exc).__name__}: {exc}); drawing on the CPU")
            torch.manual_seed(0)
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to("cpu").save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params -> {args.out}")


if __name__ == "__main__":
    main()
