"""Prompts in, traces out: loading prompts, the prompt-prefix strip, atomic files.

A *trace* is the full decoded sequence of one candidate: the rendered prompt
(chat template included) followed by the generated text, as the model saw
it. The completion that the judge scores and the DPO pair trains on is the
trace without its prompt. :func:`strip_prompt_prefix` removes the prompt
exactly once, by a prefix check and a slice -- never ``str.replace``, which
would also delete prompt-like text the model wrote inside its reasoning (a
worked answer that restates the question keeps the restatement).

Rollout JSONL (``rollouts.jsonl``), one line per prompt, in prompt order::

    {"index": 3, "id": "add-0003", "prompt": "What is 2 + 5?",
     "prompt_text": "<|im_start|>user\\nWhat is 2 + 5?<|im_end|>\\n<|im_start|>assistant\\n",
     "rank": 1,
     "candidates": [{"sample": 0, "seed": 81723..., "trace": "<|im_start|>user...Answer: 7",
                     "finish": "eos", "new_tokens": 4}, ...]}
"""

from __future__ import annotations

import json
import os

from opensloth.data.sources import load_records
from opensloth.errors import UserInputError


def strip_prompt_prefix(trace: str, prompt_text: str) -> str:
    """The completion of ``trace``: ``trace[len(prompt_text):]`` after checking the prefix.

    >>> strip_prompt_prefix("Q: 2+2?\\nA: Q: 2+2? is 4", "Q: 2+2?\\n")
    'A: Q: 2+2? is 4'

    Raises:
        ValueError: ``trace`` does not start with ``prompt_text``.
    """
    if not trace.startswith(prompt_text):
        raise ValueError(
            f"trace does not start with its prompt (prompt ends {prompt_text[-40:]!r}, trace starts "
            f"{trace[:40]!r}); the tokenizer's decode does not round-trip the prompt"
        )
    return trace[len(prompt_text):]


def _prompt_of(row: dict, position: int, source: str) -> str:
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise UserInputError(
                f"{source} row {position + 1}: 'prompt' must be a string (the user message), got "
                f"{type(prompt).__name__}"
            )
        return prompt
    messages = row.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
    raise UserInputError(
        f"{source} row {position + 1} has no prompt: give a 'prompt' string or 'messages' with a user turn"
    )


def load_prompts(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Prompts of a dataset: ``[{"index", "id", "prompt"}]`` in file order.

    Args:
        source: anything :func:`opensloth.data.load_records` reads (JSONL/JSON/Parquet
            file, folder with ``<split>.jsonl``, hub id). Each row has a
            ``prompt`` string or chat ``messages`` (the first user turn is the prompt).
        split: split name, slicing allowed.
        limit: keep the first ``limit`` prompts.

    Raises:
        UserInputError: the source is missing or unreadable, a row has no
            prompt, or no prompt is left (an empty rollout).
    """

    if limit is not None and limit < 1:
        raise UserInputError(f"--limit {limit} must be >= 1")
    if os.path.isfile(source) and source.endswith((".jsonl", ".json")):
        with open(source) as fh:
            if not any(line.strip() for line in fh):
                raise UserInputError(f"empty rollout: {source!r} has no prompts (the file is empty)")
    ds = load_records(source, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    prompts = []
    for position, row in enumerate(ds):
        prompt = _prompt_of(row, position, source)
        if not prompt.strip():
            raise UserInputError(f"{source} row {position + 1}: the prompt is blank")
        ident = row.get("id")
        prompts.append({"index": position, "id": str(ident) if ident is not None else f"{position:06d}",
                        "prompt": prompt})
    if not prompts:
        raise UserInputError(f"empty rollout: {source!r} split {split!r} has no prompts")
    return prompts


def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)
