"""A judge whose behaviour the OaK tests choose per launch (``OAK_TEST_JUDGE``); no tests of its own.

Passed to ``run_oak_dpo.py`` as ``--judge oak_scripted_judge:score`` with
``tests/`` on ``PYTHONPATH``. The judge spec stays the same across launches,
so a resumed run passes the run-record check while the judge misbehaves:

- ``ok``: distinct scores (the sample index), so every prompt with two
  different candidates becomes a pair;
- ``tie``: the same score for every candidate (no pair at all);
- ``garbage``: a non-numeric score.
"""

from __future__ import annotations

import os


def score(prompt: str, completions: list[str]):
    mode = os.environ.get("OAK_TEST_JUDGE", "ok")
    if mode == "garbage":
        return ["high"] * len(completions)
    if mode == "tie":
        return [0.5] * len(completions)
    return [float(i) for i in range(len(completions))]
