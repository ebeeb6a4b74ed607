"""Full-weight SFT warm-up of a small model: the SFT policy an OaK-DPO demo starts from.

    python scripts/oak_warmup_sft.py --data outputs/oak_demo/data/sft --max_steps 100 --out outputs/oak_demo/sft

Why not LoRA SFT here: the embedded ``data/tiny-qwen3`` is randomly
initialised with tied embeddings of standard deviation 0.02 and hidden size
64, so its logits cannot exceed about ``0.02 * 8 * 8 = 1.3`` in magnitude
while only the attention projections (the LoRA targets) train. Its next-token
distribution then stays nearly uniform over the 2048-token vocabulary (150
LoRA SFT steps on ProntoQA: entropy 7.61 nats against ln 2048 = 7.62, top
token probability 0.002), so sampled candidates are noise. Training all
weights lets the logits grow; a real pretrained model does not have this
problem and can be SFT-ed with ``train_scripts/train_configurable.py`` (LoRA),
whose adapter the loop then merges.

The loss covers the assistant reply only (TRL prompt/completion format), the
chat template is the tokenizer's, and the result is a plain model folder
(``save_pretrained``) usable as ``--sft-model``. Uses the SFT glue of
:mod:`opensloth.sft` and :func:`opensloth.launch.train_and_save`; runs under
``torchrun`` as well.
"""

from __future__ import annotations

import argparse
import sys

# Light imports only: torch and transformers come after ddp_patch.
from opensloth.data import load_records
from opensloth.errors import UserInputError, run_cli
from opensloth.launch import check_model_source, setup_backend, train_and_save
from opensloth.log import log_rank0
from opensloth.sft import SFTSettings, build_sft_trainer


def to_prompt_completion(ds):
    """Chat ``messages`` (user, assistant) -> TRL's conversational prompt/completion columns."""
    def split(example):
        messages = example["messages"]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise UserInputError("warm-up SFT rows need 'messages' ending with an assistant turn")
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return ds.map(split, remove_columns=ds.column_names, desc="prompt/completion")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="data/tiny-qwen3", help="model folder to fine-tune (all weights)")
    p.add_argument("--data", required=True, help="chat SFT data (folder with train.jsonl, or a file)")
    p.add_argument("--max_steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate (linear decay)")
    p.add_argument("--per_device_batch_size", type=int, default=32, help="sequences per step per rank")
    p.add_argument("--seed", type=int, default=3407, help="seed of the data order")
    p.add_argument("--out", required=True, help="where the fine-tuned model folder is saved")
    args = p.parse_args(argv)

    check_model_source(args.model_name)
    launch = setup_backend("hf")  # full weights: plain transformers, no LoRA

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_name, dtype=torch.float32).to(launch.device)
    train = to_prompt_completion(load_records(args.data, "train"))
    settings = SFTSettings(per_device_batch_size=args.per_device_batch_size, learning_rate=args.learning_rate,
                           max_steps=args.max_steps, logging_steps=10, seed=args.seed, max_seq_length=512,
                           backend="hf", no_gradient_checkpointing=True)
    trainer = build_sft_trainer(model, tokenizer, train, None, launch.world_size, settings, run_dir=args.out,
                                per_device=args.per_device_batch_size, backend="hf")
    train_and_save(trainer, model, tokenizer, args.out)
    log_rank0(f"warm-up SFT: {trainer.state.global_step} steps, model saved to {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
