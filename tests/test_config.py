"""opensloth.config: dataclass fields -> typed flags and YAML sections, one overlay rule (defaults < YAML < flags)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from opensloth.config import Section, add_config_flags, build, resolve, setting
from opensloth.errors import UserInputError


@dataclass(frozen=True)
class Run:
    learning_rate: float = setting(1e-4, "peak learning rate")
    max_steps: int = setting(-1, "optimizer steps")
    name: str = setting("run", "run name")
    mode: str = setting("a", "mode", choices=("a", "b"))
    limit: int | None = setting(None, "optional limit")
    no_patches: bool = setting(False, "switch")
    modules: tuple[str, ...] = setting(("q", "k"), "module names")

    def __post_init__(self):
        if self.max_steps == 0:
            raise UserInputError("max_steps=0 trains nothing; use -1 or >= 1")


@dataclass(frozen=True)
class Inner:
    alpha: float = setting(0.5, "a rate")

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must lie in [0, 1]")


SECTIONS = (Section(None, Run), Section("inner", Inner, aliases={"alpha": ["--alpha"]}))


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_flags(p, SECTIONS)
    return p.parse_args(argv)


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_then_yaml_then_flags(tmp_path):
    cfg = _yaml(tmp_path, "learning_rate: 2e-5\nmax_steps: 10\nmodules: [v]\ninner:\n  alpha: 0.25\n")
    run, inner = resolve(_parse(["--config", cfg, "--max_steps", "3", "--no_patches"]), SECTIONS)
    assert run == Run(learning_rate=2e-5, max_steps=3, no_patches=True, modules=("v",))
    assert inner.alpha == 0.25
    run, inner = resolve(_parse(["--alpha", "0.75", "--modules", "x", "y", "--limit", "4"]), SECTIONS)
    assert (run, inner) == (Run(limit=4, modules=("x", "y")), Inner(0.75))  # no YAML: defaults < flags


def test_yaml_values_are_typed_by_the_field(tmp_path):
    # PyYAML reads these as strings or ints; the fields get floats and ints.
    cfg = _yaml(tmp_path, "learning_rate: 5e-7\nmax_steps: 2.0\nlimit: null\ninner:\n  alpha: 1\n")
    run, inner = resolve(_parse(["--config", cfg]), SECTIONS)
    assert run.learning_rate == 5e-7 and type(run.learning_rate) is float
    assert run.max_steps == 2 and type(run.max_steps) is int and run.limit is None
    assert inner.alpha == 1.0 and type(inner.alpha) is float


@pytest.mark.parametrize("text, message", [
    ("learning_rate: abc\n", "run.yaml: learning_rate: 'abc' is not a number"),
    ("max_steps: 2.5\n", "run.yaml: max_steps: 2.5 is not an integer"),
    ("no_patches: 'yes'\n", "run.yaml: no_patches: 'yes' is not true or false"),
    ("name: 3\n", "run.yaml: name: 3 is not a string"),
    ("mode: c\n", r"run.yaml: mode: 'c' is not one of \['a', 'b'\]"),
    ("max_steps: null\n", "run.yaml: max_steps: a value is required"),
    ("inner:\n  alpha: x\n", "run.yaml: inner.alpha: 'x' is not a number"),
    ("learning_rat: 0.1\n", r"unknown keys \['learning_rat'\] in .*run.yaml; known: .*learning_rate.*inner:"),
    ("inner:\n  beta: 1\n", r"unknown keys \['beta'\] in 'inner:' of .*run.yaml; known: \['alpha'\]"),
    ("inner: 3\n", "'inner:' of .*run.yaml must be a mapping"),
    ("max_steps: 0\n", "max_steps=0 trains nothing"),  # the dataclass's own validation
    ("inner:\n  alpha: 2\n", r"'inner:' of .*run.yaml: alpha=2.0 must lie in \[0, 1\]"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [1\n", "run.yaml: line 2 is not valid YAML"),
])
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(UserInputError, match=message) as info:
        resolve(_parse(["--config", _yaml(tmp_path, text)]), SECTIONS)
    assert "\n" not in str(info.value)


def test_missing_file_and_a_section_that_ignores_other_keys(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        resolve(_parse(["--config", str(tmp_path / "nope.yaml")]), SECTIONS)
    # A script that reads one section of a shared file leaves the other keys alone.
    cfg = _yaml(tmp_path, "learning_rate: 0.1\nother: 1\ninner:\n  alpha: 0.1\n")
    (inner,) = resolve({"config": cfg}, (Section("inner", Inner),), ignore_other_keys=True)
    assert inner.alpha == 0.1


def test_flags_are_generated_with_help_defaults_and_types():
    p = argparse.ArgumentParser()
    add_config_flags(p, SECTIONS)
    text = p.format_help()
    for flag in ("--learning_rate", "--max_steps", "--no_patches", "--modules", "--inner.alpha", "--alpha", "--config"):
        assert flag in text
    assert "peak learning rate (default: 0.0001)" in text
    assert vars(p.parse_args([])) == {"config": None}  # nothing given: every field stays "not given"
    with pytest.raises(SystemExit):
        p.parse_args(["--max_steps", "x"])
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


def test_build_rejects_unknown_keys_listing_the_known_ones():
    with pytest.raises(UserInputError, match=r"unknown keys \['x'\] in here; known: \['alpha'\]"):
        build(Inner, {"x": 1}, "here")
    assert build(Inner, {"alpha": "0.5"}, "here") == Inner(0.5)
