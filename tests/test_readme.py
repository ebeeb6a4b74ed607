"""README's two fresh-machine commands stay true: CI runs both verbatim, in README's order."""

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


def test_ci_runs_the_readme_commands_in_order_and_checks_data_is_untouched():
    main_cmd, test_cmd = _readme_commands()[:2]
    ci = (REPO / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in ci.splitlines()]
    assert main_cmd in lines, f"README main command {main_cmd!r} is not what .ci/run runs"
    assert test_cmd in lines, f"README test command {test_cmd!r} is not what .ci/run runs"
    check = next(i for i, ln in enumerate(lines) if "git status --porcelain" in ln and "data" in ln)
    assert lines.index(main_cmd) < check < lines.index(test_cmd), "main job, then the data/ check, then the tests"
