"""Preference pairs: loading any supported format, and fitting them in a length budget.

Formats (``load_preference_dataset(source, split, fmt=...)``):

- ``"pairs"``: ``prompt`` / ``chosen`` / ``rejected`` columns, used as they are;
- ``"hh"``: Anthropic HH transcripts (see :mod:`opensloth.data.hh`);
- ``"judged"``: judged rollout JSONL (see :mod:`opensloth.data.judged`);
- ``"auto"``: picked from the columns (``candidates`` -> judged; ``prompt``
  -> pairs; ``chosen``/``rejected`` only -> hh).

Length policy (:func:`clamp_preference_record`), applied to token ids:

1. A prompt longer than ``max_prompt_length`` keeps its last
   ``max_prompt_length`` tokens (truncated from the left: the end of the
   prompt, right before the reply, matters most).
2. If prompt + the longer completion still exceeds ``max_length``, the prompt
   is cut further from the left so that both completions fit whole.
3. Only when a completion alone leaves less than ``min_prompt_tokens`` of
   room is it cut (from the right, keeping its start), so that the prompt
   keeps ``min(len(prompt), min_prompt_tokens)`` tokens.

A record never raises because it is long; the number of records whose prompt
or completions were shortened is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from opensloth.data.errors import DatasetFormatError, require_columns
from opensloth.data.report import BAD_STRUCTURE, EMPTY, IDENTICAL, DropReport

__all__ = [
    "ClampResult",
    "clamp_preference_record",
    "detect_preference_format",
    "load_preference_dataset",
    "tokenize_preference_dataset",
]


@dataclass(frozen=True)
class ClampResult:
    """A preference record cut to fit; see the module doc for the policy."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    completion_truncated: bool

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.completion_truncated


def clamp_preference_record(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    max_length: int,
    max_prompt_length: int | None = None,
    min_prompt_tokens: int = 16,
) -> ClampResult:
    """Fit ``prompt + chosen`` and ``prompt + rejected`` into ``max_length`` tokens.

    Args:
        prompt_ids, chosen_ids, rejected_ids: token ids of the three parts.
        max_length: budget for prompt + completion.
        max_prompt_length: optional separate budget for the prompt.
        min_prompt_tokens: prompt tokens kept even when a completion alone is
            too long (the completion is cut instead).

    Returns:
        A :class:`ClampResult`; ``len(prompt) + len(completion) <= max_length``
        for both completions.

    Raises:
        ValueError: the budgets themselves are invalid (``max_length < 2``,
            ``max_prompt_length < 1``, ``min_prompt_tokens < 0``).

    >>> r = clamp_preference_record([1, 2, 3, 4, 5], [6, 7], [8], max_length=4, min_prompt_tokens=1)
    >>> r.prompt_ids, r.chosen_ids, r.rejected_ids, r.prompt_truncated, r.completion_truncated
    ([4, 5], [6, 7], [8], True, False)
    >>> r = clamp_preference_record([1, 2, 3, 4, 5], [6, 7, 8, 9], [10], max_length=6, min_prompt_tokens=3)
    >>> r.prompt_ids, r.chosen_ids, r.rejected_ids, r.completion_truncated
    ([3, 4, 5], [6, 7, 8], [10], True)
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2 (one prompt and one completion token)")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be >= 1 or None")
    if min_prompt_tokens < 0:
        raise ValueError(f"min_prompt_tokens={min_prompt_tokens} must be >= 0")
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    original_prompt_len = len(prompt)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    longest = max(len(chosen), len(rejected))
    completion_truncated = False
    if len(prompt) + longest > max_length:
        keep_prompt = min(len(prompt), min_prompt_tokens, max_length - 1)
        room = max_length - longest
        if room >= keep_prompt:
            keep_prompt = room
        else:
            completion_budget = max_length - keep_prompt
            completion_truncated = True
            chosen, rejected = chosen[:completion_budget], rejected[:completion_budget]
        prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt else []
    return ClampResult(prompt, chosen, rejected, len(prompt) < original_prompt_len, completion_truncated)


def detect_preference_format(column_names: Sequence[str]) -> str:
    """``"judged"``, ``"pairs"`` or ``"hh"`` from the columns.

    Raises:
        MissingColumnsError: the columns fit none of the formats.
    """
    cols = set(column_names)
    if {"prompt", "candidates"} <= cols:
        return "judged"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "pairs"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    require_columns(column_names, ["prompt", "chosen", "rejected"], "preference data (pairs, hh or judged)")
    raise AssertionError("unreachable")


def _check_pairs(ds, name: str):
    """Drop pairs with non-string/blank/identical fields (strings or message lists)."""
    def problem(prompt, chosen, rejected):
        if isinstance(prompt, str):
            if not all(isinstance(x, str) for x in (chosen, rejected)):
                return BAD_STRUCTURE
            if not prompt.strip() or not chosen.strip() or not rejected.strip():
                return EMPTY
        elif not all(isinstance(x, list) for x in (prompt, chosen, rejected)):
            return BAD_STRUCTURE
        if chosen == rejected:
            return IDENTICAL
        return None

    reasons = [problem(p, c, r) for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"])]
    report = DropReport(name=name, total_in=len(reasons))
    keep = []
    for i, reason in enumerate(reasons):
        if reason:
            report.drop(reason, i)
        else:
            keep.append(i)
    if report.total_dropped:
        ds = ds.select(keep)
    return ds, report


def load_preference_dataset(source, split: str = "train", fmt: str = "auto", as_messages: bool = False):
    """Load preference pairs from any supported format.

    Args:
        source: file, folder, hub id (see :func:`opensloth.data.sources.load_records`)
            or a ``datasets.Dataset``.
        split: split with optional slicing.
        fmt: ``"auto"``, ``"pairs"``, ``"hh"`` or ``"judged"``.
        as_messages: HH only: conversational output.

    Returns:
        ``(dataset, report)`` with ``prompt``, ``chosen``, ``rejected`` columns.

    Raises:
        MissingColumnsError, DatasetFormatError, EmptyDatasetError.
    """
    import datasets

    from opensloth.data.hh import build_hh_dataset
    from opensloth.data.judged import build_judged_dataset
    from opensloth.data.sources import load_records, read_jsonl

    if fmt not in ("auto", "pairs", "hh", "judged"):
        raise ValueError(f"fmt={fmt!r} must be one of 'auto', 'pairs', 'hh', 'judged'")
    name = f"preference {source if isinstance(source, str) else 'dataset'}"
    if isinstance(source, str) and source.endswith(".jsonl") and fmt in ("auto", "judged"):
        if fmt == "auto":
            first = next(read_jsonl(source), (0, {}))[1]
            fmt = "judged" if "candidates" in first else "auto"
        if fmt == "judged":
            return build_judged_dataset(source, split, name=name)
    ds = source if isinstance(source, datasets.Dataset) else load_records(source, split)
    if fmt == "auto":
        fmt = detect_preference_format(ds.column_names)
    where = source if isinstance(source, str) else None
    if fmt == "judged":
        return build_judged_dataset(ds, split, name=name)
    if fmt == "hh":
        return build_hh_dataset(ds, as_messages=as_messages, name=name, source=where)
    require_columns(ds.column_names, ["prompt", "chosen", "rejected"], "preference pairs", where)
    ds, report = _check_pairs(ds, name)
    report.raise_if_empty()
    return ds, report


def _tokenize_prompt(tokenizer, prompt, use_chat_template: bool) -> list[int]:
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    if use_chat_template:
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _tokenize_completion(tokenizer, completion) -> list[int]:
    if isinstance(completion, list):
        if len(completion) != 1 or not isinstance(completion[0], dict):
            raise DatasetFormatError("a conversational completion must be a single assistant message")
        completion = completion[0].get("content", "")
    text = completion if completion.endswith(tokenizer.eos_token) else completion + tokenizer.eos_token
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_preference_dataset(
    ds,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool | None = None,
    min_prompt_tokens: int = 16,
    name: str = "preference",
):
    """Tokenize pairs into ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` and clamp them.

    The output columns are the ones TRL's ``DPOTrainer`` collator reads.
    Completions end with the tokenizer's EOS token. String prompts are wrapped
    as one user message when ``use_chat_template`` (default: the tokenizer has
    a chat template).

    Returns:
        ``(dataset, report)``; ``report.truncated`` counts clamped records.
    """
    require_columns(ds.column_names, ["prompt", "chosen", "rejected"], "preference pairs")
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; completions must end with one")

    def tokenize_batch(batch):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "_opensloth_truncated": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            clamped = clamp_preference_record(
                _tokenize_prompt(tokenizer, prompt, use_chat_template),
                _tokenize_completion(tokenizer, chosen),
                _tokenize_completion(tokenizer, rejected),
                max_length,
                max_prompt_length,
                min_prompt_tokens,
            )
            out["prompt_ids"].append(clamped.prompt_ids)
            out["chosen_ids"].append(clamped.chosen_ids)
            out["rejected_ids"].append(clamped.rejected_ids)
            out["_opensloth_truncated"].append(clamped.truncated)
        return out

    tokenized = ds.map(tokenize_batch, batched=True, desc=f"Tokenizing {name} pairs")
    report = DropReport(name=name, total_in=len(tokenized))
    report.truncated = sum(tokenized["_opensloth_truncated"])
    return tokenized.remove_columns(["_opensloth_truncated"]), report
