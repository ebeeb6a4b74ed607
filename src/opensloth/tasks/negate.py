"""Negation: say the opposite of one ProntoQA-style statement ("Max is a wumpus." -> "Max is not a wumpus.").

The reply copies the statement's name and concepts and adds "not" after
"is", or removes it. The family is SFT data only: it is not in
:data:`~opensloth.tasks.registry.MIXED_KINDS`, so ``make_task(kind=None)``
never draws it and the embedded base (pretrained on mixed text) has never
seen it. The base answers it wrong and the default 125-step LoRA SFT teaches
it, which is what makes that run's learning visible (data/README.md).
"""

from __future__ import annotations

import random
import re

from opensloth.tasks.base import Task, TaskFamily, format_response
from opensloth.tasks.prontoqa import _CONCEPTS, _NAMES, _a

_NEGATE_TEMPLATES = ("Negate this statement: {s}", "Write the opposite of this statement: {s}",
                     "Say the opposite: {s}")
_NEGATE_RE = re.compile(r"(?:[Nn]egate this statement|[Ww]rite the opposite of this statement|[Ss]ay the opposite):"
                        r" *([^\n]+)")


def negate_statement(statement: str) -> str:
    """``"X is a y."`` <-> ``"X is not a y."`` (the first ``is`` of the statement)."""
    if " is not " in statement:
        return statement.replace(" is not ", " is ", 1)
    return statement.replace(" is ", " is not ", 1)


def _gen_negate(rng: random.Random, chars: int) -> Task:
    # One sentence whatever the size: the family stays short (max_size), so a
    # mixed size never reaches it and make_conversation keeps it to one sentence per turn.
    subject_concept, concept = rng.sample(_CONCEPTS, 2)
    negated = rng.random() < 0.5
    subject = rng.choice(_NAMES) if rng.random() < 0.5 else f"Every {subject_concept}"
    statement = f"{subject} is {'not ' if negated else ''}{_a(concept)}."
    return Task("negate", rng.choice(_NEGATE_TEMPLATES).format(s=statement), negate_statement(statement))


def _solve_negate(prompt: str) -> str:
    m = _NEGATE_RE.search(prompt)
    if not m or " is " not in m.group(1):
        raise ValueError(f"negate prompt has no '<instruction>: <X> is [not] a <y>.' statement: {prompt[:80]!r}")
    return negate_statement(m.group(1).strip())


def _wrong_negate(rng: random.Random, task: Task) -> str:
    # The slip: the statement repeated unchanged.
    return format_response(task.reasoning, negate_statement(task.answer))


NEGATE = TaskFamily("negate", _gen_negate, _NEGATE_RE, 0, _solve_negate, _wrong_negate, tokens_per_char=0.25,
                    max_size=20, mixed=False)
