"""Prompt sets of an OaK-DPO run on the synthetic tasks: SFT chats, rollout prompts, held-out prompts.

``scripts/make_task_data.py`` writes them to disk with these helpers.
"""

from __future__ import annotations

import random
import re

from opensloth.errors import UserInputError
from opensloth.tasks.base import format_response
from opensloth.tasks.registry import make_task

__all__ = ["make_tasks", "reply"]

_NUMBER = re.compile(r"\d+")


def make_tasks(kind: str, n: int, seed: int, *, size: int, max_operand_digits: int | None = None,
               exclude: set[str] | None = None) -> list:
    """``n`` distinct-seeded tasks of one kind; optionally only operands of at most ``max_operand_digits``.

    Prompts in ``exclude`` are skipped (used to keep held-out prompts unseen).

    Raises:
        UserInputError: the filters leave too few tasks.
    """
    rng = random.Random(seed)
    exclude = exclude or set()
    tasks, tries = [], 0
    while len(tasks) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise UserInputError(f"could only make {len(tasks)} of {n} {kind} tasks with these filters "
                                 "(size / --max-operand-digits / held-out exclusion); relax them")
        task = make_task(rng, kind, size)
        if max_operand_digits is not None and any(len(x) > max_operand_digits for x in _NUMBER.findall(task.prompt)):
            continue
        if task.prompt in exclude:
            continue
        tasks.append(task)
    return tasks


def reply(task, response: str) -> str:
    """The assistant turn for SFT: the short answer line or the full worked reply."""
    return format_response("", task.answer) if response == "answer" else task.response
