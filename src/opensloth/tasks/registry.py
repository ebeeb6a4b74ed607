"""The registry of task families: one :class:`~opensloth.tasks.base.TaskFamily` spec each.

A new family is a module with a ``TaskFamily(...)`` spec (generator,
detector, solver, wrong reply, size model) and one line in :data:`FAMILIES`.
Everything else -- :func:`make_task`, the verifier :func:`check_answer`,
:func:`make_wrong_response`, the rollout judge, the OaK task data -- goes
through the registry.

The order of :data:`FAMILIES` is part of the data: :func:`make_task` draws a
kind uniformly from its :data:`MIXED_KINDS`, so reordering changes every
generated dataset. A family with ``mixed=False`` (``negate``) is made only when
asked for by name and leaves the mixed streams unchanged.
"""

from __future__ import annotations

import random

from opensloth.tasks.arithmetic import ADD, MUL, SUB
from opensloth.tasks.base import Task, TaskFamily, extract_answer, normalize_answer, sample_size
from opensloth.tasks.lists import COPY, SORT, SUM_LIST
from opensloth.tasks.negate import NEGATE
from opensloth.tasks.prontoqa import PRONTOQA
from opensloth.tasks.strings import COUNT, REVERSE

FAMILIES: dict[str, TaskFamily] = {f.kind: f for f in (ADD, SUB, MUL, REVERSE, SORT, COUNT, SUM_LIST, COPY, PRONTOQA,
                                                        NEGATE)}
TASK_KINDS: tuple[str, ...] = tuple(FAMILIES)
# The kinds make_task(kind=None) draws from, in this order: every mixed stream (tokenizer corpus,
# pretraining, preference pairs, mixed SFT records) is made of these.
MIXED_KINDS: tuple[str, ...] = tuple(k for k, f in FAMILIES.items() if f.mixed)
# Prompts are matched against the most specific marker first.
_DETECTION_ORDER = sorted(FAMILIES.values(), key=lambda f: f.detect_priority)

__all__ = ["FAMILIES", "MIXED_KINDS", "TASK_KINDS", "check_answer", "detect_kind", "family", "make_task", "make_wrong_response",
           "solve"]


def family(kind: str) -> TaskFamily:
    """The spec of ``kind``; raises ValueError naming the known kinds."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}") from None


def make_task(rng: random.Random, kind: str | None = None, size: int | None = None) -> Task:
    """Generate one task.

    Args:
        rng: the random source (the caller owns the seed).
        kind: one of :data:`TASK_KINDS`; ``None`` picks one uniformly among the
            :data:`MIXED_KINDS` that can reach ``size``.
        size: target tokens of prompt plus response (approximate, see
            :mod:`opensloth.tasks`); ``None`` draws one with :func:`sample_size`.

    Returns:
        A :class:`Task`.

    Raises:
        ValueError: ``kind`` is not a known task kind.
    """
    if size is None:
        size = sample_size(rng)
    if kind is None:
        candidates = [k for k in MIXED_KINDS if FAMILIES[k].max_size >= size] or ["copy", "sum_list"]
        kind = rng.choice(candidates)
    spec = family(kind)
    return spec.generate(rng, int(size / spec.tokens_per_char))


def detect_kind(prompt: str) -> str:
    """Return the task kind a prompt was generated as.

    Raises:
        ValueError: the prompt matches no kind.
    """
    for spec in _DETECTION_ORDER:
        if spec.detect.search(prompt):
            return spec.kind
    raise ValueError(f"cannot tell the task kind of prompt {prompt[:80]!r}")


def solve(kind: str | None, prompt: str) -> str:
    """Recompute the correct answer of a generated prompt from its text alone.

    Args:
        kind: the task kind, or ``None`` to detect it from the prompt.
        prompt: the user message of a task.

    Returns:
        The canonical answer string (the same as ``Task.answer``).

    Raises:
        ValueError: the kind is unknown or the prompt cannot be parsed as it.
    """
    return family(kind or detect_kind(prompt)).solve(prompt)


def check_answer(task_or_kind: Task | str | None, prompt: str | None, response: str) -> bool:
    """Judge a response: does its final answer equal the correct one?

    Args:
        task_or_kind: a :class:`Task` (its ``answer`` is the reference and
            ``prompt`` may be ``None``), a kind name, or ``None`` to detect the
            kind from ``prompt``.
        prompt: the user message the response answers.
        response: the model's reply; the answer is read with
            :func:`extract_answer`.

    Returns:
        ``True`` when the normalized answers match.

    Raises:
        ValueError: no ``Task`` was given and the prompt cannot be solved.
    """
    if isinstance(task_or_kind, Task):
        expected = task_or_kind.answer
    else:
        if prompt is None:
            raise ValueError("check_answer needs the prompt when no Task is given")
        expected = solve(task_or_kind, prompt)
    got = extract_answer(response)
    return got is not None and normalize_answer(got) == normalize_answer(expected)


def make_wrong_response(rng: random.Random, task: Task) -> str:
    """A plausible but wrong reply to ``task``: the same shape, one slip.

    The slip is one a careless solver makes (a dropped carry, a missed letter,
    two swapped items, a flipped last inference), so the reply looks like the
    correct one and only its content is wrong.

    Returns:
        A response whose :func:`extract_answer` differs from ``task.answer``.
    """
    return family(task.kind).wrong_response(rng, task)
