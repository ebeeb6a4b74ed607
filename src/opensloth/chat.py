"""Talk to a trained model: a base plus a LoRA adapter, or a merged folder, through its chat template.

    python -m opensloth.chat --model outputs/sft_ws2 --prompt "What is 12 + 7?"      # adapter run dir
    python -m opensloth.chat --model outputs/sft_merged                              # merged folder, interactive
    python -m opensloth.chat --model data/tiny-qwen3 --adapter outputs/sft_ws2 --temperature 0.7 --seed 1
    python -m opensloth.chat --model outputs/sft_ws2 --compare_base --prompt "..."   # answer with and without the adapter

``--model`` may be a LoRA adapter folder (its base is read from
``adapter_config.json``), a full model folder or a hub id already in the local
cache. Without ``--prompt`` it reads one message per line from the terminal
(or a pipe) and answers each; ``/reset`` forgets the conversation (only kept
with ``--history``), ``/exit`` or end of input quits. Greedy decoding unless
``--temperature`` > 0. Runs on CUDA when present, else on CPU; plain
transformers + PEFT, so it needs no Unsloth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from opensloth.config import ArgumentParser
from opensloth.errors import UserInputError, run_cli

ADAPTER_CONFIG = "adapter_config.json"


def resolve_model(model: str, adapter: str | None) -> tuple[str, str | None]:
    """``(base, adapter_or_None)`` from ``--model`` / ``--adapter``; raises UserInputError naming the path."""
    if adapter is None and os.path.isfile(os.path.join(model, ADAPTER_CONFIG)):
        adapter, model = model, None
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
            raise UserInputError(f"--adapter {adapter!r} has no {ADAPTER_CONFIG}; pass a LoRA run directory "
                                 "(e.g. outputs/sft_ws2)")
        if model is None:
            with open(os.path.join(adapter, ADAPTER_CONFIG), encoding="utf-8") as fh:
                model = json.load(fh).get("base_model_name_or_path")
            if not model:
                raise UserInputError(f"{adapter}/{ADAPTER_CONFIG} names no base model; pass --model BASE --adapter "
                                     f"{adapter}")
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UserInputError(f"--model {model!r} holds neither config.json nor {ADAPTER_CONFIG}")
    elif model.startswith((".", "/", "~")) or model.count("/") != 1 or os.path.isdir(model.split("/")[0]):
        # ``data/sftt`` is a typo of a local folder (``data/`` exists), not the hub id of user "data".
        raise UserInputError(f"--model {model!r} does not exist; pass a model folder, a LoRA run directory or a "
                             "hub id in the local cache")
    return model, adapter


class ChatSession:
    """A loaded model and tokenizer that answer messages, optionally keeping the conversation."""

    def __init__(self, model: str, adapter: str | None = None, *, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base, adapter = resolve_model(model, adapter)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}.get(
            dtype, getattr(torch, dtype, None))
        try:
            self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype).to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(adapter if adapter and _has_tokenizer(adapter) else base)
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"could not load --model {base!r}: {first}") from exc
        if adapter is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval()
        self.base, self.adapter, self.device = base, adapter, device
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserInputError(f"the tokenizer of {base!r} has no chat template; chat needs one")

    def reply(self, messages: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
              top_p: float = 1.0, seed: int = 0, use_adapter: bool = True) -> str:
        """Generate the assistant's next turn for ``messages`` (``[{"role", "content"}]``)."""
        import contextlib

        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"].to(self.device)
        stops = _stop_ids(self.model, self.tokenizer)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        off = self.model.disable_adapter() if (self.adapter and not use_adapter) else contextlib.nullcontext()
        torch.manual_seed(seed)
        with torch.no_grad(), off:
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      eos_token_id=stops, pad_token_id=self.tokenizer.pad_token_id, **sampling)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def _stop_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return sorted(ids)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m opensloth.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="LoRA run directory, merged model folder, or base model")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder to put on top of --model")
    p.add_argument("--prompt", action="append", default=None,
                   help="answer this message and exit (repeat the flag for several independent prompts)")
    p.add_argument("--system", default=None, help="system message put before the conversation")
    p.add_argument("--history", action="store_true", help="interactive mode: keep earlier turns in the context")
    p.add_argument("--compare_base", action="store_true", help="also answer with the adapter switched off")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max_new_tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise UserInputError(f"--temperature {args.temperature} must be >= 0")
    if args.compare_base and not (args.adapter or os.path.isfile(os.path.join(args.model, ADAPTER_CONFIG))):
        raise UserInputError("--compare_base needs a LoRA adapter (--model RUN_DIR or --adapter DIR)")
    session = ChatSession(args.model, args.adapter, device=args.device, dtype=args.dtype)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    label = f"{session.base} + {session.adapter}" if session.adapter else session.base

    def answer(messages):
        text = session.reply(messages, **options)
        if args.compare_base:
            print(f"[base] {session.reply(messages, use_adapter=False, **options)}")
            print(f"[tuned] {text}")
        else:
            print(text)
        return text

    if args.prompt:
        for prompt in args.prompt:
            if len(args.prompt) > 1 or args.compare_base:
                print(f">>> {prompt}")
            answer(system + [{"role": "user", "content": prompt}])
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {label} on {session.device}; /reset clears the history, /exit quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        turn = [{"role": "user", "content": line}]
        text = answer(system + (history if args.history else []) + turn)
        if args.history:
            history += turn + [{"role": "assistant", "content": text}]


if __name__ == "__main__":
    sys.exit(run_cli(main))
