"""Train on responses only, found by marker strings: the original OpenSloth's ``--target_token_only``.

The original's ``precompute_dataset.py`` called Unsloth's
``train_on_responses_only(instruction_part, response_part)``: the loss covers
the tokens after each ``response_part`` marker up to the next
``instruction_part`` marker (or the end of the sequence), and nothing else.
That needs no ``{% generation %}`` markers in the chat template (Qwen3's has
none), so it is kept for users of the original; ``assistant_only`` is the
template-based way.
"""

from __future__ import annotations

from typing import Sequence

from opensloth.data.chat import IGNORE_INDEX
from opensloth.data.report import EMPTY, DropReport
from opensloth.errors import UserInputError

__all__ = ["DEFAULT_INSTRUCTION_PART", "DEFAULT_RESPONSE_PART", "mask_to_responses", "response_only_labels"]

DEFAULT_INSTRUCTION_PART = "<|im_start|>user\n"
DEFAULT_RESPONSE_PART = "<|im_start|>assistant\n"


def _find(seq: Sequence[int], pattern: Sequence[int], start: int) -> int:
    """First index >= start where ``pattern`` occurs in ``seq``, or -1."""
    n = len(pattern)
    for i in range(start, len(seq) - n + 1):
        if seq[i] == pattern[0] and list(seq[i:i + n]) == list(pattern):
            return i
    return -1


def response_only_labels(input_ids: Sequence[int], labels: Sequence[int], instruction_ids: Sequence[int],
                         response_ids: Sequence[int]) -> list[int]:
    """``labels`` kept only inside responses: after each response marker, up to the next instruction marker.

    >>> ids = [1, 7, 5, 9, 8, 6, 7, 5, 9, 4]  # 7: instruction marker, 9: response marker
    >>> response_only_labels(ids, ids, [7], [9])
    [-100, -100, -100, -100, 8, 6, -100, -100, -100, 4]
    """
    if not response_ids or not instruction_ids:
        raise ValueError("the instruction and response markers must tokenize to at least one token")
    out = [IGNORE_INDEX] * len(input_ids)
    at = _find(input_ids, response_ids, 0)
    while at >= 0:
        start = at + len(response_ids)
        end = _find(input_ids, instruction_ids, start)
        end = len(input_ids) if end < 0 else end
        out[start:end] = labels[start:end]
        at = _find(input_ids, response_ids, end)
    return out


def mask_to_responses(ds, tokenizer, instruction_part: str = DEFAULT_INSTRUCTION_PART,
                      response_part: str = DEFAULT_RESPONSE_PART, name: str = "responses only"):
    """Mask the ``labels`` of a tokenized dataset outside responses; drop rows left with no target.

    Args:
        ds: rows with ``input_ids`` and ``labels`` (``prepare_chat_dataset(mode="tokens")``).
        tokenizer: encodes the two markers (without special tokens added).
        instruction_part, response_part: the marker strings of the chat
            template, e.g. ``"<|im_start|>user\\n"`` and ``"<|im_start|>assistant\\n"``.

    Returns:
        ``(dataset, DropReport)``; rows whose labels are all -100 afterwards are dropped as ``empty``.

    Raises:
        UserInputError: ``response_part`` occurs in no row (the marker does not
            match this chat template).
    """
    instruction_ids = tokenizer.encode(instruction_part, add_special_tokens=False)
    response_ids = tokenizer.encode(response_part, add_special_tokens=False)

    def relabel(batch):
        return {"labels": [response_only_labels(ids, labels, instruction_ids, response_ids)
                           for ids, labels in zip(batch["input_ids"], batch["labels"])]}

    masked = ds.map(relabel, batched=True, desc="masking all but responses")
    keep = [any(x != IGNORE_INDEX for x in labels[1:]) for labels in masked["labels"]]
    report = DropReport(name=name, total_in=len(keep))
    for position, kept in enumerate(keep):
        if not kept:
            report.drop(EMPTY, position)
    if len(keep) and not any(keep):
        raise UserInputError(
            f"--response_part {response_part!r} (with --instruction_part {instruction_part!r}) leaves no trained token "
            f"in any row: it does not occur in this chat template's output. Pass the markers the template writes "
            f"before user and assistant turns")
    if report.total_dropped:
        masked = masked.select([i for i, kept in enumerate(keep) if kept])
    return masked, report
