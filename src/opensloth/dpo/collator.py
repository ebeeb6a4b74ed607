"""Preference pairs that fit the token budget: the prompt gives way, never a crash.

TRL 1.15 truncates in its collator, chosen and rejected sequence separately:
``keep_start`` (the default) cuts the end of the completions and drops pairs
whose prompt alone fills ``max_length``; ``keep_end`` (deprecated) cuts from the
left, but per sequence, so the chosen and the rejected completion of one pair
can see different prompts. Here the prompt of a pair is cut once, from the left, to
``max_length - max(len(chosen), len(rejected))`` tokens, so both completions
see the same, most recent, context. A completion longer than ``max_length`` on
its own is cut from the right (its start is kept) and the prompt is dropped;
such pairs are counted separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


def truncate_pair(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int],
                  max_length: int | None) -> tuple[list[int], list[int], list[int]]:
    """Fit ``prompt + chosen`` and ``prompt + rejected`` into ``max_length`` tokens.

    Returns ``(prompt_ids, chosen_ids, rejected_ids)``, unchanged when they fit.
    The prompt keeps its last ``max_length - max(len(chosen), len(rejected))``
    tokens; completions are cut to ``max_length`` only when they alone exceed it.
    """
    prompt_ids, chosen_ids, rejected_ids = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    if max_length is None:
        return prompt_ids, chosen_ids, rejected_ids
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    chosen_ids, rejected_ids = chosen_ids[:max_length], rejected_ids[:max_length]
    budget = max_length - max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) > budget:
        prompt_ids = prompt_ids[len(prompt_ids) - budget:] if budget > 0 else []
    return prompt_ids, chosen_ids, rejected_ids


def count_prompt_truncations(dataset, max_length: int | None) -> dict:
    """How many pairs of a tokenized preference dataset :func:`truncate_pair` shortens.

    ``dataset`` has ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` columns
    (what ``DPOTrainer`` stores after tokenizing). Returns
    ``{"pairs", "prompt_truncated", "completion_truncated", "max_pair_length"}``.
    """
    prompts, chosen, rejected = dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
    prompt_cut = completion_cut = longest = 0
    for p, c, r in zip(prompts, chosen, rejected):
        completion = max(len(c), len(r))
        longest = max(longest, len(p) + completion)
        if max_length is None:
            continue
        if completion > max_length:
            completion_cut += 1
        elif len(p) + completion > max_length:
            prompt_cut += 1
    return {
        "pairs": len(prompts),
        "prompt_truncated": prompt_cut,
        "completion_truncated": completion_cut,
        "max_pair_length": longest,
    }


def drop_identical_pairs(dataset, max_length: int | None, *, left_truncate: bool = True):
    """Remove pairs whose chosen and rejected sequences are identical once fitted into ``max_length``.

    Identical texts are dropped when the data loads (``identical_texts``);
    this catches pairs that only become identical as token ids: completions
    cut to the same start, or texts the tokenizer maps to the same ids. Such a
    pair has a margin of exactly 0 and no gradient. ``left_truncate``: the fit
    of :func:`truncate_pair` (opensloth's collator); otherwise TRL's
    ``keep_start`` cut of each ``prompt + completion`` sequence.

    Returns:
        ``(dataset, dropped)``.
    """
    prompts, chosen, rejected = dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
    keep = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        if left_truncate:
            _, c_fit, r_fit = truncate_pair(p, c, r, max_length)
            same = c_fit == r_fit
        else:
            same = (list(p) + list(c))[:max_length] == (list(p) + list(r))[:max_length]
        if not same:
            keep.append(i)
    dropped = len(prompts) - len(keep)
    return (dataset.select(keep) if dropped else dataset), dropped


@dataclass
class LeftTruncatingPreferenceCollator:
    """Apply :func:`truncate_pair` to each example, then TRL's ``DataCollatorForPreference``.

    Pass it as ``data_collator`` to ``DPOTrainer``; ``pad_token_id`` is the
    tokenizer's. Output keys are those of TRL's collator.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self._inner = DataCollatorForPreference(
            pad_token_id=self.pad_token_id, max_length=None, pad_to_multiple_of=self.pad_to_multiple_of
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        fitted = []
        for ex in examples:
            p, c, r = truncate_pair(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], self.max_length)
            fitted.append({**ex, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
        return self._inner(fitted)
