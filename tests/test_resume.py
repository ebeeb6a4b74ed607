"""SFT end to end through what real runs meet: a full disk at a checkpoint, resume, and two launchers.

One fixture, five short launches of ``train_configurable.py`` (backend hf,
float32, 4 optimizer steps of a global batch of 8 out of 64 samples, so the
checkpoint at step 2 is mid-epoch):

- ``ref``: one process, ``--no_patches``, uninterrupted;
- ``disk``: the same run, but the disk "fills up" while ``checkpoint-4`` is
  written (``tests/fault_inject.py``): one error line, exit 2, ``checkpoint-4``
  left without its marker; then ``--resume_from_checkpoint last`` in the same
  run dir picks ``checkpoint-2`` and finishes;
- ``nodes``: two launchers x one process (c10d rendezvous on localhost, so
  either launcher may become global rank 0), batch patch on, node-local caches
  (``--cache_builder local``, one cache folder each) and node-local output
  folders;
- ``nodes_resumed``: both launchers resume ``nodes`` from step 2, from a run
  dir both see (rank 0's checkpoint plus rank 1's RNG state copied there, as
  a shared filesystem would hold them).

Resumed runs must reproduce the uninterrupted losses exactly (patches off on
1 rank, patches on on 2 ranks); 2 launchers must match 1 process.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

from helpers import REPO, SFT_DATA, TINY_MODEL, clean_env

pytestmark = pytest.mark.slow

if not (TINY_MODEL.is_dir() and SFT_DATA.is_dir()):
    pytest.skip("embedded tiny model / chat data missing", allow_module_level=True)

SCRIPT = str(REPO / "train_scripts" / "train_configurable.py")
FAULT = str(REPO / "tests" / "fault_inject.py")
COMMON = ["--backend", "hf", "--dtype", "float32", "--max_steps", "4", "--save_steps", "2", "--global_batch_size", "8",
          "--max_seq_length", "64", "--train_samples", "64", "--learning_rate", "1e-2", "--heldout_samples", "0",
          "--heldout_exact", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, log_path):
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(TQDM_DISABLE=1), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def _finish(proc, log_path, expect=0, timeout=600) -> str:
    rc = proc.wait(timeout=timeout)
    text = open(log_path).read()
    if rc != expect:
        pytest.fail(f"{' '.join(map(str, proc.args))} exited with {rc} (expected {expect}):\n{text[-4000:]}")
    return text


def _two_launchers(args_of, logs, run_id):
    """Two torchrun launchers x 1 process on localhost (c10d: the launcher that becomes rank 0 is arbitrary)."""
    port = _free_port()
    return [_start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}",
                    "--max_restarts=0", SCRIPT, *args_of(node)], logs[node]) for node in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    one = [*COMMON, "--no_patches", "--cache_dir", str(out / "cache1")]
    ref = _start([sys.executable, SCRIPT, *one, "--output_dir", str(out), "--experiment_name", "ref"], out / "ref.log")
    disk = _start([sys.executable, FAULT, "enospc:checkpoint-4/optimizer.pt", SCRIPT, *one, "--output_dir", str(out),
                   "--experiment_name", "disk"], out / "disk.log")
    logs = {"disk": _finish(disk, out / "disk.log", expect=2)}
    after_fault = {name: sorted(p.name for p in (out / "disk_ws1_nopatches" / name).iterdir())
                   for name in ("checkpoint-2", "checkpoint-4")}

    def node_args(node, output, resume=()):
        return [*COMMON, "--cache_builder", "local", "--cache_dir", str(out / f"cache_node{node}"),
                "--output_dir", str(output), "--experiment_name", "nodes", *resume]

    node_logs = {n: out / f"nodes{n}.log" for n in (0, 1)}
    nodes = _two_launchers(lambda n: node_args(n, out / f"node{n}"), node_logs, "nodes")
    disk_resumed = _start([sys.executable, SCRIPT, *one, "--output_dir", str(out), "--experiment_name", "disk",
                           "--resume_from_checkpoint", "last"], out / "disk_resumed.log")
    logs["ref"] = _finish(ref, out / "ref.log")
    logs["disk_resumed"] = _finish(disk_resumed, out / "disk_resumed.log")
    logs["nodes"] = [_finish(p, node_logs[n]) for n, p in enumerate(nodes)]

    # Which launcher got global rank 0, and a run dir both launchers see for the resume.
    rank0 = next(n for n in (0, 1) if "ddp_patch: rank 0/2" in logs["nodes"][n])
    shared = out / "shared" / "nodes_ws2"
    shutil.copytree(out / f"node{rank0}" / "nodes_ws2" / "checkpoint-2", shared / "checkpoint-2")
    shutil.copy(out / f"node{1 - rank0}" / "nodes_ws2" / "checkpoint-2" / "rng_state_1.pth", shared / "checkpoint-2")
    resumed_logs = {n: out / f"resumed{n}.log" for n in (0, 1)}
    resumed = _two_launchers(lambda n: node_args(n, out / "shared", ("--resume_from_checkpoint", "last")),
                             resumed_logs, "resumed")
    logs["nodes_resumed"] = [_finish(p, resumed_logs[n]) for n, p in enumerate(resumed)]
    return {"out": out, "logs": logs, "rank0": rank0, "after_fault": after_fault}


def _losses(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_full_disk_at_a_checkpoint_is_one_line_and_last_skips_the_partial_checkpoint(runs):
    out, log = runs["out"], runs["logs"]["disk"]
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert "checkpoint-4" in errors[0] and "No space left on device" in errors[0]
    assert "--resume_from_checkpoint last" in errors[0]
    run_dir = out / "disk_ws1_nopatches"
    from opensloth.checkpoint import MARKER_FILE, is_complete

    left = runs["after_fault"]  # what the failed run left behind
    assert MARKER_FILE in left["checkpoint-2"]
    assert "optimizer.pt" in left["checkpoint-4"] and MARKER_FILE not in left["checkpoint-4"]
    assert "scheduler.pt" not in left["checkpoint-4"]  # the save stopped at the full disk
    resumed = runs["logs"]["disk_resumed"]
    assert f"resuming from {run_dir / 'checkpoint-2'}" in resumed
    assert is_complete(run_dir / "checkpoint-4")  # written again, completely, by the resumed run


def test_resume_after_the_fault_reproduces_the_uninterrupted_losses_exactly(runs):
    ref, resumed = _losses(runs["out"] / "ref_ws1_nopatches"), _losses(runs["out"] / "disk_ws1_nopatches")
    assert sorted(ref) == [1, 2, 3, 4]
    assert resumed == ref  # 1 rank, patches off, from mid-epoch: bit for bit


def test_two_launchers_with_node_local_caches_match_one_process(runs):
    out, rank0 = runs["out"], runs["rank0"]
    ref, nodes = _losses(out / "ref_ws1_nopatches"), _losses(out / f"node{rank0}" / "nodes_ws2")
    assert sorted(nodes) == [1, 2, 3, 4]
    assert [nodes[s] for s in sorted(ref)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-5)
    for node in (0, 1):
        # each node tokenized into its own cache folder: nobody waited for a folder it cannot see
        assert "built the tokenized dataset cache" in runs["logs"]["nodes"][node]
        assert len(list((out / f"cache_node{node}").glob("*/READY"))) == 1
    # Outputs come from global rank 0, whichever launcher it ran in; the other node writes only its RNG state.
    assert (out / f"node{rank0}" / "nodes_ws2" / "adapter_model.safetensors").exists()
    other = out / f"node{1 - rank0}" / "nodes_ws2"
    assert not (other / "adapter_model.safetensors").exists() and not (other / "trainer_state.json").exists()
    assert sorted(p.name for p in (other / "checkpoint-2").iterdir()) == ["rng_state_1.pth"]


def test_two_launchers_resume_exactly(runs):
    out, rank0 = runs["out"], runs["rank0"]
    first, resumed = _losses(out / f"node{rank0}" / "nodes_ws2"), _losses(out / "shared" / "nodes_ws2")
    assert resumed == first  # 2 ranks, batch patch on, from mid-epoch: bit for bit
    assert any("resuming from" in log and "checkpoint-2" in log for log in runs["logs"]["nodes_resumed"])
