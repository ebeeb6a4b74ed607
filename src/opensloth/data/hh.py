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

Two parsers (``parser=``):

- ``shared_prefix`` (default), as above. Dropped and counted: a non-string
  field (``bad_structure``), transcripts that share no ``Assistant:`` turn
  (``no_assistant_turn``), a blank reply (``empty``), two identical replies
  (``identical_texts``). Counted but kept: transcripts that part before the
  last turn (``replies_span_turns``: the replies then hold several turns).
- ``reference``: the parser of the dynamic-DPO repositories. The prompt ends
  at the **last** ``"\n\nAssistant:"`` of ``chosen``; ``rejected`` must start
  with that prompt; one leading ``"\n"`` is cut from each reply; identical
  replies are **kept** (counted as ``identical_texts_kept``; their margin is 0
  for every model). Only ``chosen`` has its line ends normalised, as there.
  Where the reference crashes (no Assistant turn) or drops silently, this
  one drops and counts: ``no_assistant_turn``, ``diverging_transcripts``
  (``rejected`` does not continue the prompt, e.g. an ``Assistant:`` tag
  inside the chosen reply, or transcripts that part earlier),
  ``crlf_in_rejected`` (it would match after normalising its line ends), ``empty``.

Both count, for kept pairs: prompts with several Human turns
(``multi_turn``), replies that repeat the last human message
(``prompt_text_in_reply``: safe, the prompt is cut by a slice) and
``"\r\n"`` / ``"\r"`` line ends normalised to ``"\n"`` (``crlf_normalised``;
``shared_prefix`` normalises both transcripts, so ``prompt + chosen`` equals
the transcript only up to line ends there).
"""

from __future__ import annotations

import os
import re

from opensloth.data.errors import require_columns
from opensloth.data.report import (BAD_STRUCTURE, CRLF, CRLF_MISMATCH, DIVERGING, EMPTY, IDENTICAL, IDENTICAL_KEPT,
                                   MULTI_TURN, NO_ASSISTANT, PROMPT_IN_REPLY, REPLIES_SPAN_TURNS, DropReport)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_PARSERS = ("shared_prefix", "reference")

__all__ = ["ASSISTANT", "HH_PARSERS", "HUMAN", "build_hh_dataset", "hh_pair_problem", "parse_hh_record",
           "split_hh_pair", "split_hh_pair_reference", "transcript_to_messages"]


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


def split_hh_pair_reference(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The dynamic-DPO repositories' split: ``(prompt, chosen_reply, rejected_reply)``.

    ``chosen`` must already have its line ends normalised (``rejected`` is
    taken as it is, as there). Raises ValueError with a reason of
    :mod:`opensloth.data.report` as its message (``no_assistant_turn``,
    ``diverging_transcripts``).
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(NO_ASSISTANT)
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        raise ValueError(DIVERGING)
    chosen_reply, rejected_reply = chosen[len(prompt):], rejected[len(prompt):]
    return prompt, chosen_reply.removeprefix("\n"), rejected_reply.removeprefix("\n")


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_hh_record(chosen, rejected, parser: str = "shared_prefix") -> tuple[tuple[str, str, str] | None, str | None, list[str]]:
    """One HH record -> ``(pair or None, drop reason or None, notes)``.

    ``notes`` are the report's kept-record counters that apply
    (``multi_turn``, ``prompt_text_in_reply``, ``crlf_normalised``, ...).
    """
    if parser not in HH_PARSERS:
        raise ValueError(f"parser={parser!r} is not one of {HH_PARSERS}")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None, BAD_STRUCTURE, []
    notes = []
    if parser == "reference":
        normalised = _normalise(chosen)
        crlf = normalised != chosen
        try:
            pair = split_hh_pair_reference(normalised, rejected)
        except ValueError as exc:
            reason = str(exc)
            if reason == DIVERGING and rejected != _normalise(rejected):
                try:
                    split_hh_pair_reference(normalised, _normalise(rejected))
                    reason = CRLF_MISMATCH
                except ValueError:
                    pass
            return None, reason, []
    else:
        normalised_c, normalised_r = _normalise(chosen), _normalise(rejected)
        crlf = normalised_c != chosen or normalised_r != rejected
        try:
            pair = split_hh_pair(normalised_c, normalised_r)
        except ValueError:
            return None, NO_ASSISTANT, []
        if HUMAN in pair[1] or HUMAN in pair[2]:
            notes.append(REPLIES_SPAN_TURNS)
    prompt, chosen_reply, rejected_reply = pair
    if not prompt.strip() or not chosen_reply.strip() or not rejected_reply.strip():
        return None, EMPTY, []
    if chosen_reply == rejected_reply:
        if parser != "reference":
            return None, IDENTICAL, []
        notes.append(IDENTICAL_KEPT)
    if crlf:
        notes.append(CRLF)
    if prompt.count(HUMAN) > 1:
        notes.append(MULTI_TURN)
    last_human = prompt[prompt.rfind(HUMAN) + len(HUMAN):].rsplit(ASSISTANT, 1)[0].strip() if HUMAN in prompt else ""
    if last_human and (last_human in chosen_reply or last_human in rejected_reply):
        notes.append(PROMPT_IN_REPLY)
    return pair, None, notes


def hh_pair_problem(chosen, rejected, parser: str = "shared_prefix") -> str | None:
    """Why an HH record cannot become a preference pair, or None."""
    return parse_hh_record(chosen, rejected, parser)[1]


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


def _convert_batch(batch, as_messages: bool, parser: str):
    out = {"prompt": [], "chosen": [], "rejected": [], "_opensloth_drop": [], "_opensloth_notes": []}
    for chosen, rejected in zip(batch["chosen"], batch["rejected"]):
        pair, reason, notes = parse_hh_record(chosen, rejected, parser)
        prompt, chosen_reply, rejected_reply = pair or ("", "", "")
        out["_opensloth_notes"].append(",".join(notes))
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


def build_hh_dataset(ds, as_messages: bool = False, name: str = "hh", source: str | None = None, num_proc=None,
                     parser: str = "shared_prefix"):
    """Convert an HH dataset (``chosen``/``rejected`` transcripts) to preference pairs.

    Args:
        ds: ``datasets.Dataset`` with ``chosen`` and ``rejected`` string columns.
        as_messages: emit conversational pairs (``prompt`` as a list of
            messages, replies as one assistant message, whitespace stripped)
            instead of raw strings.
        name: label for the report.
        source: where the data came from, for error messages.
        parser: ``shared_prefix`` or ``reference`` (see the module doc).

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
        fn_kwargs={"as_messages": as_messages, "parser": parser},
        # Splitting is cheap; a cached result keyed on this function's code would outlive a change of the
        # reason names it reads from opensloth.data.report.
        load_from_cache_file=False,
        desc=f"Splitting {name} transcripts",
    )
    report = DropReport.from_reasons(name, converted["_opensloth_drop"])
    for notes in converted["_opensloth_notes"]:
        for what in filter(None, notes.split(",")):
            report.note(what)
    if report.total_dropped:
        converted = converted.filter(lambda r: [not x for x in r], input_columns=["_opensloth_drop"], batched=True)
    converted = converted.remove_columns(["_opensloth_drop", "_opensloth_notes"])
    report.raise_if_empty("HH records need two transcripts that share the conversation up to a last Assistant turn"
                          + (" (parser reference: rejected must start with chosen's prompt)." if parser == "reference"
                             else "."))
    return converted, report
