"""scripts/build_tiny_model.py rebuilds exactly the shipped data/tiny-qwen3."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, TINY_MODEL, run


@pytest.mark.slow
@pytest.mark.heavy
def test_build_script_reproduces_shipped_model(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "tiny"
    proc = run(["python", "scripts/build_tiny_model.py", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped, rebuilt = load_file(TINY_MODEL / "model.safetensors"), load_file(out / "model.safetensors")
    assert shipped.keys() == rebuilt.keys()
    for name in shipped:
        assert shipped[name].equal(rebuilt[name]), f"weight {name} differs from the shipped model"
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_text() == (TINY_MODEL / name).read_text(), f"{name} differs"
    assert json.loads((out / "config.json").read_text()) == json.loads((TINY_MODEL / "config.json").read_text())
