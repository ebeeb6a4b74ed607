"""Judged rollouts -> preference pairs (best candidate against worst).

Judged rollout JSONL schema (version 1)
=======================================

One line per prompt, a JSON object::

    {"id": "add-0007",                       # optional, any string or int
     "prompt": "Work out 21 + 8 step by step.",
     "candidates": [
         {"text": "Column by column ... Answer: 29", "score": 1.0},
         {"text": "21 + 8 = 28. Answer: 28",        "score": 0.0, "judge": "verifier"}
     ]}

- ``prompt`` (string, required): the text the candidates answer. For chat
  models it is the user message; the trainer applies the chat template.
- ``candidates`` (list, required): the sampled completions of that prompt.
  Each is an object with ``text`` (string, the completion without the prompt)
  and ``score`` (int or float, finite, higher is better). Other keys
  (``judge``, ``reasoning``, ``meta``, ...) are allowed and ignored.
- Any other top-level key is allowed and ignored, except ``id``, which is
  carried over to the pairs.

Conversion: the first candidate with the highest score becomes ``chosen``,
the first with the lowest score ``rejected``; both scores are kept
(``chosen_score``, ``rejected_score``). Skipped and counted in the report:
prompts with fewer than two non-blank candidates (``single_candidate``; or
``empty`` when blank candidates were discarded), prompts whose best and worst
scores are equal (``tie``), pairs whose texts are the same
(``identical_texts``), and blank prompts (``empty``).

A record that breaks the schema -- a missing key, a non-string text, a score
that is not a finite number (``"high"``, ``null``, ``true``, ``NaN``) -- is an
error naming the file and line: a judge that wrote garbage should stop the
run, not quietly thin out the data.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

from opensloth.data.errors import DatasetFormatError
from opensloth.data.report import DropReport, EMPTY, IDENTICAL, SINGLE_CANDIDATE, TIE
from opensloth.data.sources import _slice_dataset, load_records, read_jsonl, split_base

SCHEMA_VERSION = 1

__all__ = [
    "SCHEMA_VERSION",
    "build_judged_dataset",
    "judged_record_to_pair",
    "read_judged_jsonl",
    "validate_judged_record",
]


def validate_judged_record(record: dict, path: str | None = None, line: int | None = None) -> None:
    """Check one judged record against the schema.

    Raises:
        DatasetFormatError: naming ``path:line`` (or the row), the field and the value.
    """
    if not isinstance(record, dict):
        raise DatasetFormatError(f"expected a JSON object, got {type(record).__name__}", path, line)
    missing = [k for k in ("prompt", "candidates") if k not in record]
    if missing:
        raise DatasetFormatError(
            f"judged record needs keys ['prompt', 'candidates']; found {sorted(record)} (missing {missing})",
            path,
            line,
        )
    if not isinstance(record["prompt"], str):
        raise DatasetFormatError(f"'prompt' must be a string, got {type(record['prompt']).__name__}", path, line)
    candidates = record["candidates"]
    if not isinstance(candidates, list):
        raise DatasetFormatError(f"'candidates' must be a list, got {type(candidates).__name__}", path, line)
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict) or "text" not in cand or "score" not in cand:
            found = sorted(cand) if isinstance(cand, dict) else type(cand).__name__
            raise DatasetFormatError(f"candidate {i} needs keys ['text', 'score']; found {found}", path, line)
        if not isinstance(cand["text"], str):
            raise DatasetFormatError(
                f"candidate {i} 'text' must be a string, got {type(cand['text']).__name__}", path, line
            )
        score = cand["score"]
        numeric = isinstance(score, (int, float)) and not isinstance(score, bool)
        if not numeric or not math.isfinite(score):
            raise DatasetFormatError(
                f"candidate {i} has a non-numeric score {score!r}; scores must be finite numbers", path, line
            )


def judged_record_to_pair(record: dict) -> tuple[dict | None, str | None]:
    """Turn one valid judged record into a pair, or say why it is skipped.

    Returns:
        ``(pair, None)`` with keys ``prompt``, ``chosen``, ``rejected``,
        ``chosen_score``, ``rejected_score`` (and ``id`` when present), or
        ``(None, reason)``.
    """
    if not record["prompt"].strip():
        return None, EMPTY
    candidates = record["candidates"]
    usable = [c for c in candidates if c["text"].strip()]
    if len(usable) < 2:
        return None, EMPTY if len(candidates) >= 2 else SINGLE_CANDIDATE
    best = max(usable, key=lambda c: c["score"])  # max/min return the first of equals
    worst = min(usable, key=lambda c: c["score"])
    if best["score"] == worst["score"]:
        return None, TIE
    if best["text"] == worst["text"]:
        return None, IDENTICAL
    pair = {
        "prompt": record["prompt"],
        "chosen": best["text"],
        "rejected": worst["text"],
        "chosen_score": float(best["score"]),
        "rejected_score": float(worst["score"]),
    }
    if "id" in record:
        pair["id"] = str(record["id"])
    return pair, None


def read_judged_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each judged record, validated.

    Raises:
        DatasetFormatError: malformed JSON or a schema violation, naming ``path:line``.
    """

    for line, record in read_jsonl(path):
        validate_judged_record(record, path, line)
        yield line, record


def pairs_from_records(records: Iterable[tuple[int, dict]], name: str) -> tuple[list[dict], DropReport]:
    """Convert ``(position, record)`` items to pairs, counting the skips."""
    report = DropReport(name=name)
    pairs = []
    for position, record in records:
        report.total_in += 1
        pair, reason = judged_record_to_pair(record)
        if reason:
            report.drop(reason, position)
        else:
            pairs.append(pair)
    return pairs, report


def build_judged_dataset(source, split: str = "train", name: str | None = None):
    """Load judged rollouts and return ``(dataset, report)`` of best-vs-worst pairs.

    Args:
        source: a judged ``.jsonl`` file (errors then name the line), or
            anything :func:`opensloth.data.sources.load_records` accepts, or a
            ``datasets.Dataset`` with ``prompt`` and ``candidates`` columns
            (errors then name the row, 1-based).
        split: split for sources read through ``load_records``; for a
            ``.jsonl`` file, slicing such as ``train[:10%]`` applies to the pairs.

    Raises:
        DatasetFormatError: a record breaks the schema (see the module doc).
        EmptyDatasetError: no pair survived.
    """
    import datasets

    if isinstance(source, str) and source.endswith(".jsonl"):
        label = name or f"judged {source}"
        pairs, report = pairs_from_records(read_judged_jsonl(source), label)
        report.raise_if_empty("Judged prompts need at least two candidates with different scores.")
        ds = datasets.Dataset.from_list(pairs)
        if "[" in split or "+" in split:
            ds = _slice_dataset(split, {split_base(split): ds})
        return ds, report

    ds = source if isinstance(source, datasets.Dataset) else load_records(source, split)
    where = source if isinstance(source, str) else "dataset"
    label = name or f"judged {where}"

    def rows():
        for row_number, record in enumerate(ds, start=1):
            validate_judged_record(record, f"{where} row {row_number}")
            yield row_number - 1, record

    pairs, report = pairs_from_records(rows(), label)
    report.raise_if_empty("Judged prompts need at least two candidates with different scores.")
    return datasets.Dataset.from_list(pairs), report
