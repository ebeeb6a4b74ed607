"""The registry of preference-data formats: one :class:`PreferenceFormat` spec each.

Every format turns its records into ``prompt`` / ``chosen`` / ``rejected``
(what TRL's ``DPOTrainer`` reads) plus a :class:`~opensloth.data.report.DropReport`.
:func:`opensloth.data.preference.load_preference_dataset` picks the format
(``fmt="auto"``: the first spec, in ``priority`` order, whose columns are
present and whose ``accepts`` check passes on the first row) and runs it.

A new format is one ``PreferenceFormat(...)`` added to :data:`PREFERENCE_FORMATS`
below, with its converter in its own module.

===================  ================================================  ==================================
name                 records                                           converter
===================  ================================================  ==================================
``judged_messages``  ``prompt_messages`` + picked ``chosen`` /         :mod:`opensloth.data.judged_messages`
                     ``rejected`` (dynamic-dpo-v1's judged rollouts)
``unjudged``         ``prompt_messages`` + ``responses``: no scores,   refused with the fix
                     not preference data
``judged``           ``prompt`` + scored ``candidates`` (our rollout   :mod:`opensloth.data.judged`
                     JSONL)
``pairs``            ``prompt`` / ``chosen`` / ``rejected`` (strings   :mod:`opensloth.data.pairs`
                     or message lists)
``chat_pairs``       ``chosen`` / ``rejected`` conversations sharing   :mod:`opensloth.data.pairs`
                     all but the last assistant reply
``hh``               Anthropic HH ``chosen`` / ``rejected``            :mod:`opensloth.data.hh`
                     transcripts (strings)
``prepared``         a folder written by ``precompute_dataset.py``     :mod:`opensloth.cache.store`
===================  ================================================  ==================================

Converters take ``(dataset, *, name, source, split, as_messages, hh_parser)``;
``hh_parser`` (``shared_prefix`` or ``reference``) picks the HH parser; with
``reference``, HH and ``prompt_messages`` rows keep identical replies (counted),
as the dynamic-DPO repositories do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from opensloth.cache.store import METADATA_FILE
from opensloth.data.errors import DatasetFormatError, MissingColumnsError
from opensloth.data.hh import build_hh_dataset
from opensloth.data.judged import build_judged_dataset
from opensloth.data.judged_messages import build_judged_messages_dataset
from opensloth.data.pairs import build_chat_pairs_dataset, check_pairs
from opensloth.data.sources import read_jsonl

__all__ = ["PREFERENCE_FORMATS", "PreferenceFormat", "detect_preference_format", "format_names"]


@dataclass(frozen=True)
class PreferenceFormat:
    """One preference-data format.

    Attributes:
        name: what ``--preference_format`` / ``fmt=`` call it.
        summary: one line for help texts and error messages.
        columns: columns a dataset of this format has (used by auto-detection).
        priority: auto-detection tries formats in increasing priority.
        convert: ``(dataset, *, name, source, split, as_messages, hh_parser) -> (pairs, report)``.
        accepts: a check on the first row after the columns matched (e.g.
            strings versus message lists); default: any row.
        claims_path: recognises a path of this format before it is read as a
            table (a judged JSONL file is read line by line, so errors name the line).
        load_path: ``(path, *, name, split, as_messages, hh_parser) -> (pairs, report)`` for a claimed path.
        tokenized: the format already holds token ids (prepared folders).
    """

    name: str
    summary: str
    columns: tuple[str, ...]
    priority: int
    convert: Callable | None
    accepts: Callable[[dict], bool] = lambda row: True
    claims_path: Callable[[str], bool] | None = None
    load_path: Callable | None = None
    tokenized: bool = False


# --------------------------------------------------------------------------- converters


def _judged_messages(ds, *, name, source, split, as_messages, hh_parser):
    return build_judged_messages_dataset(ds, as_messages=as_messages, name=name, source=source,
                                         keep_identical=hh_parser == "reference")


def _unjudged(ds, *, name, source, split, as_messages, hh_parser):
    raise DatasetFormatError(
        f"{source or 'the dataset'} holds unjudged rollouts (columns {sorted(ds.column_names)}: prompt_messages + "
        "responses, no scores), not preference pairs; judge them first (their rollout_judged.jsonl, with chosen "
        "/ rejected per prompt, or opensloth's rollout.py --judge) and pass the judged file")


def _judged(ds, *, name, source, split, as_messages, hh_parser):
    return build_judged_dataset(ds, split, name=name)


def _judged_path(path, *, name, split, as_messages, hh_parser):
    return build_judged_dataset(path, split, name=name)


def _is_judged_jsonl(path: str) -> bool:
    if not (os.path.isfile(path) and path.endswith(".jsonl")):
        return False
    first = next(read_jsonl(path), (0, {}))[1]
    return "candidates" in first


def _pairs(ds, *, name, source, split, as_messages, hh_parser):
    return check_pairs(ds, name, source)


def _chat_pairs(ds, *, name, source, split, as_messages, hh_parser):
    return build_chat_pairs_dataset(ds, name=name, source=source)


def _hh(ds, *, name, source, split, as_messages, hh_parser):
    return build_hh_dataset(ds, as_messages=as_messages, name=name, source=source, parser=hh_parser)


def _is_prepared_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def _prepared_path(path, *, name, split, as_messages, hh_parser):
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as fh:
        source = (json.load(fh).get("source") or {}).get("dataset")
    hint = f" (it was made from --dataset {source!r}; pass that)" if source else ""
    raise DatasetFormatError(
        f"{path} holds pairs already tokenized by precompute_dataset.py; DPO tokenizes with TRL from text, "
        f"so pass the raw preference data{hint}"
    )


def _conversations(row: dict) -> bool:
    return isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)


def _transcripts(row: dict) -> bool:
    return isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)


PREFERENCE_FORMATS: dict[str, PreferenceFormat] = {f.name: f for f in (
    PreferenceFormat("judged_messages", "judged rollouts: prompt_messages + the picked chosen / rejected replies",
                     ("prompt_messages", "chosen", "rejected"), 5, _judged_messages),
    PreferenceFormat("unjudged", "unjudged rollouts: prompt_messages + responses (no scores; refused)",
                     ("prompt_messages", "responses"), 6, _unjudged),
    PreferenceFormat("judged", "judged rollouts: prompt + scored candidates, best vs worst", ("prompt", "candidates"),
                     10, _judged, claims_path=_is_judged_jsonl, load_path=_judged_path),
    PreferenceFormat("pairs", "prompt / chosen / rejected (strings or message lists)",
                     ("prompt", "chosen", "rejected"), 20, _pairs),
    PreferenceFormat("chat_pairs", "chosen / rejected conversations that differ in the last assistant reply",
                     ("chosen", "rejected"), 30, _chat_pairs, accepts=_conversations),
    PreferenceFormat("hh", "Anthropic HH transcripts: chosen / rejected strings", ("chosen", "rejected"), 40, _hh,
                     accepts=_transcripts),
    PreferenceFormat("prepared", "a folder written by precompute_dataset.py (token ids)", ("prompt_ids",), 50, None,
                     claims_path=_is_prepared_folder, load_path=_prepared_path, tokenized=True),
)}


def format_names() -> tuple[str, ...]:
    """``("auto", "judged", "pairs", ...)``: the values ``fmt=`` accepts."""
    return ("auto", *PREFERENCE_FORMATS)


def detect_preference_format(column_names: Sequence[str], first_row: dict | None = None) -> str:
    """The name of the first format (by priority) whose columns are present and that accepts ``first_row``.

    Raises:
        MissingColumnsError: the columns fit none of the formats.
        DatasetFormatError: the columns fit a format but the first row does
            not (e.g. ``chosen`` neither a transcript string nor a message list);
            the message names the columns and the types it saw.
    """
    cols = set(column_names)
    candidates = [spec for spec in sorted(PREFERENCE_FORMATS.values(), key=lambda f: f.priority)
                  if spec.convert is not None and set(spec.columns) <= cols]
    for spec in candidates:
        if spec.accepts(first_row or {}):
            return spec.name
    if candidates:
        seen = {k: type(v).__name__ for k, v in (first_row or {}).items()}
        raise DatasetFormatError(
            f"saw columns {sorted(cols)} with first-row types {seen}: the columns fit "
            f"{[s.name for s in candidates]} but the values do not ("
            + "; ".join(f"{s.name}: {s.summary}" for s in candidates) + ")")
    raise MissingColumnsError(
        "preference data (" + ", ".join(f.name for f in PREFERENCE_FORMATS.values() if f.convert) + ")",
        ["prompt", "chosen", "rejected"], list(column_names))
