"""README's two fresh-machine commands stay true: CI runs the second one verbatim."""

from __future__ import annotations

import re

from helpers import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks[:2] for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_starts_with_two_commands():
    first, second = _readme_commands()[:2]
    assert "scripts/setup_env.sh" in first and "torchrun --nproc_per_node=2 train_scripts/train_configurable.py" in first
    assert "scripts/setup_env.sh" in second and "pytest" in second


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci, f"README test command {test_cmd!r} is not what .ci/run runs"
