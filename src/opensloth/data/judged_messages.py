"""Judged rollouts in the ``prompt_messages`` schema (dynamic-dpo-v1's ``rollout_judged.jsonl``) -> pairs.

One object per prompt::

    {"prompt_messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."},
                         {"role": "user", "content": "..."}],
     "chosen":   [{"role": "assistant", "content": "<best candidate>"}],
     "rejected": [{"role": "assistant", "content": "<worst candidate>"}],
     "metadata": {...}}                                  # ignored

The reward model has already picked best and worst. Conversion, as the
reference loader does it:

- ``prompt_messages``: ``user`` / ``assistant`` messages with non-blank
  content (line ends normalised, whitespace stripped); other roles (system)
  are left out. The last one must be a ``user`` turn.
- ``chosen`` / ``rejected``: a string, a ``{"content"}`` object, or a list of
  messages (``assistant`` or no role; contents joined with a blank line),
  stripped.
- Plain text (default): the prompt becomes the HH-style string
  ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` and the
  replies follow it directly (no space), as there. ``as_messages``: the
  prompt messages and one assistant message per reply, for the tokenizer's
  chat template.

Dropped and counted: no usable prompt message (``empty``), a prompt that does
not end with a user turn or a field of the wrong type (``bad_structure``), a
blank reply (``empty``). Identical replies are dropped (``identical_texts``),
or kept and counted with the reference parser (``identical_texts_kept``).

``{prompt_messages, responses}`` rows (the unjudged ``rollout_responses.jsonl``
beside it) carry no scores and are refused by the format registry.
"""

from __future__ import annotations

from opensloth.data.errors import require_columns
from opensloth.data.report import BAD_STRUCTURE, EMPTY, IDENTICAL, IDENTICAL_KEPT, MULTI_TURN, DropReport

__all__ = ["build_judged_messages_dataset", "judged_messages_record", "messages_to_hh_prompt", "reply_text"]

_ROLES = {"user": "Human", "assistant": "Assistant"}


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def reply_text(reply) -> str | None:
    """The text of a ``chosen`` / ``rejected`` field (string, message, or list of messages); None if malformed."""
    if isinstance(reply, str):
        return _clean(reply)
    if isinstance(reply, dict):
        content = reply.get("content")
        return _clean(content) if isinstance(content, str) else None
    if isinstance(reply, list):
        parts = []
        for message in reply:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                return None
            if message.get("role") in (None, "assistant"):
                parts.append(_clean(message["content"]))
        return "\n\n".join(p for p in parts if p)
    return None


def messages_to_hh_prompt(messages: list[dict]) -> str:
    """``[{user a}, {assistant b}, {user c}]`` -> ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"``."""
    return "".join(f"\n\n{_ROLES[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def judged_messages_record(record: dict, keep_identical: bool = False):
    """``(prompt_messages, chosen_text, rejected_text)`` of one record, or ``(None, reason)``-style failure.

    Returns:
        ``(result, reason)``: ``result`` is the triple or None; ``reason`` a drop reason or None.
    """
    raw = record.get("prompt_messages")
    if not isinstance(raw, list):
        return None, BAD_STRUCTURE
    messages = []
    for message in raw:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return None, BAD_STRUCTURE
        content = _clean(message["content"])
        if message.get("role") in _ROLES and content:
            messages.append({"role": message["role"], "content": content})
    if not messages:
        return None, EMPTY
    if messages[-1]["role"] != "user":
        return None, BAD_STRUCTURE
    chosen, rejected = reply_text(record.get("chosen")), reply_text(record.get("rejected"))
    if chosen is None or rejected is None:
        return None, BAD_STRUCTURE
    if not chosen or not rejected:
        return None, EMPTY
    if chosen == rejected and not keep_identical:
        return None, IDENTICAL
    return (messages, chosen, rejected), None


def build_judged_messages_dataset(ds, *, as_messages: bool = False, name: str = "judged prompt_messages",
                                  source: str | None = None, keep_identical: bool = False):
    """Convert ``prompt_messages`` judged rollouts to ``prompt`` / ``chosen`` / ``rejected``.

    Returns:
        ``(dataset, report)``.

    Raises:
        MissingColumnsError: ``prompt_messages``, ``chosen`` or ``rejected`` is missing.
        EmptyDatasetError: no pair survived.
    """
    import datasets

    require_columns(ds.column_names, ["prompt_messages", "chosen", "rejected"], "judged prompt_messages rollouts",
                    source)
    report = DropReport(name=name)
    rows = []
    for position, record in enumerate(ds):
        report.total_in += 1
        result, reason = judged_messages_record(record, keep_identical)
        if reason:
            report.drop(reason, position)
            continue
        messages, chosen, rejected = result
        if chosen == rejected:
            report.note(IDENTICAL_KEPT)
        if sum(m["role"] == "user" for m in messages) > 1:
            report.note(MULTI_TURN)
        if as_messages:
            rows.append({"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": messages_to_hh_prompt(messages), "chosen": chosen, "rejected": rejected})
    report.raise_if_empty("prompt_messages rows need a prompt ending with a user turn and non-blank chosen / "
                          "rejected replies.")
    return datasets.Dataset.from_list(rows), report
