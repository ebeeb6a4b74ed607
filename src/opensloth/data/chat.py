"""Chat ``messages`` records (trl-lib/Capybara format) for SFT.

:func:`load_chat_splits` is what ``train_configurable.py`` trains on: the
train (and eval) split of a source, with one ``messages`` (or ``text``)
column that TRL prepares itself. :func:`prepare_chat_dataset` tokenizes ahead
of training (``precompute_dataset.py``).

A record holds ``messages``: a list of ``{"role": str, "content": str}`` with
at least one assistant turn. ShareGPT-style ``conversations``
(``{"from": "human"|"gpt"|"system", "value": str}``) are converted to this
form first.

Two output modes:

- ``mode="text"``: one ``text`` column, rendered with
  ``tokenizer.apply_chat_template(messages, tokenize=False)``. The trainer
  tokenizes it.
- ``mode="tokens"``: ``input_ids`` and ``labels`` columns, ready for a
  trainer that skips its own preparation. With ``assistant_only=True`` the
  labels of every token outside the chat template's ``{% generation %}``
  blocks are -100, so the loss covers assistant replies only. Sequences longer
  than ``max_seq_length`` keep their start (TRL's ``truncation_mode=
  "keep_start"``); a record left without any trainable token after that is
  dropped as ``too_long``.

Records with a broken structure (``bad_structure``) or nothing to learn from
(``empty``) are dropped and counted in a :class:`~opensloth.data.report.DropReport`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from opensloth.data.errors import DatasetFormatError, require_columns
from opensloth.data.report import BAD_STRUCTURE, EMPTY, TOO_LONG, DropReport
from opensloth.data.sources import load_records
from opensloth.errors import UserInputError
from opensloth.log import log_rank0

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_DROP = "_opensloth_drop"
_TRUNC = "_opensloth_truncated"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

__all__ = [
    "CHAT_COLUMNS",
    "IGNORE_INDEX",
    "chat_columns_problem",
    "chat_record_problem",
    "count_truncated",
    "format_chat_dataset",
    "load_chat_splits",
    "prepare_chat_dataset",
    "select_chat_columns",
    "sharegpt_to_messages",
    "tokenize_messages",
    "truncate_keep_start",
    "truncation_message",
]


# The columns SFT trains on, in order of preference: chat turns, ShareGPT turns, or formatted text.
CHAT_COLUMNS = ("messages", "conversations", "text")


def chat_columns_problem(column_names) -> str | None:
    """Why a dataset with these columns cannot be SFT chat data, or None."""
    if any(c in column_names for c in CHAT_COLUMNS):
        return None
    return ("SFT needs a 'messages' column (chat turns, trl-lib/Capybara format), 'conversations' (ShareGPT) or "
            "'text' (already formatted)")


def sharegpt_to_messages(conversations: Sequence[dict]) -> list[dict]:
    """Convert ShareGPT turns (``from``/``value``) to ``role``/``content`` messages.

    Raises:
        DatasetFormatError: a turn lacks ``from``/``value`` or has an unknown speaker.
    """
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DatasetFormatError(f"conversation turn {i} must have 'from' and 'value', got {turn!r:.80}")
        role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DatasetFormatError(f"conversation turn {i} has unknown speaker {turn['from']!r}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def chat_record_problem(messages: Any) -> str | None:
    """Why ``messages`` cannot be used for SFT, or None when it can.

    Returns ``"bad_structure"`` when it is not a list of ``role``/``content``
    string pairs, ``"empty"`` when no assistant turn has non-blank content.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return BAD_STRUCTURE if not isinstance(messages, (list, tuple)) else EMPTY
    has_reply = False
    for message in messages:
        if not isinstance(message, dict):
            return BAD_STRUCTURE
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return BAD_STRUCTURE
        if role == "assistant" and content.strip():
            has_reply = True
    return None if has_reply else EMPTY


def truncate_keep_start(input_ids: list[int], labels: list[int], max_seq_length: int | None):
    """Cut both lists to ``max_seq_length`` tokens, keeping the start.

    Returns ``(input_ids, labels, truncated)``.
    """
    if max_seq_length is None or len(input_ids) <= max_seq_length:
        return input_ids, labels, False
    return input_ids[:max_seq_length], labels[:max_seq_length], True


def tokenize_messages(messages: list[dict], tokenizer, assistant_only: bool = False) -> dict[str, list[int]]:
    """Tokenize one conversation with the tokenizer's chat template.

    Returns ``{"input_ids": [...], "labels": [...]}``; with ``assistant_only``
    the labels outside assistant replies are ``IGNORE_INDEX``.
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    input_ids = list(out["input_ids"])
    if assistant_only:
        mask = out["assistant_masks"]
        labels = [tok if m else IGNORE_INDEX for tok, m in zip(input_ids, mask)]
    else:
        labels = list(input_ids)
    return {"input_ids": input_ids, "labels": labels}


def _check_generation_markers(tokenizer) -> None:
    template = getattr(tokenizer, "chat_template", None) or ""
    if not _GENERATION_TAG.search(template):
        raise ValueError(
            "assistant_only=True needs a chat template with {% generation %} ... {% endgeneration %} around "
            "assistant replies, so the tokenizer can return assistant masks; this tokenizer's template has none. "
            "Use a template with generation markers or set assistant_only=False."
        )


def _messages_column(column_names: list[str], messages_field: str, source: str | None) -> str:
    if messages_field in column_names:
        return messages_field
    if messages_field == "messages" and "conversations" in column_names:
        return "conversations"
    require_columns(column_names, [messages_field], "chat SFT data", source)
    return messages_field  # unreachable: require_columns raised


def _format_batch(batch, *, column, tokenizer, mode, assistant_only, max_seq_length):
    out: dict[str, list] = {_DROP: [], _TRUNC: []}
    if mode == "text":
        out["text"] = []
    else:
        out["input_ids"], out["labels"] = [], []
    for raw in batch[column]:
        messages = raw
        reason = None
        if column == "conversations":
            try:
                messages = sharegpt_to_messages(raw) if isinstance(raw, list) else raw
            except DatasetFormatError:
                reason = BAD_STRUCTURE
        reason = reason or chat_record_problem(messages)
        truncated = False
        if mode == "text":
            text = "" if reason else tokenizer.apply_chat_template(messages, tokenize=False)
            out["text"].append(text)
        else:
            ids: list[int] = []
            labels: list[int] = []
            if not reason:
                tokens = tokenize_messages(messages, tokenizer, assistant_only)
                ids, labels, truncated = truncate_keep_start(tokens["input_ids"], tokens["labels"], max_seq_length)
                if all(x == IGNORE_INDEX for x in labels):
                    # Nothing left to learn from: the replies were cut off (or masked out).
                    reason = TOO_LONG if truncated else EMPTY
                if reason:
                    ids, labels, truncated = [], [], False
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        out[_DROP].append(reason or "")
        out[_TRUNC].append(truncated)
    return out


def _apply_drops(ds, report: DropReport):
    """Count the drop/truncation columns into ``report`` and remove dropped rows."""
    reasons = ds[_DROP]
    report.total_in += len(reasons)
    for position, reason in enumerate(reasons):
        if reason:
            report.drop(reason, position)
    report.truncated += sum(bool(t) for t in ds[_TRUNC])
    if report.total_dropped:
        ds = ds.filter(lambda r: [not x for x in r], input_columns=[_DROP], batched=True, batch_size=10_000)
    return ds.remove_columns([_DROP, _TRUNC])


def prepare_chat_dataset(
    ds,
    tokenizer,
    mode: str = "text",
    assistant_only: bool = False,
    max_seq_length: int | None = None,
    messages_field: str = "messages",
    keep_columns: Sequence[str] = (),
    num_proc: int | None = None,
    name: str = "chat",
    source: str | None = None,
):
    """Format a chat dataset and report what was dropped.

    Args:
        ds: a ``datasets.Dataset`` with a ``messages`` (or ShareGPT
            ``conversations``) column.
        tokenizer: a tokenizer with a chat template.
        mode: ``"text"`` (a ``text`` column) or ``"tokens"`` (``input_ids`` and ``labels``).
        assistant_only: tokens mode only: mask everything but assistant replies.
        max_seq_length: tokens mode only: truncate (keep start) to this many tokens.
        messages_field: the column holding the messages.
        keep_columns: extra columns to keep (e.g. ``source``).
        num_proc: worker processes for ``Dataset.map``.
        name: label used in the report.
        source: where the data came from, for error messages.

    Returns:
        ``(dataset, report)``.

    Raises:
        MissingColumnsError: the messages column is absent.
        ValueError: bad ``mode``, or ``assistant_only`` without generation markers.
        EmptyDatasetError: no record survived.
    """
    if mode not in ("text", "tokens"):
        raise ValueError(f"mode={mode!r} must be 'text' or 'tokens'")
    if assistant_only and mode != "tokens":
        raise ValueError(
            "assistant_only=True masks labels, which exist only in mode='tokens'; for mode='text' let the trainer "
            "mask (TRL: SFTConfig(assistant_only_loss=True) on a messages dataset)"
        )
    if assistant_only:
        _check_generation_markers(tokenizer)
    if max_seq_length is not None and max_seq_length < 1:
        raise ValueError(f"max_seq_length={max_seq_length} must be >= 1")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat_template; load a chat tokenizer or set tokenizer.chat_template")
    column = _messages_column(list(ds.column_names), messages_field, source)
    require_columns(ds.column_names, list(keep_columns), "chat SFT data (keep_columns)", source)
    remove = [c for c in ds.column_names if c not in keep_columns]
    formatted = ds.map(
        _format_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        remove_columns=remove,
        fn_kwargs=dict(
            column=column,
            tokenizer=tokenizer,
            mode=mode,
            assistant_only=assistant_only,
            max_seq_length=max_seq_length,
        ),
        desc=f"Formatting {name} ({mode})",
    )
    report = DropReport(name=f"{name} ({mode})")
    formatted = _apply_drops(formatted, report)
    report.raise_if_empty()
    return formatted, report


def format_chat_dataset(
    ds,
    tokenizer,
    mode: str = "text",
    assistant_only: bool = False,
    max_seq_length: int | None = None,
    **kwargs,
):
    """:func:`prepare_chat_dataset` that logs the report and returns only the dataset."""
    formatted, report = prepare_chat_dataset(
        ds, tokenizer, mode=mode, assistant_only=assistant_only, max_seq_length=max_seq_length, **kwargs
    )
    log_rank0(report.summary())
    return formatted


def select_chat_columns(ds, source: str):
    """Keep the one column TRL trains on: chat ``messages`` (preferred) or plain ``text``.

    Chat rows stay as messages: TRL applies the chat template itself, which
    adds the end-of-turn token once (rendering to text first and letting TRL
    append EOS doubles it) and allows ``assistant_only_loss``.
    """
    cols = ds.column_names
    problem = chat_columns_problem(cols)
    if problem:
        raise UserInputError(f"dataset {source!r} has columns {cols}; {problem}")
    if "messages" in cols:
        return ds.select_columns(["messages"])
    if "conversations" in cols:
        return ds.map(lambda ex: {"messages": sharegpt_to_messages(ex["conversations"])},
                      remove_columns=cols, desc="ShareGPT -> messages")
    return ds.select_columns(["text"])


def load_chat_splits(
    dataset: str,
    tokenizer,
    *,
    train_split: str = "train",
    test_split: str = "test",
    train_samples: int | None = None,
    test_samples: int = 0,
):
    """Load, subset and format the train (and optional eval) split of a chat dataset.

    Returns ``(train_dataset, val_dataset_or_None)`` with a ``messages`` or ``text`` column.
    """
    train = load_records(dataset, train_split)
    if train_samples is not None:
        train = train.select(range(min(train_samples, len(train))))
    if len(train) == 0:
        raise UserInputError(f"dataset {dataset!r} split {train_split!r} is empty; nothing to train on")
    train = select_chat_columns(train, dataset)
    val = None
    if test_samples:
        val = load_records(dataset, test_split)
        val = select_chat_columns(val.select(range(min(test_samples, len(val)))), dataset)
    return train, val


def count_truncated(ds, tokenizer, max_seq_length: int, batch_size: int = 512) -> dict:
    """How many SFT records are longer than ``max_seq_length`` tokens (the trainer keeps their start only).

    ``ds`` has a ``messages`` column (chat template applied, as TRL does), a
    ``text`` column, or TRL's ``prompt``/``completion`` pair (strings or
    message lists, counted joined). Tokenizes every record once, in batches.
    Returns ``{"records", "truncated", "longest", "max_seq_length"}``, or
    None for any other layout (nothing to count the way TRL will tokenize).
    """
    names = ds.column_names
    if "messages" in names or "text" in names:
        column = "messages" if "messages" in names else "text"
    elif "prompt" in names and "completion" in names:
        column = "prompt_completion"
    else:
        return None
    # The tokenizer's "sequence longer than the model's maximum ... indexing errors" warning would be
    # misleading here: the trainer truncates, and this count is what the user sees instead.
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    truncated = longest = 0
    for start in range(0, len(ds), batch_size):
        if column == "prompt_completion":
            batch = ds[start:start + batch_size]
            rows = [p + c for p, c in zip(batch["prompt"], batch["completion"])]
            column_kind = "messages" if rows and isinstance(rows[0], list) else "text"
        else:
            rows, column_kind = ds[start:start + batch_size][column], column
        if column_kind == "messages":
            ids = tokenizer.apply_chat_template(rows, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(rows, add_special_tokens=True)["input_ids"]
        for seq in ids:
            longest = max(longest, len(seq))
            truncated += len(seq) > max_seq_length
    return {"records": len(ds), "truncated": truncated, "longest": longest, "max_seq_length": max_seq_length}


def truncation_message(report: dict, flag: str = "--max_seq_length") -> str | None:
    """One line about the records :func:`count_truncated` found too long, or None when none is."""
    if not report or not report.get("truncated"):
        return None
    return (f"{report['truncated']} of {report['records']} training conversations are longer than {flag} "
            f"{report['max_seq_length']} tokens and lose their end (longest: {report['longest']} tokens); raise "
            f"{flag} to keep them whole")
