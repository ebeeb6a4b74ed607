"""Shared test helpers: repo paths, the embedded default, subprocess launchers.

Imported normally (``from helpers import REPO, run``): pytest puts ``tests/``
on ``sys.path``. ``conftest.py`` only prepares the environment.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "data" / "tiny-qwen3"
SFT_DATA = REPO / "data" / "sft"
PREF_DATA = REPO / "data" / "preference"
# The same places as strings, for the data-loader tests.
TOKENIZER_DIR = str(TINY_MODEL)
SFT_DIR = str(SFT_DATA)
PREF_TRAIN = str(PREF_DATA / "train.jsonl")
HH_SAMPLE = str(REPO / "data" / "formats" / "hh_sample.jsonl")
JUDGED_SAMPLE = str(REPO / "data" / "formats" / "judged_rollouts.jsonl")
# Five batches of eight margins from section 2.6 of the dynamic-DPO reference study, exact in float32.
REFERENCE_MARGIN_STREAM = [
    [0.0, 0.5, -0.25, 1.0, 0.125, -0.5, 0.75, 0.25],
    [0.375, -0.125, 1.5, 0.0, 0.625, -0.75, 0.25, 2.0],
    [1.25, 0.5, 3.0, -0.25, 0.875, 2.5, 0.0, 1.75],
    [-1.0, -0.5, 0.0, 0.25, -0.25, 0.125, -0.125, 0.5],
    [0.5, 0.25, 2.25, 1.0, 0.75, 0.0, 1.5, 0.25],
]
HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None

requires_unsloth = pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth is not installed (hf path still tested)")


def clean_env(**extra) -> dict:
    """Environment for child processes: no inherited torchrun variables, quiet, offline."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pythonpath(*folders) -> str:
    """``PYTHONPATH`` with ``folders`` in front of the caller's (which picks this checkout's opensloth)."""
    return os.pathsep.join(str(p) for p in (*folders, os.environ.get("PYTHONPATH")) if p)


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` on a free port (standalone rendezvous)."""
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            script, *args]


def run(cmd: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tiny model's tokenizer (one per test module: tests may change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


def write_lines(path, lines) -> str:
    """Write ``lines`` (strings, one per line) to ``path``; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    return str(path)


def random_lora_adapter(path: str, seed: int = 1, scale: float = 0.5) -> str:
    """A LoRA adapter with non-zero B (so merging changes the weights), saved as a training run saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(TINY_MODEL)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(TINY_MODEL)).save_pretrained(path)
    return path
