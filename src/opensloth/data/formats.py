"""The registry of preference-data formats: one :class:`PreferenceFormat` spec each.

Every format turns its records into ``prompt`` / ``chosen`` / ``rejected``
(what TRL's ``DPOTrainer`` reads) plus a :class:`~opensloth.data.report.DropReport`.
:func:`opensloth.data.preference.load_preference_dataset` picks the format
(``fmt="auto"``: the first spec, in ``priority`` order, whose columns are
present and whose ``accepts`` check passes on the first row) and runs it.

A new format is one ``PreferenceFormat(...)`` added to :data:`PREFERENCE_FORMATS`
below, with its converter in its own module.

==============  =====================================================  ==================================
name            records                                                converter
==============  =====================================================  ==================================
``judged``      ``prompt`` + scored ``candidates`` (our rollout JSONL)  :mod:`opensloth.data.judged`
``pairs``       ``prompt`` / ``chosen`` / ``rejected`` (strings or      :mod:`opensloth.data.pairs`
                message lists)
``chat_pairs``  ``chosen`` / ``rejected`` conversations sharing all     :mod:`opensloth.data.pairs`
                but the last assistant reply
``hh``          Anthropic HH ``chosen`` / ``rejected`` transcripts      :mod:`opensloth.data.hh`
``prepared``    a folder written by ``precompute_dataset.py``           :mod:`opensloth.cache.store`
==============  =====================================================  ==================================
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
        convert: ``(dataset, *, name, source, split, as_messages) -> (pairs, report)``.
        accepts: a check on the first row after the columns matched (e.g.
            strings versus message lists); default: any row.
        claims_path: recognises a path of this format before it is read as a
            table (a judged JSONL file is read line by line, so errors name the line).
        load_path: ``(path, *, name, split, as_messages) -> (pairs, report)`` for a claimed path.
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


def _judged(ds, *, name, source, split, as_messages):
    return build_judged_dataset(ds, split, name=name)


def _judged_path(path, *, name, split, as_messages):
    return build_judged_dataset(path, split, name=name)


def _is_judged_jsonl(path: str) -> bool:
    if not (os.path.isfile(path) and path.endswith(".jsonl")):
        return False
    first = next(read_jsonl(path), (0, {}))[1]
    return "candidates" in first


def _pairs(ds, *, name, source, split, as_messages):
    return check_pairs(ds, name, source)


def _chat_pairs(ds, *, name, source, split, as_messages):
    return build_chat_pairs_dataset(ds, name=name, source=source)


def _hh(ds, *, name, source, split, as_messages):
    return build_hh_dataset(ds, as_messages=as_messages, name=name, source=source)


def _is_prepared_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def _prepared_path(path, *, name, split, as_messages):
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as fh:
        source = (json.load(fh).get("source") or {}).get("dataset")
    hint = f" (it was made from --dataset {source!r}; pass that)" if source else ""
    raise DatasetFormatError(
        f"{path} holds pairs already tokenized by precompute_dataset.py; DPO tokenizes with TRL from text, "
        f"so pass the raw preference data{hint}"
    )


def _conversations(row: dict) -> bool:
    return isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)


PREFERENCE_FORMATS: dict[str, PreferenceFormat] = {f.name: f for f in (
    PreferenceFormat("judged", "judged rollouts: prompt + scored candidates, best vs worst", ("prompt", "candidates"),
                     10, _judged, claims_path=_is_judged_jsonl, load_path=_judged_path),
    PreferenceFormat("pairs", "prompt / chosen / rejected (strings or message lists)",
                     ("prompt", "chosen", "rejected"), 20, _pairs),
    PreferenceFormat("chat_pairs", "chosen / rejected conversations that differ in the last assistant reply",
                     ("chosen", "rejected"), 30, _chat_pairs, accepts=_conversations),
    PreferenceFormat("hh", "Anthropic HH transcripts: chosen / rejected strings", ("chosen", "rejected"), 40, _hh),
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
    """
    cols = set(column_names)
    for spec in sorted(PREFERENCE_FORMATS.values(), key=lambda f: f.priority):
        if spec.convert is not None and set(spec.columns) <= cols and spec.accepts(first_row or {}):
            return spec.name
    raise MissingColumnsError(
        "preference data (" + ", ".join(f.name for f in PREFERENCE_FORMATS.values() if f.convert) + ")",
        ["prompt", "chosen", "rejected"], list(column_names))
