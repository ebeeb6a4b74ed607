"""FSDP2 on 2 CPU ranks (gloo) with Unsloth's native FSDP2: SFT and dynamic-beta DPO train like the unsharded runs.

Unsloth 2026.10.9 shards the model inside ``Trainer.__init__`` when
``UNSLOTH_FSDP2=1`` (``--fsdp`` sets it), also on a gloo CPU mesh. Its model
code imports ``triton``, so these runs need the ``triton`` package (it imports
without a GPU); without it the module is skipped with that reason.

- SFT: ``--fsdp`` on 2 ranks against plain DDP on 2 ranks, with opensloth's batch
  patch and the dataset cache on in both: same per-step losses.
- DPO, dynamic beta: ``--fsdp`` on 2 ranks (micro-batch 4) against 1 process
  with micro-batch 4 and 2 accumulation steps (what DDP on 2 ranks equals,
  tests/test_train_dpo.py): same beta trajectory bit for bit (beta, p_hat,
  warmup end), per-step losses within the tolerance below.

Both baselines import ``unsloth.models`` first (tests/unsloth_models_launcher.py)
so that they use the trainer classes Unsloth installs with its model code, as the
FSDP runs do (a GPU machine always does).

Tolerance: FSDP2 reduce-scatters float32 gradients in another order than DDP's
all-reduce, and the first Adam steps turn a ~1e-6 relative gradient difference
into parameter differences of order lr for near-zero gradient entries; with
lr 1e-2 over 4 steps the measured loss difference is below 1e-4 (rtol 5e-4
leaves room for other CPUs), tau differs below 1e-3 relative, and beta and p_hat,
which depend on tau only through counts of margins above it, are identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import PREF_DATA, REPO, SFT_DATA, TINY_MODEL, clean_env, pythonpath

pytestmark = pytest.mark.slow

if importlib.util.find_spec("unsloth") is None or importlib.util.find_spec("triton") is None:
    pytest.skip("Unsloth's native FSDP2 needs unsloth and triton (pip install triton; it imports on CPU)",
                allow_module_level=True)

LAUNCHER = str(REPO / "tests" / "unsloth_models_launcher.py")
DPO = str(REPO / "train_scripts" / "train_dpo.py")
SFT = str(REPO / "train_scripts" / "train_configurable.py")
DPO_ARGS = ["--backend", "unsloth", "--dtype", "float32", "--max_steps", "4", "--per_device_batch_size", "4",
            "--max_seq_length", "64", "--train_samples", "64", "--learning_rate", "1e-2", "--model_name",
            str(TINY_MODEL), "--dataset", str(PREF_DATA), "--dynamic_beta.warmup_steps", "2",
            "--dynamic_beta.alpha", "0.5", "--dynamic_beta.risk_rule", "zscore"]
SFT_ARGS = ["--backend", "unsloth", "--dtype", "float32", "--max_steps", "4", "--global_batch_size", "8",
            "--max_seq_length", "128", "--train_samples", "64", "--model_name", str(TINY_MODEL), "--dataset",
            str(SFT_DATA)]


def _cmd(nproc, *args):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return (prefix if nproc > 1 else [sys.executable]) + list(args)


def _run(cmd, log, env_extra=None):
    env = clean_env(TQDM_DISABLE=1, PYTHONPATH=pythonpath(REPO / "src"), **(env_extra or {}))
    env.pop("UNSLOTH_FSDP2", None)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{open(log).read()[-4000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cache = str(out / "cache")
    _run(_cmd(2, LAUNCHER, SFT, *SFT_ARGS, "--output_dir", str(out), "--experiment_name", "sft_ddp",
              "--cache_dir", cache), out / "sft_ddp.log")
    _run(_cmd(2, SFT, *SFT_ARGS, "--output_dir", str(out), "--experiment_name", "sft_fsdp", "--fsdp",
              "--cache_dir", cache), out / "sft_fsdp.log")
    _run(_cmd(1, LAUNCHER, DPO, *DPO_ARGS, "--grad_accum", "2", "--output_dir", str(out), "--experiment_name",
              "dpo_one"), out / "dpo_one.log")
    _run(_cmd(2, DPO, *DPO_ARGS, "--output_dir", str(out), "--experiment_name", "dpo_fsdp", "--fsdp"),
         out / "dpo_fsdp.log")
    return out


def _losses(run_dir):
    state = json.load(open(os.path.join(run_dir, "trainer_state.json")))
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _steps(run_dir):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "logs", "margins", "margins.jsonl")))
            if r["type"] == "step"]


def test_sft_fsdp_equals_ddp(runs):
    log = open(runs / "sft_fsdp.log").read()
    assert "native FSDP2 sharded" in log and "optimize_sft_trainer_batch_samples" in log
    ddp, fsdp = _losses(runs / "sft_ddp_ws2"), _losses(runs / "sft_fsdp_ws2")
    assert len(ddp) == len(fsdp) == 4
    assert fsdp == pytest.approx(ddp, rel=5e-4)
    assert os.path.isfile(runs / "sft_fsdp_ws2" / "adapter_model.safetensors")  # gathered by the collective save


def test_dynamic_beta_dpo_fsdp_equals_the_unsharded_run(runs):
    assert "native FSDP2 sharded" in open(runs / "dpo_fsdp.log").read()
    one, fsdp = _steps(runs / "dpo_one_ws1"), _steps(runs / "dpo_fsdp_ws2")
    assert [r["margins"]["n"] for r in fsdp] == [8] * 4  # margins gathered from both ranks every step
    for a, b in zip(one, fsdp):
        assert (a["beta_used"], a["beta_next"], a["p_hat"], a["phase"]) == (
            b["beta_used"], b["beta_next"], b["p_hat"], b["phase"])
        if a["tau"] is not None:
            assert b["tau"] == pytest.approx(a["tau"], rel=1e-3)
    assert len({r["beta_next"] for r in fsdp}) > 1  # beta moved
    assert _losses(runs / "dpo_fsdp_ws2") == pytest.approx(_losses(runs / "dpo_one_ws1"), rel=5e-4)
    assert os.path.isfile(runs / "dpo_fsdp_ws2" / "adapter_model.safetensors")
    assert os.path.isfile(runs / "dpo_fsdp_ws2" / "dynamic_beta_state.json")
