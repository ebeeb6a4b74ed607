"""Synthetic task families with checkable answers: the text of the embedded default and the OaK tasks.

Everything here is pure Python (stdlib only) and driven by a caller-owned
``random.Random``, so the same seed gives the same tasks on every machine.
Each family is one :class:`~opensloth.tasks.base.TaskFamily` spec in the
registry :data:`~opensloth.tasks.registry.FAMILIES` (:mod:`~opensloth.tasks.arithmetic`,
:mod:`~opensloth.tasks.strings`, :mod:`~opensloth.tasks.lists`,
:mod:`~opensloth.tasks.prontoqa`, :mod:`~opensloth.tasks.negate`); :mod:`~opensloth.tasks.records` makes chat
and preference records of them and :mod:`~opensloth.tasks.task_data` the
prompt sets of an OaK-DPO run.
``scripts/make_sample_data.py`` turns these tasks into the shipped chat SFT and
preference files, and ``scripts/build_tiny_model.py`` trains the tiny
tokenizer on text made the same way.

A task is a user prompt and one correct answer. Every assistant response ends
with a line ``Answer: <value>`` (:data:`ANSWER_PREFIX`), which is what
:func:`extract_answer` reads back. The verifier :func:`check_answer` does not
need the :class:`Task` object: given only a prompt it recognises the kind and
recomputes the answer from the prompt text, so it can judge model rollouts.

Kinds (:data:`TASK_KINDS`):

- ``add``, ``sub``, ``mul``: small integer arithmetic, worked column by column
  (or by partial products) when the size allows.
- ``reverse``: reverse a string of letters, spelled out.
- ``sort``: sort a list of numbers or letters, ascending or descending.
- ``count``: count one letter in a string, with a running tally.
- ``sum_list``: sum a list of numbers with running totals (long samples).
- ``copy``: repeat a list exactly (long samples).
- ``prontoqa``: ProntoQA-style true/false reasoning over made-up categories
  ("Every wumpus is a yumpus. Max is a wumpus. True or false: Max is a
  yumpus.") with a short chain of thought.
- ``negate``: say the opposite of one such sentence ("Max is a wumpus." ->
  "Max is not a wumpus."). Made only when asked for by name (the SFT data),
  never by ``make_task(kind=None)``: it is not in :data:`MIXED_KINDS`.

Lengths: :func:`~opensloth.tasks.base.sample_size` draws a lognormal size in tokens; every
generator takes such a ``size`` and picks its parameters (digits, list length,
chain depth) so that prompt plus response come out near it. Sizes are counted
in tokens of the tiny tokenizer (``data/tiny-qwen3``, about 4 characters per
token for ProntoQA prose and 1.2 for digit lists) through a per-kind
characters-per-token estimate; any other tokenizer gives other counts. Mixed
kinds and multi-turn records then give roughly lognormal token lengths.
"""


from opensloth.tasks.base import (
    ANSWER_PREFIX,
    Task,
    TaskFamily,
    extract_answer,
    format_response,
    normalize_answer,
    sample_size,
)
from opensloth.tasks.records import make_conversation, make_preference_pair
from opensloth.tasks.registry import (
    FAMILIES,
    MIXED_KINDS,
    TASK_KINDS,
    check_answer,
    detect_kind,
    family,
    make_task,
    make_wrong_response,
    solve,
)

__all__ = [
    "ANSWER_PREFIX",
    "FAMILIES",
    "MIXED_KINDS",
    "TASK_KINDS",
    "Task",
    "TaskFamily",
    "check_answer",
    "detect_kind",
    "extract_answer",
    "family",
    "format_response",
    "make_conversation",
    "make_preference_pair",
    "make_task",
    "make_wrong_response",
    "normalize_answer",
    "sample_size",
    "solve",
]
