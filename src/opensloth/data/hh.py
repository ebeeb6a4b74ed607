"""Anthropic HH transcripts -> ``prompt`` / ``chosen`` / ``rejected``.

An HH record holds two full transcripts, ``chosen`` and ``rejected``::

    "\\n\\nHuman: How do I bake bread?\\n\\nAssistant: Mix flour, water..."

Both repeat the same conversation and differ in the last assistant reply.
The prompt is the longest prefix the two transcripts share that ends right
after an ``"\\n\\nAssistant:"`` marker. It is removed from each transcript
exactly once, by a prefix check and a slice (``transcript[len(prompt):]``),
never with ``str.replace``: a reply that quotes the prompt text keeps it, and
``prompt + chosen`` gives back the original transcript character for
character.

Dropped and counted: a transcript pair with no shared ``Assistant:`` turn or
a non-string field (``bad_structure``), a blank reply (``empty``), and two
identical replies (``identical_texts``).
"""

from __future__ import annotations

import os
import re

from opensloth.data.errors import require_columns
from opensloth.data.report import BAD_STRUCTURE, EMPTY, IDENTICAL, DropReport

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")

__all__ = ["ASSISTANT", "HUMAN", "build_hh_dataset", "hh_pair_problem", "split_hh_pair", "transcript_to_messages"]


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH transcripts into ``(prompt, chosen_reply, rejected_reply)``.

    Raises:
        ValueError: the transcripts share no prefix ending in ``"\\n\\nAssistant:"``.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("the two transcripts share no prefix that ends with '\\n\\nAssistant:'")
    prompt = shared[: cut + len(ASSISTANT)]
    # commonprefix guarantees both checks; they state the invariant the slices rely on.
    assert chosen.startswith(prompt) and rejected.startswith(prompt)
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def hh_pair_problem(chosen, rejected) -> str | None:
    """Why an HH record cannot become a preference pair, or None."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return BAD_STRUCTURE
    try:
        _, chosen_reply, rejected_reply = split_hh_pair(chosen, rejected)
    except ValueError:
        return BAD_STRUCTURE
    if not chosen_reply.strip() or not rejected_reply.strip():
        return EMPTY
    if chosen_reply == rejected_reply:
        return IDENTICAL
    return None


def transcript_to_messages(transcript: str) -> list[dict]:
    """Parse ``"\\n\\nHuman: a\\n\\nAssistant: b"`` into chat messages.

    A trailing empty ``Assistant:`` turn (the end of a prompt) is left out.
    Text before the first marker becomes a system message.
    """
    messages = []
    parts = _TURN.split(transcript)
    head = parts[0].strip()
    if head:
        messages.append({"role": "system", "content": head})
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = text.strip()
        messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _convert_batch(batch, as_messages: bool):
    out = {"prompt": [], "chosen": [], "rejected": [], "_opensloth_drop": []}
    for chosen, rejected in zip(batch["chosen"], batch["rejected"]):
        reason = hh_pair_problem(chosen, rejected)
        if reason:
            prompt = chosen_reply = rejected_reply = ""
        else:
            prompt, chosen_reply, rejected_reply = split_hh_pair(chosen, rejected)
        if as_messages:
            # Dropped rows still need the same Arrow type as kept ones.
            prompt = transcript_to_messages(prompt) if not reason else [{"role": "", "content": ""}]
            chosen_reply = [{"role": "assistant", "content": chosen_reply.strip()}]
            rejected_reply = [{"role": "assistant", "content": rejected_reply.strip()}]
        out["prompt"].append(prompt)
        out["chosen"].append(chosen_reply)
        out["rejected"].append(rejected_reply)
        out["_opensloth_drop"].append(reason or "")
    return out


def build_hh_dataset(ds, as_messages: bool = False, name: str = "hh", source: str | None = None, num_proc=None):
    """Convert an HH dataset (``chosen``/``rejected`` transcripts) to preference pairs.

    Args:
        ds: ``datasets.Dataset`` with ``chosen`` and ``rejected`` string columns.
        as_messages: emit conversational pairs (``prompt`` as a list of
            messages, replies as one assistant message, whitespace stripped)
            instead of raw strings.
        name: label for the report.
        source: where the data came from, for error messages.

    Returns:
        ``(dataset, report)``; the dataset has ``prompt``, ``chosen``, ``rejected``.

    Raises:
        MissingColumnsError: ``chosen`` or ``rejected`` is missing.
        EmptyDatasetError: no pair survived.
    """
    require_columns(ds.column_names, ["chosen", "rejected"], "Anthropic HH data", source)
    converted = ds.map(
        _convert_batch,
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        fn_kwargs={"as_messages": as_messages},
        desc=f"Splitting {name} transcripts",
    )
    report = DropReport(name=name)
    reasons = converted["_opensloth_drop"]
    report.total_in = len(reasons)
    for position, reason in enumerate(reasons):
        if reason:
            report.drop(reason, position)
    if report.total_dropped:
        converted = converted.filter(lambda r: [not x for x in r], input_columns=["_opensloth_drop"], batched=True)
    converted = converted.remove_columns(["_opensloth_drop"])
    report.raise_if_empty("HH records need two transcripts that share the conversation up to a last Assistant turn.")
    return converted, report
