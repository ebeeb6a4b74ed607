"""Held-out evaluation of a chat model: loss on test conversations and greedy exact-match.

"Did the SFT teach the model anything?" gets two numbers, computed the same
way before and after training (:func:`evaluate_heldout`):

- ``loss``: mean next-token cross-entropy over every token of the first
  ``n_loss`` chat-templated conversations (what SFT trains on by default),
  token-weighted; ``assistant_loss`` is the same over assistant tokens only.
- ``exact_match``: the share of the first ``n_exact`` held-out prompts
  (optionally of one task kind) whose greedy reply passes the task's verifier
  (:func:`opensloth.tasks.check_answer`). Only records whose first user prompt
  is a known task kind count, so the metric exists for the embedded data and
  for any data built from :mod:`opensloth.tasks`.

Under torchrun every rank scores its share of the records (``rank::world``)
and the sums are gathered, so the result is the same on 1 or N ranks and each
rank does 1/N of the work. No DDP collective runs inside: call it with the
unwrapped (PEFT) model, never the DDP wrapper. Greedy decoding and a fixed
order make it deterministic for a given model, device and batch size. The
model is put in eval mode and its mode restored afterwards.
"""

from __future__ import annotations

import json
import os

from opensloth.distributed import DistEnv, all_gather_object_list, distributed_env
from opensloth.errors import UserInputError
from opensloth.tasks import TASK_KINDS, check_answer, detect_kind

__all__ = ["evaluate_heldout", "exact_match_prompts", "greedy_replies", "heldout_loss_sums",
           "read_heldout_records"]


def read_heldout_records(dataset_path: str, split: str = "test") -> list[dict]:
    """Chat records from ``dataset_path``: a JSONL file, or a folder holding ``<split>.jsonl``.

    Raises:
        UserInputError: the file is missing, or a line is not a record with ``messages``.
    """
    path = os.path.join(dataset_path, f"{split}.jsonl") if os.path.isdir(dataset_path) else dataset_path
    if not os.path.isfile(path):
        raise UserInputError(f"held-out data {path!r} does not exist; pass a .jsonl file or a folder with "
                             f"{split}.jsonl")
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise UserInputError(f"{path}:{line_no}: expected an object with a 'messages' list")
            records.append(record)
    return records


def exact_match_prompts(records: list[dict], task: str | None = None) -> list[tuple[list[dict], str]]:
    """``(messages up to the first user turn, that user prompt)`` of each record of kind ``task``.

    The kind of a record is its first user prompt's kind (``detect_kind``);
    ``task=None`` keeps every record whose kind is recognised.
    """
    out = []
    for record in records:
        messages = record["messages"]
        first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first_user is None:
            continue
        prompt = messages[first_user]["content"]
        try:
            kind = detect_kind(prompt)
        except ValueError:
            continue
        if task is None or kind == task:
            out.append((messages[: first_user + 1], prompt))
    return out


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def heldout_loss_sums(model, tokenizer, conversations: list[list[dict]], *, batch_size: int = 8,
                      max_length: int = 1024) -> dict:
    """Summed cross-entropy over all tokens and over assistant tokens of ``conversations``.

    Each conversation is rendered with the chat template, cut to ``max_length``
    tokens (as SFT truncates) and scored in right-padded batches, so padding
    never counts. Returns ``{"nll", "tokens", "assistant_nll",
    "assistant_tokens", "has_mask"}``; ``has_mask`` is False when the template
    has no ``{% generation %}`` markers (then there is no assistant loss).
    """
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {"nll": 0.0, "tokens": 0, "assistant_nll": 0.0, "assistant_tokens": 0, "has_mask": True}
    device = next(model.parameters()).device
    for batch in _batches(conversations, batch_size):
        encoded = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True) for m in batch]
        ids = [list(e["input_ids"])[:max_length] for e in encoded]
        masks = [list(e.get("assistant_masks") or [])[:max_length] for e in encoded]
        out["has_mask"] = out["has_mask"] and all(any(m) for m in masks)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        assistant = torch.zeros((len(ids), width), dtype=torch.bool)
        for row, (x, m) in enumerate(zip(ids, masks)):
            input_ids[row, : len(x)] = torch.tensor(x)
            attention[row, : len(x)] = 1
            if m:
                assistant[row, : len(m)] = torch.tensor(m, dtype=torch.bool)
        input_ids, attention = input_ids.to(device), attention.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        real = attention[:, 1:].bool()
        asst = assistant[:, 1:].to(device) & real
        out["nll"] += float(nll[real].sum())
        out["tokens"] += int(real.sum())
        out["assistant_nll"] += float(nll[asst].sum())
        out["assistant_tokens"] += int(asst.sum())
    return out


def greedy_replies(model, tokenizer, prompts: list[list[dict]], *, batch_size: int = 16,
                   max_new_tokens: int = 128) -> list[str]:
    """Greedy chat replies to ``prompts`` (message lists ending in a user turn), in left-padded batches.

    Decoding stops at the model's end tokens (``generation_config.eos_token_id``)
    and at the tokenizer's eos; special tokens are dropped from the text.
    """
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    replies: list[str] = []
    for batch in _batches(prompts, batch_size):
        ids = [list(tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]) for m in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = torch.tensor(x)
            attention[row, width - len(x):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=eos, pad_token_id=pad_id)
        replies.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    return replies


def evaluate_heldout(model, tokenizer, dataset_path: str, *, n_loss: int | None = 200, n_exact: int = 48,
                     task: str | None = None, split: str = "test", batch_size: int = 8, max_length: int = 1024,
                     max_new_tokens: int = 128, env: DistEnv | None = None) -> dict:
    """Held-out loss and greedy exact-match of ``model`` on a chat test split.

    Args:
        model: a causal LM (plain or PEFT, not a DDP wrapper).
        tokenizer: its tokenizer, with a chat template.
        dataset_path: a folder with ``<split>.jsonl`` (e.g. ``data/sft``) or a JSONL file of
            ``{"messages": [...]}`` records.
        n_loss: score the loss on the first ``n_loss`` records (None: all; 0: skip).
        n_exact: answer the first user prompt of the first ``n_exact`` records of kind ``task`` (0: skip).
        task: a kind of :data:`opensloth.tasks.TASK_KINDS`, or None for every recognised kind.
        split: which file of a folder to read.
        batch_size: records per forward pass (generation uses twice as many).
        max_length: truncate conversations to this many tokens for the loss.
        max_new_tokens: longest greedy reply.
        env: the torchrun environment (default: this process's); each rank scores ``rank::world_size``
            and every rank gets the gathered result (call it on every rank, or with a 1-rank ``env``).

    Returns:
        ``{"loss", "assistant_loss", "tokens", "n", "exact_match", "n_exact", "task", "exact_by_kind",
        "example_prompt"}`` (the first exact-match prompt);
        ``loss`` is None when ``n_loss`` is 0, ``exact_match`` when no prompt was answered.

    Raises:
        UserInputError: the data is missing or malformed, or ``task`` is not a known kind.
    """
    import torch

    if task is not None and task not in TASK_KINDS:
        raise UserInputError(f"held-out task {task!r} is not a known task kind; choose one of {', '.join(TASK_KINDS)}")
    env = env or distributed_env()
    rank, world = (env.rank, env.world_size) if env.is_distributed else (0, 1)
    records = read_heldout_records(dataset_path, split)
    loss_records = records if n_loss is None else records[:n_loss]
    pairs = exact_match_prompts(records, task)[:n_exact] if n_exact else []
    mine_loss, mine_pairs = loss_records[rank::world], pairs[rank::world]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sums = heldout_loss_sums(model, tokenizer, [r["messages"] for r in mine_loss], batch_size=batch_size,
                                     max_length=max_length)
            replies = greedy_replies(model, tokenizer, [m for m, _ in mine_pairs], batch_size=2 * batch_size,
                                     max_new_tokens=max_new_tokens) if mine_pairs else []
    finally:
        model.train(was_training)
    verdicts = [(detect_kind(prompt), bool(check_answer(None, prompt, reply)))
                for (_, prompt), reply in zip(mine_pairs, replies)]
    shares = all_gather_object_list((sums, verdicts)) if world > 1 else [(sums, verdicts)]
    total = {k: sum(s[k] for s, _ in shares) for k in ("nll", "tokens", "assistant_nll", "assistant_tokens")}
    has_mask = all(s["has_mask"] for s, _ in shares if s["tokens"])
    verdicts = [v for _, vs in shares for v in vs]
    by_kind: dict[str, list[int]] = {}
    for kind, ok in verdicts:
        hits = by_kind.setdefault(kind, [0, 0])
        hits[0] += ok
        hits[1] += 1
    return {
        "loss": total["nll"] / total["tokens"] if total["tokens"] else None,
        "assistant_loss": (total["assistant_nll"] / total["assistant_tokens"]
                           if has_mask and total["assistant_tokens"] else None),
        "tokens": total["tokens"],
        "n": len(loss_records),
        "exact_match": sum(ok for _, ok in verdicts) / len(verdicts) if verdicts else None,
        "n_exact": len(verdicts),
        "task": task,
        "exact_by_kind": {k: v[0] / v[1] for k, v in sorted(by_kind.items())},
        "example_prompt": pairs[0][1] if pairs else None,  # for the summary's chat command
    }
