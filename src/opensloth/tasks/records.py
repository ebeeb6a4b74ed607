"""Records made of tasks: chat SFT conversations and preference pairs (the embedded default's data).

``scripts/make_sample_data.py`` writes the shipped files with these, and
``scripts/build_tiny_model.py`` trains the tiny tokenizer on text made the same way.
"""

from __future__ import annotations

import random

from opensloth.tasks.base import CONVERSATION_MAX_TOKENS, sample_size
from opensloth.tasks.registry import FAMILIES, make_task, make_wrong_response

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a careful assistant. Show your work, then give the final answer on a line starting with 'Answer:'.",
    "Solve each problem exactly. End with the final answer.",
    "You are a patient tutor who explains each step briefly.",
)
_FOLLOW_UP_PREFIXES = ("", "", "Next one. ", "Thanks! Now this: ", "Good. ", "One more: ")


def make_conversation(rng: random.Random, kind: str | None = None) -> dict:
    """One chat SFT record in the ``messages`` format of trl-lib/Capybara.

    About 30% carry a system message; 70% are one turn, 20% two and 10% three
    turns, each turn a fresh task (often of the same kind). Every assistant
    turn ends with ``Answer: <value>`` and is checkable against the user turn
    before it with :func:`check_answer`.

    Args:
        rng: the random source (the caller owns the seed).
        kind: make every turn this kind (e.g. ``"negate"``). ``None`` mixes the
            :data:`~opensloth.tasks.registry.MIXED_KINDS` and draws exactly what
            it drew before ``kind`` existed, so the shipped mixed streams are unchanged.

    Returns:
        ``{"messages": [{"role", "content"}, ...], "source": <kind of the first task>}``.
    """
    messages: list[dict] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_turns = rng.choices((1, 2, 3), weights=(0.7, 0.2, 0.1))[0]
    budget = CONVERSATION_MAX_TOKENS
    first_kind = None
    for turn in range(n_turns):
        size = sample_size(rng)
        if turn and size > budget:
            break
        turn_kind = kind
        if kind is None and first_kind is not None and rng.random() < 0.5:
            turn_kind = first_kind if FAMILIES[first_kind].max_size >= size else None
        task = make_task(rng, kind=turn_kind, size=size)
        first_kind = first_kind or task.kind
        prefix = rng.choice(_FOLLOW_UP_PREFIXES) if turn else ""
        messages.append({"role": "user", "content": prefix + task.prompt})
        messages.append({"role": "assistant", "content": task.response})
        budget -= size
    return {"messages": messages, "source": first_kind}


def make_preference_pair(rng: random.Random) -> dict:
    """One preference record in TRL's standard (string) form.

    Returns:
        ``{"prompt": user message, "chosen": correct reply with reasoning,
        "rejected": same-shaped reply with one slip and a wrong answer}``.
    """
    task = make_task(rng)
    return {"prompt": task.prompt, "chosen": task.response, "rejected": make_wrong_response(rng, task)}
