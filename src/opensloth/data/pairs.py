"""Preference pairs given as pairs: ``prompt``/``chosen``/``rejected`` columns, or chat-message pairs.

- explicit pairs (TRL's standard and conversational formats): ``prompt``,
  ``chosen``, ``rejected`` as strings, or as message lists; checked and kept
  as they are;
- chat-message pairs (TRL's implicit-prompt conversational format):
  ``chosen`` and ``rejected`` are whole conversations (lists of
  ``{"role", "content"}``) that share every message but the last assistant
  reply. The shared messages become the ``prompt``, the two last replies
  ``chosen`` and ``rejected`` (one assistant message each).

Dropped and counted: non-string / non-list fields or conversations that do
not end in one differing assistant reply (``bad_structure``), blank prompts
or replies (``empty``), and identical replies (``identical_texts``).
"""

from __future__ import annotations

from opensloth.data.errors import require_columns
from opensloth.data.report import BAD_STRUCTURE, EMPTY, IDENTICAL, DropReport

__all__ = ["build_chat_pairs_dataset", "check_pairs", "chat_pair_problem", "split_chat_pair"]

_PLACEHOLDER = [{"role": "", "content": ""}]  # dropped rows keep the Arrow type of kept ones


def _pair_problem(prompt, chosen, rejected) -> str | None:
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


def check_pairs(ds, name: str, source: str | None = None):
    """Drop pairs with non-string/blank/identical fields (strings or message lists).

    Returns:
        ``(dataset, report)``; the dataset keeps its columns.

    Raises:
        MissingColumnsError: ``prompt``, ``chosen`` or ``rejected`` is missing.
    """
    require_columns(ds.column_names, ["prompt", "chosen", "rejected"], "preference pairs", source)
    reasons = [_pair_problem(p, c, r) for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"])]
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


def _is_message(x) -> bool:
    return isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)


def split_chat_pair(chosen: list, rejected: list) -> tuple[list, dict, dict]:
    """``(prompt_messages, chosen_reply, rejected_reply)`` of two conversations.

    Raises:
        ValueError: the conversations do not end in exactly one assistant reply after their shared messages.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # Identical conversations differ nowhere; their last message is then the reply of both.
    if chosen == rejected and chosen:
        shared = len(chosen) - 1
    tail_c, tail_r = chosen[shared:], rejected[shared:]
    if len(tail_c) != 1 or len(tail_r) != 1 or not shared:
        raise ValueError("the conversations must share every message but one last assistant reply each")
    if tail_c[0].get("role") != "assistant" or tail_r[0].get("role") != "assistant":
        raise ValueError("the differing last message must be an assistant reply")
    return chosen[:shared], tail_c[0], tail_r[0]


def chat_pair_problem(chosen, rejected) -> str | None:
    """Why two conversations cannot become a preference pair, or None."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        return BAD_STRUCTURE
    if not all(_is_message(m) for m in chosen + rejected):
        return BAD_STRUCTURE
    try:
        prompt, c, r = split_chat_pair(chosen, rejected)
    except ValueError:
        return BAD_STRUCTURE
    if not c["content"].strip() or not r["content"].strip() or not any(m["content"].strip() for m in prompt):
        return EMPTY
    if c["content"] == r["content"]:
        return IDENTICAL
    return None


def _convert_chat_batch(batch):
    out = {"prompt": [], "chosen": [], "rejected": [], "_opensloth_drop": []}
    for chosen, rejected in zip(batch["chosen"], batch["rejected"]):
        reason = chat_pair_problem(chosen, rejected)
        if reason:
            prompt, c, r = _PLACEHOLDER, _PLACEHOLDER[0], _PLACEHOLDER[0]
        else:
            prompt, c, r = split_chat_pair(chosen, rejected)
        out["prompt"].append([{"role": m["role"], "content": m["content"]} for m in prompt])
        out["chosen"].append([{"role": "assistant", "content": c["content"]}])
        out["rejected"].append([{"role": "assistant", "content": r["content"]}])
        out["_opensloth_drop"].append(reason or "")
    return out


def build_chat_pairs_dataset(ds, name: str = "chat pairs", source: str | None = None):
    """Chat-message pairs (``chosen``/``rejected`` conversations) -> conversational ``prompt``/``chosen``/``rejected``.

    Returns:
        ``(dataset, report)``.

    Raises:
        MissingColumnsError: ``chosen`` or ``rejected`` is missing.
        EmptyDatasetError: no pair survived.
    """
    require_columns(ds.column_names, ["chosen", "rejected"], "chat-message pairs", source)
    converted = ds.map(_convert_chat_batch, batched=True, remove_columns=ds.column_names,
                       desc=f"Splitting {name} conversations")
    report = DropReport.from_reasons(name, converted["_opensloth_drop"])
    if report.total_dropped:
        converted = converted.filter(lambda r: [not x for x in r], input_columns=["_opensloth_drop"], batched=True)
    converted = converted.remove_columns(["_opensloth_drop"])
    report.raise_if_empty("Chat pairs need two conversations that share everything but a last assistant reply.")
    return converted, report
