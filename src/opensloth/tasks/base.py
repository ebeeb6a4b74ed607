"""What every task family shares: the :class:`Task`, the answer line, sizes, and the :class:`TaskFamily` spec.

A task is a user prompt and one correct answer. Every assistant response ends
with a line ``Answer: <value>`` (:data:`ANSWER_PREFIX`), which is what
:func:`extract_answer` reads back. Pure Python (standard library only), driven
by a caller-owned ``random.Random``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable

ANSWER_PREFIX = "Answer:"

# Median and spread of the lognormal size (tokens of prompt + response).
SIZE_MEDIAN_TOKENS = 110
SIZE_SIGMA = 0.85
SIZE_MIN_TOKENS = 16
SIZE_MAX_TOKENS = 950
# Token budget of a whole conversation (before the chat template's markers).
CONVERSATION_MAX_TOKENS = 1000


@dataclass(frozen=True)
class Task:
    """One generated problem.

    Attributes:
        kind: one of :data:`opensloth.tasks.TASK_KINDS`.
        prompt: the user message.
        answer: the canonical final answer (what follows ``Answer:``).
        reasoning: worked steps shown before the answer line (may be empty).
    """

    kind: str
    prompt: str
    answer: str
    reasoning: str = ""

    @property
    def response(self) -> str:
        """The correct assistant reply: reasoning, then ``Answer: <answer>``."""
        return format_response(self.reasoning, self.answer)


def format_response(reasoning: str, answer: str) -> str:
    """Join ``reasoning`` and ``answer`` into a reply ending in the answer line."""
    line = f"{ANSWER_PREFIX} {answer}"
    return f"{reasoning}\n{line}" if reasoning else line


def sample_size(rng: random.Random) -> int:
    """Draw a target size in tokens from the clipped lognormal of the data."""
    size = rng.lognormvariate(math.log(SIZE_MEDIAN_TOKENS), SIZE_SIGMA)
    return int(min(max(size, SIZE_MIN_TOKENS), SIZE_MAX_TOKENS))


def fits(chars: int, lo: int, hi: int, per_unit: float, base: float) -> int:
    """How many units of ``per_unit`` chars fit in ``chars`` after ``base``."""
    return int(min(max(round((chars - base) / per_unit), lo), hi))


def jitter(rng: random.Random, n: int, lo: int, hi: int) -> int:
    # A little noise so that every size does not map to exactly one length.
    return min(max(n + rng.randint(-1, 1), lo), hi)


_ANSWER_RE = re.compile(r"answer\s*[:=]\s*(.*)", re.IGNORECASE)


def extract_answer(response: str) -> str | None:
    """Pull the final answer out of a free-form response.

    Takes the text after the last ``Answer:`` (case-insensitive) on its line;
    without one, falls back to the last whitespace-separated token.

    Returns:
        The raw answer text, or ``None`` for an empty response.
    """
    matches = [m.group(1).strip() for m in _ANSWER_RE.finditer(response)]
    matches = [m for m in matches if m]
    if matches:
        return matches[-1]
    tokens = response.split()
    return tokens[-1] if tokens else None


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: no whitespace, no wrapping quotes or final period, lower case."""
    text = re.sub(r"\s+", "", answer).strip()
    text = text.rstrip(".").strip("\"'`*").rstrip(".")
    return text.lower()


def wrong_number(rng: random.Random, value: int) -> int:
    delta = rng.choice((1, -1, 10, -10, 2, -2))
    return value + delta if value + delta >= 0 and value + delta != value else value + 1


@dataclass(frozen=True)
class TaskFamily:
    """One task family: how to make, recognise, solve and get wrong one of its tasks.

    Attributes:
        kind: the family's name (``Task.kind``).
        generate: ``(rng, chars) -> Task`` for a target size in characters.
        detect: matches the prompts of this family.
        detect_priority: families are tried in increasing priority, the most
            specific marker first (a ProntoQA prompt may contain any word; an
            arithmetic prompt only numbers).
        solve: ``prompt -> answer``, recomputed from the prompt text alone (the verifier).
        wrong_response: ``(rng, task) -> reply`` of the same shape with one slip and a wrong answer.
        tokens_per_char: tokens per character of the family's text with the tiny
            tokenizer (measured on the shipped data); generators size their
            output in characters and :func:`opensloth.tasks.make_task` converts a token size with it.
        max_size: rough largest size (tokens) the family reaches; a large size is
            only given to families that can grow that far.
        mixed: drawn by ``make_task(kind=None)`` (the mixed streams: tokenizer
            corpus, pretraining, preference pairs, mixed SFT records); ``False``
            for a family made only when asked for by name (``negate``, SFT data).
    """

    kind: str
    generate: Callable[[random.Random, int], Task]
    detect: re.Pattern
    detect_priority: int
    solve: Callable[[str], str]
    wrong_response: Callable[[random.Random, Task], str]
    tokens_per_char: float
    max_size: int
    mixed: bool = True
