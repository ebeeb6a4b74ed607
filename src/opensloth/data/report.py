"""Counting what each formatting stage drops, and what that means in steps.

:class:`DropReport` is filled by the format converters (chat, HH, judged,
preference) and printed by ``scripts/debug_dataset_size.py``. The step
arithmetic is a pure function so it can be checked against the samplers that
really shard the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from opensloth.data.errors import EmptyDatasetError

# Stage names every converter uses, in the order they apply.
BAD_STRUCTURE = "bad_structure"
EMPTY = "empty"
TIE = "tie"
SINGLE_CANDIDATE = "single_candidate"
IDENTICAL = "identical_texts"
IDENTICAL_TOKENS = "identical_after_truncation"  # chosen and rejected token ids equal once fitted
TOO_LONG = "too_long"
TRUNCATED = "truncated"  # kept, but shortened: not a drop
NO_ASSISTANT = "no_assistant_turn"
DIVERGING = "diverging_transcripts"
CRLF_MISMATCH = "crlf_in_rejected"
# Kept and counted (``DropReport.noted``): what a converter saw and handled.
MULTI_TURN = "multi_turn"
PROMPT_IN_REPLY = "prompt_text_in_reply"
CRLF = "crlf_normalised"
IDENTICAL_KEPT = "identical_texts_kept"
REPLIES_SPAN_TURNS = "replies_span_turns"


@dataclass
class DropReport:
    """How many records a conversion saw, dropped (by reason) and shortened.

    Attributes:
        name: what was converted, e.g. ``"chat train"``.
        total_in: records read.
        dropped: reason -> number of records removed for it.
        truncated: records kept but shortened to fit the length budget.
        examples: reason -> the first few positions dropped for it: line numbers
            when the records were read from a JSONL file, 0-based row indices otherwise.
        noted: what -> number of kept records with that property (multi-turn
            prompts, replies quoting the prompt, normalised line ends, ...).
        format: the name of the preference format that produced it, when known.
    """

    name: str
    total_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    examples: dict[str, list[int]] = field(default_factory=dict)
    noted: dict[str, int] = field(default_factory=dict)
    format: str | None = None  # the preference format that produced it, when known

    def note(self, what: str, n: int = 1) -> None:
        """Count ``n`` kept records with property ``what``."""
        if n:
            self.noted[what] = self.noted.get(what, 0) + n

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def total_out(self) -> int:
        return self.total_in - self.total_dropped

    @classmethod
    def from_reasons(cls, name: str, reasons) -> "DropReport":
        """A report of ``len(reasons)`` records where a non-empty ``reasons[i]`` dropped record ``i``."""
        report = cls(name=name, total_in=len(reasons))
        for position, reason in enumerate(reasons):
            if reason:
                report.drop(reason, position)
        return report

    def drop(self, reason: str, position: int | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if position is not None:
            seen = self.examples.setdefault(reason, [])
            if len(seen) < 5:
                seen.append(position)

    def merge(self, other: "DropReport") -> "DropReport":
        """Add the counts of ``other`` (e.g. the per-batch reports of a ``map``)."""
        self.total_in += other.total_in
        self.truncated += other.truncated
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        for reason, pos in other.examples.items():
            seen = self.examples.setdefault(reason, [])
            seen.extend(p for p in pos if len(seen) < 5)
        for what, n in other.noted.items():
            self.note(what, n)
        return self

    def summary(self) -> str:
        parts = [f"{self.name}: {self.total_in} in, {self.total_out} kept"]
        for reason, n in self.dropped.items():
            if n:
                parts.append(f"{n} dropped ({reason})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.noted:
            parts.append("counted: " + ", ".join(f"{n} {what}" for what, n in self.noted.items()))
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "total_in": self.total_in,
            "kept": self.total_out,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "noted": dict(self.noted),
        }

    def raise_if_empty(self, hint: str = "") -> None:
        """Raise :class:`EmptyDatasetError` when nothing survived."""
        if self.total_out <= 0:
            detail = ", ".join(f"{n} {r}" for r, n in self.dropped.items() if n) or "no records in the input"
            raise EmptyDatasetError(
                f"{self.name}: the dataset is empty after filtering ({self.total_in} read; {detail}). "
                + (hint or "Check the input format and the length limits.")
            )


def batches_per_rank(num_records: int, world_size: int, per_device_batch_size: int, drop_last: bool = False) -> int:
    """Batches one rank iterates per epoch under DDP.

    Mirrors accelerate's ``BatchSamplerShard`` with ``even_batches=True`` (the
    Trainer default): the sampler forms global batches of
    ``per_device_batch_size`` and deals them round-robin to the ranks; ranks
    left short reuse samples from the start so all ranks take the same number
    of batches.
    """
    _check_positive(world_size=world_size, per_device_batch_size=per_device_batch_size)
    if num_records < 0:
        raise ValueError(f"num_records={num_records} must be >= 0")
    if drop_last:
        num_batches = num_records // per_device_batch_size
        return num_batches // world_size
    num_batches = math.ceil(num_records / per_device_batch_size)
    return math.ceil(num_batches / world_size)


def expected_steps_per_epoch(
    num_records: int,
    world_size: int,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    drop_last: bool = False,
) -> int:
    """Optimizer steps per epoch, as ``transformers.Trainer`` counts them.

    ``ceil(batches_per_rank / gradient_accumulation_steps)``, at least 1 (the
    Trainer takes a last, shorter accumulation window).
    """
    _check_positive(gradient_accumulation_steps=gradient_accumulation_steps)
    batches = batches_per_rank(num_records, world_size, per_device_batch_size, drop_last)
    return max(math.ceil(batches / gradient_accumulation_steps), 1)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
