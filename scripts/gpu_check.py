"""Driver of scripts/gpu_check.sh: every stage with its own timeout, results written as they arrive.

    python scripts/gpu_check.py --out OUT_DIR               # CUDA machine (gpu_check.sh installs .whl/ first)
    python scripts/gpu_check.py --out OUT_DIR --dry-run     # CPU, tiny sizes: the same orchestration

Stages, in order (``--stages`` picks a subset):

=================  ===============================================================  ==============
stage              what                                                            process
=================  ===============================================================  ==============
env                device, versions (torch, CUDA, Unsloth, TRL, ...)               own, short
model              random-init Qwen3-0.6B (tiny dims in --dry-run), no download    own
sft_throughput     tokens/s + peak memory: Unsloth / +UNSLOTH_TOKEN_BALANCE /      worker (one
                   +opensloth batch patch varlen / padded, same samples,          ``import
                   each warmed up, then alternated                                unsloth``)
packing            opensloth micro-batches == per-sequence forward; leaks fail
four_bit           the same SFT with load_in_4bit (needs bitsandbytes + CUDA)
two_ranks          1 rank vs 2 ranks on one GPU (OPENSLOTH_SHARE_DEVICE=1, gloo):  train_configurable.py,
                   losses agree, no compiled-cache race, no hang                   1 and 2 ranks
dpo                dynamic-beta DPO steps, beta trajectory                         train_dpo.py
=================  ===============================================================  ==============

two_ranks and dpo (the small model, correctness only) start right after env,
alongside the model build, the worker's ``import unsloth`` and the throughput
warm-ups; the driver writes a marker file when they have ended, and the worker
waits for it (``--quiet_wait`` at most, recorded) before its measured runs, so
the timed steps have the device to themselves. four_bit runs last; being
optional (Unsloth alone, 4-bit), its timeout is reported but does not fail
the check. ``OUT_DIR/results.json`` and
``OUT_DIR/results.md`` are rewritten whenever a stage reports, so a run cut
short still leaves the figures of the stages that finished;
``OUT_DIR/gpu_check.log`` holds the driver log and the tail of every
process's output, ``OUT_DIR/stage_logs.tar.gz`` their full output.
Exit status: 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

STAGES = ("env", "model", "sft_throughput", "packing", "four_bit", "two_ranks", "dpo")
WORKER_STAGES = ("sft_throughput", "packing", "four_bit")  # run in this order: figures, correctness, optional
TINY = os.path.join(REPO, "data", "tiny-qwen3")  # --small_model: packing, two_ranks and dpo run on it

# Per-stage caps in seconds. Run 1 (H200, 2026-11-28, stages one after another): env 8, model 39 (CPU
# init; now on the GPU), worker import 22, sft_throughput 97 (3 configurations), packing 30, two_ranks +
# dpo 60 in parallel; four_bit was cut after ~50 s inside its first step (Unsloth's padding_choice.py:
# its 4-bit block compile takes ~100 s). Planned path, two_ranks + dpo alongside the worker's first
# part: env 8 + model ~12 + import ~25 + sft_throughput ~130 + packing ~35 = ~210 s, leaving four_bit
# (cap 150; ~15 s load + ~100 s compile + steps) the ~150 s left of GPU_BUDGET; the worker's stages
# shrink to the budget's end, and four_bit, optional, may be cut. The wheel install (~5-10 s) comes
# before the driver starts: gpu_check.sh <= 380 s.
GPU_CAPS = {"env": 40, "model": 90, "worker_import": 90, "sft_throughput": 150, "packing": 60, "four_bit": 150,
            "two_ranks": 150, "dpo": 150}
DRY_CAPS = {"env": 60, "model": 90, "worker_import": 120, "sft_throughput": 240, "packing": 90, "four_bit": 60,
            "two_ranks": 300, "dpo": 300}
GPU_BUDGET, DRY_BUDGET = 365.0, 480.0  # seconds for the whole driver (--budget)
QUIET_WAIT = {"gpu": 60.0, "dry": 30.0}  # how long the throughput runs wait for two_ranks + dpo to end
OPTIONAL = ("four_bit",)  # a timeout or skip here is reported, not a failure

# 1 rank vs 2 ranks, same global batch, bf16 weights. bf16 keeps 8 mantissa bits (relative rounding
# 2^-8 = 0.4% per operation). The two runs compute the same step on different micro-batch shapes
# (the batch patch packs 8 samples into one row on 1 rank, 4 + 4 on 2 ranks), so matmul accumulation
# orders differ: per-token log-probs move by up to ~0.06 (measured on this tiny model, bf16, see
# tests/test_packing_model.py), the mean loss over a step's ~1k tokens by far less (the CPU dry run
# measures 4e-4), and Adam's normalised updates carry the difference into later steps. 2% of the loss
# covers that with room, and stays below what a bug shows: a rank training on other samples moves a
# step's loss by the step-to-step variation of this data (~20-40%, reported as mixup_scale; the check
# fails if that is not above the tolerance), and a rank whose gradients are not all-reduced drifts
# away at --two_ranks_lr within the run.
RANKS_REL_TOL = 0.02


class Run:
    """Results of this check, rewritten to OUT_DIR after every change."""

    def __init__(self, out: str, dry_run: bool):
        self.out = out
        self.log_path = os.path.join(out, "gpu_check.log")
        self.data = {
            "meta": {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                     "dry_run": dry_run, "repo_commit": _git_commit()},
            "stages": {s: {"status": "pending"} for s in STAGES},
        }
        self.t0 = time.time()

    def log(self, msg: str) -> None:
        line = f"[gpu_check {time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as fh:
            fh.write(line + "\n")

    def stage(self, name: str, **fields) -> None:
        self.data["stages"][name].update(fields)
        self.save()

    def save(self) -> None:
        _atomic_write(os.path.join(self.out, "results.json"), json.dumps(self.data, indent=1, default=str))
        _atomic_write(os.path.join(self.out, "results.md"), render_markdown(self.data))

    def failed(self) -> list[str]:
        bad = ("failed", "crashed", "timeout")
        return [s for s, r in self.data["stages"].items()
                if r.get("status") in bad and not (s in OPTIONAL and r.get("status") == "timeout")]


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


# --------------------------------------------------------------------------- processes


def child_env(dry_run: bool, **extra) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", UNSLOTH_DISABLE_STATISTICS="1", TRANSFORMERS_VERBOSITY="warning")
    src = os.path.join(REPO, "src")
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in parts:
        parts.append(src)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    if dry_run:
        env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A child in its own process group, output to a log file, killed as a group on timeout."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: str, timeout: float):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.deadline = time.time() + timeout
        self.timeout = timeout
        self.started = time.time()
        self.fh = open(log_path, "w")
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.timed_out = False

    def poll(self):
        rc = self.p.poll()
        if rc is None and time.time() > self.deadline:
            self.kill()
            self.timed_out = True
            rc = self.p.returncode
        if rc is not None and not self.fh.closed:
            self.fh.close()
        return rc

    def kill(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.p.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    @property
    def seconds(self) -> float:
        return round(time.time() - self.started, 1)

    def tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    def error_line(self) -> str:
        """The last line that looks like an error, else the last non-empty line."""
        text = [ln.strip() for ln in self.tail(200).splitlines() if ln.strip()]
        for ln in reversed(text):
            if ln.startswith(("error:", "Error", "RuntimeError", "ValueError", "AssertionError", "torch.", "NotImpl",
                              "ModuleNotFoundError", "ImportError", "PatchTargetError", "TypeError", "KeyError",
                              "AttributeError", "OSError", "ChildFailedError", "subprocess.")) or "Error:" in ln:
                return ln[:400]
        return text[-1][:400] if text else "no output"


def wait_all(procs: list[Proc], run: Run, on_poll=None) -> None:
    while True:
        alive = [p for p in procs if p.poll() is None]
        if on_poll is not None:
            on_poll()
        if not alive:
            return
        time.sleep(1.0)


def append_tail(run: Run, proc: Proc, lines: int = 80) -> None:
    with open(run.log_path, "a") as fh:
        fh.write(f"\n----- {proc.name}: rc={proc.p.returncode} {proc.seconds}s "
                 f"{'(timed out) ' if proc.timed_out else ''}{' '.join(proc.cmd)}\n")
        fh.write(proc.tail(lines))
        fh.write(f"----- end of {proc.name}\n\n")


# --------------------------------------------------------------------------- stages


ENV_PROBE = r"""
import importlib.metadata as md, json, platform, subprocess, sys
out = {"python": platform.python_version()}
for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "unsloth_zoo",
             "bitsandbytes", "triton", "cut_cross_entropy", "xformers", "flash_attn", "numpy", "pyarrow", "fsspec"):
    try:
        out[dist] = md.version(dist)
    except md.PackageNotFoundError:
        out[dist] = None
import torch
out["cuda_runtime"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    out["device"] = torch.cuda.get_device_name(0)
    out["device_count"] = torch.cuda.device_count()
    out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        out["driver"] = None
else:
    out["device"] = "cpu (" + platform.processor() + ")"
for name in ("unsloth", "trl", "datasets", "opensloth"):
    try:
        mod = __import__(name) if name != "unsloth" else None
        if mod is not None:
            out[name + "_path"] = getattr(mod, "__file__", None)
    except Exception as exc:
        out[name + "_path"] = f"import failed: {type(exc).__name__}: {exc}"
print("ENV " + json.dumps(out))
"""


def stage_env(run: Run, args, work: str) -> None:
    proc = Proc("env", [sys.executable, "-c", ENV_PROBE], child_env(args.dry_run), os.path.join(work, "env.log"),
                args.caps["env"])
    wait_all([proc], run)
    append_tail(run, proc, 20)
    lines = [ln for ln in proc.tail(50).splitlines() if ln.startswith("ENV ")]
    if proc.timed_out or not lines:
        run.stage("env", status="timeout" if proc.timed_out else "failed", seconds=proc.seconds,
                  error=proc.error_line())
        return
    info = json.loads(lines[-1][4:])
    run.data["meta"].update(info)
    run.stage("env", status="ok", seconds=proc.seconds)


class ModelBuild:
    """The model stage, run while the worker imports Unsloth; ``ready_file`` appears once it is on disk."""

    def __init__(self, run: Run, args, work: str):
        self.run = run
        self.arch = "qwen3-tiny" if args.dry_run else "qwen3-0.6b"
        self.path = os.path.join(work, f"{self.arch}-random")
        self.ready_file = os.path.join(work, "model_ready")
        self.proc, self.ok = None, None
        if os.path.exists(os.path.join(self.path, "model.safetensors")):
            run.stage("model", status="ok", seconds=0.0, path=self.path, arch=self.arch, note="reused")
            self._ready()
            return
        cmd = [sys.executable, "scripts/make_random_model.py", "--arch", self.arch, "--out", self.path,
               "--tokenizer", TINY, "--device", "cpu" if args.dry_run else "auto"]
        self.proc = Proc("model", cmd, child_env(args.dry_run), os.path.join(work, "model.log"), args.caps["model"])
        run.stage("model", status="running", arch=self.arch)

    def _ready(self) -> None:
        self.ok = True
        with open(self.ready_file, "w") as fh:
            fh.write(self.path + "\n")

    def poll(self) -> None:
        if self.ok is not None or self.proc.poll() is None:  # poll() also enforces the stage's cap
            return
        proc = self.proc
        append_tail(self.run, proc, 10)
        ok = proc.p.returncode == 0 and os.path.exists(os.path.join(self.path, "config.json"))
        self.run.stage("model", status="ok" if ok else ("timeout" if proc.timed_out else "failed"),
                       seconds=proc.seconds, path=self.path, arch=self.arch, error=None if ok else proc.error_line())
        self.run.log(f"model: {'ok' if ok else 'FAILED'} in {proc.seconds}s")
        if ok:
            self._ready()
        else:
            self.ok = False

    def wait(self, on_poll=None) -> bool:
        while self.ok is None:
            self.poll()
            if on_poll is not None:
                on_poll()
            if self.ok is None:
                time.sleep(0.5)
        return self.ok


def _read_events(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


def run_worker_stages(run: Run, args, work: str, model: ModelBuild, stages: list[str], deadline: float,
                      background=None, quiet_file: str | None = None) -> None:
    """Run the in-process stages in as few worker processes as possible, restarting after a crash.

    The worker imports Unsloth while ``model`` is still being built and waits for its ready
    file; ``background`` is polled while the worker runs (the stages started alongside);
    ``quiet_file`` is the marker the worker waits for before its measured runs.
    """
    attempts = 0
    while stages and attempts < 2:
        attempts += 1
        if model.ok is False:
            for s in stages:
                run.stage(s, status="skipped", error="no model (stage 'model' failed)")
            return
        left = deadline - time.time()
        if left < 30:
            for s in stages:
                run.stage(s, status="skipped", error="out of time before the stage could start")
            return
        events_path = os.path.join(work, f"worker_events_{attempts}.jsonl")
        caps = {s: args.caps[s] for s in stages}
        cmd = [sys.executable, "scripts/gpu_check_worker.py", "--events", events_path, "--stages", ",".join(stages),
               "--model", model.path, "--model_ready", model.ready_file, "--tiny", args.small_model,
               "--work", os.path.join(work, "worker")]
        cmd += [f"--timeout_{s}={caps[s]:.0f}" for s in stages]
        quiet_wait = QUIET_WAIT["dry" if args.dry_run else "gpu"]
        if quiet_file:
            cmd += ["--quiet_file", quiet_file, f"--quiet_wait={quiet_wait:.0f}"]
        cmd += [f"--deadline={deadline - 5:.1f}"]  # the worker stops its own stages first, and says so
        cmd += args.worker_args
        if args.dry_run:
            cmd.append("--dry-run")
        total = min(left, args.caps["worker_import"] + sum(caps.values()) + (quiet_wait if quiet_file else 0))
        env = child_env(args.dry_run, UNSLOTH_COMPILE_LOCATION=os.path.join(work, "compiled_cache_worker"))
        proc = Proc(f"worker{attempts}", cmd, env, os.path.join(work, f"worker{attempts}.log"), total)
        seen = {"n": 0}

        def refresh():
            model.poll()
            if model.ok is False and proc.p.poll() is None:
                proc.kill()  # nothing to train on: the worker would wait for the model until its deadline
            if background is not None:
                background()
            events = _read_events(events_path)
            if len(events) == seen["n"]:
                return
            apply_worker_events(run, events[seen["n"]:])
            seen["n"] = len(events)

        run.log(f"worker {attempts}: stages {stages}, up to {total:.0f}s")
        wait_all([proc], run, on_poll=refresh)
        refresh()
        append_tail(run, proc, 120)
        events = _read_events(events_path)
        ended = {e["stage"] for e in events if e.get("event") == "end"}
        started = [e["stage"] for e in events if e.get("event") == "start" and e["stage"] in WORKER_STAGES]
        for s in started:
            if s not in ended:  # died inside the stage: crash or the driver's kill
                run.stage(s, status="timeout" if proc.timed_out else "crashed", seconds=proc.seconds,
                          error=proc.error_line())
                ended.add(s)
        if model.ok is False:
            for s in stages:
                if s not in ended:
                    run.stage(s, status="skipped", error="no model (stage 'model' failed)")
            return
        ready = any(e.get("event") == "ready" for e in events)
        if not ready:
            msg = next((e.get("error") for e in events if e["stage"] == "_worker" and e.get("error")), None)
            for s in stages:
                run.stage(s, status="failed", error=f"worker did not start: {msg or proc.error_line()}")
            return
        stages = [s for s in stages if s not in ended]


def apply_worker_events(run: Run, events: list[dict]) -> None:
    for e in events:
        stage = e.get("stage")
        if stage == "_worker":
            if e.get("event") == "ready":
                run.data["meta"]["unsloth_import_seconds"] = e.get("import_seconds")
                run.data["meta"]["backend"] = e.get("backend")
            elif e.get("event") == "model_ready":
                run.data["meta"]["worker_waited_for_model_seconds"] = e.get("waited_seconds")
            continue
        if e.get("event") == "start":
            run.data["stages"][stage].update(status="running")
        elif e.get("event") == "partial":
            run.data["stages"][stage].update(result=e.get("result"))
        elif e.get("event") == "end":
            fields = {k: e.get(k) for k in ("status", "seconds", "error") if e.get(k) is not None}
            if e.get("result") is not None:
                fields["result"] = e["result"]
            if e.get("traceback"):
                fields["traceback_tail"] = e["traceback"][-1500:]
            run.data["stages"][stage].update(fields)
            run.log(f"{stage}: {fields.get('status')} in {fields.get('seconds')}s"
                    + (f" -- {fields['error']}" if fields.get("error") else ""))
    run.save()


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "trainer_state.json")) as fh:
        hist = json.load(fh)["log_history"]
    return {int(r["step"]): float(r["loss"]) for r in hist if "loss" in r}


def _cache_report(folder: str) -> dict:
    """Files Unsloth compiled into ``folder``: digests, Python that parses, leftovers of interrupted writes."""
    from opensloth.patches.unsloth_compat import compiled_cache_digest

    digests = compiled_cache_digest(folder)
    broken = []
    for name in digests:
        try:
            with open(os.path.join(folder, name)) as fh:
                compile(fh.read(), name, "exec")
        except SyntaxError as exc:
            broken.append(f"{name}: {exc}")
    leftovers = [n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                 if n not in digests and n not in (".locks", "__pycache__") and not n.endswith(".pyc")
                 and ("tmp" in n.lower() or n.startswith("."))]
    return {"files": len(digests), "digests": digests, "unparsable": broken, "leftovers": leftovers}


def _layout_line(log: str) -> str | None:
    """The batch patch's 'batch repacking layout: ...' line (what layout='auto' chose, and why)."""
    for line in log.splitlines():
        if "batch repacking layout:" in line:
            return line.split("batch repacking layout:", 1)[1].strip()[:300]
    return None


def start_two_ranks(args, work: str, timeout: float) -> list[Proc]:
    base = [
        "train_scripts/train_configurable.py", "--model_name", args.small_model, "--dataset",
        os.path.join(REPO, "data", "sft"),
        "--max_steps", str(args.two_ranks_steps), "--global_batch_size", "8", "--learning_rate",
        str(args.two_ranks_lr), "--dtype", "bfloat16", "--logging_steps", "1", "--output_dir",
        os.path.join(work, "ranks"), "--experiment_name", "ranks", "--max_seq_length", "512", "--seed", "3407",
        "--heldout_samples", "0", "--heldout_exact", "0",  # compares losses; the held-out report is the main job's
    ]
    one = Proc("two_ranks/1rank", [sys.executable, *base, "--cache_dir", os.path.join(work, "ranks_cache_1")],
               child_env(args.dry_run, UNSLOTH_COMPILE_LOCATION=os.path.join(work, "compiled_cache_1rank")),
               os.path.join(work, "ranks_1.log"), timeout)
    two = Proc("two_ranks/2ranks",
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base,
                "--cache_dir", os.path.join(work, "ranks_cache_2")],
               child_env(args.dry_run, OPENSLOTH_SHARE_DEVICE="1",
                         UNSLOTH_COMPILE_LOCATION=os.path.join(work, "compiled_cache_2ranks")),
               os.path.join(work, "ranks_2.log"), timeout)
    return [one, two]


def finish_two_ranks(run: Run, args, work: str, procs: list[Proc]) -> None:
    one, two = procs
    for p in procs:
        append_tail(run, p, 80)
    seconds = max(p.seconds for p in procs)
    if any(p.timed_out for p in procs):
        hung = [p.name for p in procs if p.timed_out]
        run.stage("two_ranks", status="timeout", seconds=seconds, error=f"no exit within the limit: {hung}")
        return
    bad = [p for p in procs if p.p.returncode != 0]
    if bad:
        run.stage("two_ranks", status="failed", seconds=seconds,
                  error=f"{bad[0].name} rc={bad[0].p.returncode}: {bad[0].error_line()}")
        return
    l1 = _losses(os.path.join(work, "ranks", "ranks_ws1"))
    l2 = _losses(os.path.join(work, "ranks", "ranks_ws2"))
    steps = sorted(set(l1) & set(l2))
    rel = {s: abs(l1[s] - l2[s]) / max(abs(l1[s]), 1e-8) for s in steps}
    max_rel = max(rel.values()) if rel else None
    # What a data mix-up between ranks looks like: consecutive steps train on different samples, so the
    # relative difference between step s and s+1 of the 1-rank run is the scale such a bug would show.
    shifted = [abs(l1[a] - l1[b]) / max(abs(l1[a]), 1e-8) for a, b in zip(steps[:-1], steps[1:])]
    mixup = sorted(shifted)[len(shifted) // 2] if shifted else None
    caches = {"1rank": _cache_report(os.path.join(work, "compiled_cache_1rank")),
              "2ranks": _cache_report(os.path.join(work, "compiled_cache_2ranks"))}
    same_cache = caches["1rank"]["digests"] == caches["2ranks"]["digests"]
    race_free = not caches["2ranks"]["unparsable"] and not caches["2ranks"]["leftovers"]
    log2 = open(two.log_path, errors="replace").read()
    patch_names = ("process_group_backend", "trainer_loss_scale_out_of_place", "optimize_sft_trainer_batch_samples",
                   "training_args_shared_device_gloo")
    adapter = os.path.join(work, "ranks", "ranks_ws2", "adapter_model.safetensors")
    result = {
        "gloo_group": "process group initialised: backend=gloo" in log2,
        "patches_2ranks": [n for n in patch_names if n in log2],
        "layout_2ranks": _layout_line(log2),
        "adapter_saved_2ranks": os.path.exists(adapter),
        "losses_1rank": [l1[s] for s in steps], "losses_2ranks": [l2[s] for s in steps],
        "max_rel_loss_difference": round(max_rel, 5) if max_rel is not None else None,
        "tolerance": RANKS_REL_TOL, "mixup_scale": round(mixup, 4) if mixup is not None else None,
        "steps": len(steps), "compiled_cache_files_2ranks": caches["2ranks"]["files"],
        "compiled_cache_same_as_1rank": same_cache, "compiled_cache_unparsable": caches["2ranks"]["unparsable"],
        "compiled_cache_leftovers": caches["2ranks"]["leftovers"],
        "backend_2ranks": "gloo, OPENSLOTH_SHARE_DEVICE=1",
    }
    error = None
    if not result["gloo_group"]:
        error = "the 2-rank run did not report a gloo process group (OPENSLOTH_SHARE_DEVICE=1 not honoured)"
    elif not result["adapter_saved_2ranks"]:
        error = f"the 2-rank run saved no adapter ({adapter})"
    elif len(steps) != args.two_ranks_steps:
        error = f"expected {args.two_ranks_steps} logged steps, got 1 rank {sorted(l1)} / 2 ranks {sorted(l2)}"
    elif max_rel is None or max_rel > RANKS_REL_TOL:
        error = f"1-rank vs 2-rank loss differs by {max_rel:.4f} (relative) > {RANKS_REL_TOL}"
    elif mixup is not None and mixup <= RANKS_REL_TOL:
        error = (f"the check cannot see a data mix-up: consecutive steps differ by only {mixup:.4f} "
                 f"(<= tolerance {RANKS_REL_TOL}); use more varied data or more steps")
    elif not race_free:
        error = f"compiled cache of the 2-rank run is damaged: {caches['2ranks']['unparsable'] or caches['2ranks']['leftovers']}"
    run.stage("two_ranks", status="failed" if error else "ok", seconds=seconds, result=result, error=error)


def start_dpo(args, work: str, timeout: float) -> Proc:
    cmd = [sys.executable, "train_scripts/train_dpo.py", "--model_name", args.small_model,
           "--dataset", os.path.join(REPO, "data", "preference"), "--max_steps", str(args.dpo_steps),
           "--global_batch_size", "8", "--dtype", "bfloat16", "--logging_steps", "1",
           "--output_dir", os.path.join(work, "dpo"), "--experiment_name", "dpo", "--max_seq_length", "256",
           "--dynamic_beta.warmup_steps", "2", "--dynamic_beta.alpha", "0.5", "--dynamic_beta.deadband", "0",
           "--learning_rate", "5e-4"]  # large alpha, no dead-band: beta visibly moves within a few steps
    return Proc("dpo", cmd, child_env(args.dry_run, UNSLOTH_COMPILE_LOCATION=os.path.join(work, "compiled_cache_dpo")),
                os.path.join(work, "dpo.log"), timeout)


def finish_dpo(run: Run, args, work: str, proc: Proc) -> None:
    append_tail(run, proc, 80)
    if proc.timed_out or proc.p.returncode != 0:
        run.stage("dpo", status="timeout" if proc.timed_out else "failed", seconds=proc.seconds,
                  error=proc.error_line())
        return
    path = os.path.join(work, "dpo", "dpo_ws1", "logs", "margins", "margins.jsonl")
    records = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    records = [r for r in records if r.get("type") == "step"]  # warmup_end / resume records are not steps
    trainer_cls = next((ln.split("DPOTrainer class in use:")[1].strip() for ln in proc.tail(400).splitlines()
                        if "DPOTrainer class in use:" in ln), None)
    result = {
        "steps": len(records), "beta_used": [r.get("beta_used") for r in records],
        "beta_next": [r.get("beta_next") for r in records], "phase": [r.get("phase") for r in records],
        "tau": [r.get("tau") for r in records], "trainer_class": trainer_cls,
    }
    betas = [b for b in result["beta_used"] + result["beta_next"] if b is not None]
    error = None
    if len(records) != args.dpo_steps:
        error = f"margins log has {len(records)} records, expected {args.dpo_steps} ({path})"
    elif not betas or any(not (b == b and abs(b) != float("inf")) for b in betas):
        error = f"beta trajectory is not finite: {result['beta_used']}"
    run.stage("dpo", status="failed" if error else "ok", seconds=proc.seconds, result=result, error=error)


def _pack_logs(work: str, dest: str, limit: int = 12 * 2**20) -> None:
    """Every process's full output (and the worker events) in one archive, for debugging a failed stage."""
    import tarfile

    try:
        names = sorted(n for n in os.listdir(work) if n.endswith((".log", ".jsonl")))
        tmp = dest + ".tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for n in names:
                tar.add(os.path.join(work, n), arcname=n)
        if os.path.getsize(tmp) <= limit:
            os.replace(tmp, dest)
        else:
            os.unlink(tmp)
    except OSError:
        pass


# --------------------------------------------------------------------------- report


def _fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def render_markdown(data: dict) -> str:
    m, st = data["meta"], data["stages"]
    title = "GPU check (dry run on CPU)" if m.get("dry_run") else "GPU check"
    lines = [f"# {title}", "",
             "| | |", "|---|---|",
             f"| device | {m.get('device', '?')} ({m.get('memory_gib', '?')} GiB, sm {m.get('capability', '?')}, "
             f"driver {m.get('driver', '?')}) |",
             f"| date (UTC) | {m.get('date_utc')} |",
             f"| torch / CUDA | {m.get('torch')} / {m.get('cuda_runtime')} |",
             f"| Unsloth / unsloth_zoo | {m.get('unsloth')} / {m.get('unsloth_zoo')} |",
             f"| transformers / TRL / PEFT / accelerate | {m.get('transformers')} / {m.get('trl')} / {m.get('peft')} / "
             f"{m.get('accelerate')} |",
             f"| bitsandbytes / triton / xformers / flash_attn | {m.get('bitsandbytes')} / {m.get('triton')} / "
             f"{m.get('xformers')} / {m.get('flash_attn')} |",
             f"| `import unsloth` | {_fmt(m.get('unsloth_import_seconds'))} s (backend {m.get('backend')}; then "
             f"waited {_fmt(m.get('worker_waited_for_model_seconds'))} s for the model) |",
             f"| opensloth commit | {m.get('repo_commit')} |", "",
             "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name in STAGES:
        r = st[name]
        note = (r.get("error") or "").replace("|", "/")
        lines.append(f"| {name} | {r.get('status')} | {_fmt(r.get('seconds'))} | {note} |")

    thr = (st["sft_throughput"].get("result") or {})
    if thr.get("summary"):
        d = thr.get("data", {})
        q = thr.get("quiet") or {}
        lines += ["", "## LoRA SFT throughput (same samples; each configuration warmed up, then alternated)", "",
                  f"Random-init {st['model'].get('arch', '?')} model, LoRA r=16 on q/k/v/o/gate/up/down, bf16, "
                  f"gradient checkpointing 'unsloth', global batch {thr.get('global_batch')} samples, lognormal "
                  f"lengths (median {d.get('median_tokens')}, mean {d.get('mean_tokens')}, max {d.get('max_tokens')} "
                  f"tokens). Each configuration ran once as a {thr.get('warmup_steps')}-step warm-up (Unsloth "
                  f"compiles its transformer blocks for each new shape), then {thr.get('rounds')} alternated "
                  f"round(s) of {thr.get('steps_per_run')} steps, the first {thr.get('skipped_steps_per_run')} of "
                  f"each run left out. tokens/s = real tokens / seconds over the measured steps of all runs, "
                  f"leaving out steps slower per token than {thr.get('outlier_factor')}x their run's median "
                  f"(recompiles). Before measuring, waited {q.get('waited_s')} s for two_ranks and dpo to end "
                  f"(device shared while measuring: {q.get('device_shared_while_measuring')}).", "",
                  "| configuration | tokens/s | vs Unsloth alone | tokens/s per run | steps kept / left out | "
                  "peak allocated GiB | padding-free | losses |", "|---|---|---|---|---|---|---|---|"]
        for config, s_ in thr["summary"].items():
            extra = ""
            if config == "unsloth_token_balance":
                extra = f" (balancer active: {s_.get('token_balance_active')})"
            elif s_.get("layout"):
                extra = f" (layout {s_['layout']}" + (", what 'auto' picks here)"
                                                      if s_["layout"] == thr.get("auto_layout") else ")")
            runs_ = ", ".join(_fmt(x, 0) for x in s_.get("run_tokens_per_second", []))
            lines.append(f"| {config}{extra} | {_fmt(s_.get('tokens_per_second'), 0)} | "
                         f"{_fmt(s_.get('ratio_vs_unsloth'), 3)} | {runs_} | {s_.get('measured_steps')} / "
                         f"{s_.get('excluded_steps')} | {_fmt(s_.get('peak_allocated_gib'), 2)} | "
                         f"{s_.get('padding_free')} | {', '.join(f'{x:.4f}' for x in s_.get('losses', []))} |")
        lines.append(f"\nSame real tokens per step in every configuration: {thr.get('same_tokens_per_step')}; "
                     f"largest loss difference between configurations: {thr.get('max_loss_difference_between_configs')}."
                     f" opensloth's layout='auto' picks {thr.get('auto_layout')!r} here "
                     f"({thr.get('auto_layout_reason')})."
                     f" Unsloth's token balancer (UNSLOTH_TOKEN_BALANCE=1) evens out token sums between ranks and "
                     f"accumulation micro-batches of padding-free batches only: it is off for padded batches (as "
                     f"here: the data is pre-tokenized, so Unsloth keeps padding-free off) and cannot change the "
                     f"total work of one process, so on this single process its row is the same computation as "
                     f"Unsloth alone and any difference is noise. Attention: {json.dumps(thr.get('attention'))}")
        if thr.get("cut_for_time") or thr.get("not_measured"):
            lines.append(f"\nRuns left out for time: {thr.get('cut_for_time')}; configurations not measured: "
                         f"{thr.get('not_measured')}.")
    q4 = st["four_bit"].get("result") or {}
    if q4.get("runs"):
        lines += ["", "## 4-bit LoRA SFT (load_in_4bit, Unsloth alone)", "",
                  f"tokens/s {_fmt(q4.get('tokens_per_second'), 0)} (steps kept / left out: {q4.get('measured_steps')}"
                  f" / {q4.get('excluded_steps')}), peak allocated {_fmt(q4.get('peak_allocated_gib'), 2)} GiB, "
                  f"load {q4.get('load_seconds')} s, warm-up run {q4.get('warmup_seconds')} s (compiles the 4-bit "
                  f"blocks), bitsandbytes {q4.get('bitsandbytes')}, losses {q4.get('losses')}"
                  + (f"; {q4['note']}" if q4.get("note") else "")]
    pk = st["packing"].get("result") or {}
    if pk.get("max_abs_logprob_diff"):
        lines += ["", "## opensloth micro-batches vs per-sequence forward (tiny model, bf16)", "",
                  "| input | max abs token log-prob difference |", "|---|---|"]
        for k, v in pk["max_abs_logprob_diff"].items():
            lines.append(f"| {k} | {v} |")
        for k, v in (pk.get("errors") or {}).items():
            lines.append(f"| {k} | error: {v} |")
        lines.append(f"\nhonest (varlen, padded, padded without mask) < {pk.get('honest_tolerance')}: "
                     f"{pk.get('honest_ok')}; naive concatenation detected (> {pk.get('leak_minimum')}): "
                     f"{pk.get('leaks_detected')}; packed_seq_lengths authoritative: "
                     f"{pk.get('packed_seq_lengths_authoritative')}. Attention: {json.dumps(pk.get('attention'))}")
    tr = st["two_ranks"].get("result") or {}
    if tr.get("losses_1rank"):
        lines += ["", "## 1 rank vs 2 ranks on one device (OPENSLOTH_SHARE_DEVICE=1, gloo)", "",
                  "| step | 1 rank | 2 ranks |", "|---|---|---|"]
        for i, (a, b) in enumerate(zip(tr["losses_1rank"], tr["losses_2ranks"]), 1):
            lines.append(f"| {i} | {a:.5f} | {b:.5f} |")
        lines.append(f"\nmax relative difference {tr.get('max_rel_loss_difference')} (tolerance {tr.get('tolerance')}); "
                     f"a data mix-up would show as ~{tr.get('mixup_scale')} (median relative change between consecutive "
                     f"steps); compiled cache of the 2-rank "
                     f"run: {tr.get('compiled_cache_files_2ranks')} files, identical to the 1-rank cache: "
                     f"{tr.get('compiled_cache_same_as_1rank')}, unparsable {tr.get('compiled_cache_unparsable')}, "
                     f"leftovers {tr.get('compiled_cache_leftovers')}; patches seen in the 2-rank log: "
                     f"{tr.get('patches_2ranks')}; adapter saved: {tr.get('adapter_saved_2ranks')}; batch patch "
                     f"layout: {tr.get('layout_2ranks')}")
    dp = st["dpo"].get("result") or {}
    if dp.get("steps"):
        lines += ["", "## Dynamic-beta DPO", "", f"trainer class {dp.get('trainer_class')}", "",
                  "| step | phase | beta used | beta next | tau |", "|---|---|---|---|---|"]
        for i, row in enumerate(zip(dp["phase"], dp["beta_used"], dp["beta_next"], dp["tau"]), 1):
            lines.append(f"| {i} | " + " | ".join(_fmt(x, 5) if isinstance(x, float) else str(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


class Background:
    """two_ranks and dpo, run alongside the rest; finished (results recorded) as soon as they exit.

    When all have ended (or none was started) the marker ``quiet_file`` is written: the worker
    waits for it before its timed steps.
    """

    def __init__(self, run: Run, args, work: str, stages: list[str], deadline: float):
        self.run, self.args, self.work = run, args, work
        self.quiet_file = os.path.join(work, "background_done")
        self.groups: dict = {}
        self.procs: list[Proc] = []
        for name, starter in (("two_ranks", start_two_ranks), ("dpo", start_dpo)):
            if name not in stages:
                continue
            left = deadline - time.time()
            if left < 30:
                run.stage(name, status="skipped", error="out of time before the stage could start")
                continue
            timeout = min(args.caps[name], left)
            started = starter(args, work, timeout)
            self.groups[name] = started if isinstance(started, list) else [started]
            self.procs += self.groups[name]
            run.stage(name, status="running")
            run.log(f"{name}: started alongside the other stages, up to {timeout:.0f}s")
        self.finished: set = set()
        self.poll()

    def poll(self) -> None:
        for name, procs in self.groups.items():
            if name in self.finished:
                continue
            if any(p.poll() is None for p in procs):  # poll() also enforces each process's timeout
                continue
            self.finished.add(name)
            if name == "two_ranks":
                finish_two_ranks(self.run, self.args, self.work, procs)
            else:
                finish_dpo(self.run, self.args, self.work, procs[0])
            r = self.run.data["stages"][name]
            note = f" -- {r['error']}" if r.get("error") else ""
            self.run.log(f"{name}: {r.get('status')} in {r.get('seconds')}s{note}")
        if len(self.finished) == len(self.groups) and not os.path.exists(self.quiet_file):
            with open(self.quiet_file, "w") as fh:
                fh.write(f"{time.time()}\n")

    def wait(self) -> None:
        while len(self.finished) < len(self.groups):
            self.poll()
            time.sleep(1.0)
        self.poll()

    def stop(self) -> None:
        """Kill what still runs (the driver is leaving early); their stages end up 'crashed'."""
        for p in self.procs:
            if p.p.poll() is None:
                p.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json, results.md, gpu_check.log")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny model and sizes, same stages")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check (default {GPU_BUDGET:.0f} on GPU, {DRY_BUDGET:.0f} dry run); "
                        "later stages shrink or are skipped")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--two_ranks_steps", type=int, default=None, help="optimizer steps of the 1- vs 2-rank runs")
    p.add_argument("--two_ranks_lr", type=float, default=1e-3, help="learning rate of the 1- vs 2-rank runs")
    p.add_argument("--dpo_steps", type=int, default=None, help="DPO optimizer steps")
    p.add_argument("--small_model", default=TINY,
                   help="small pretrained model for packing, two_ranks and dpo (default: the embedded tiny Qwen3)")
    p.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                   help=f"override a stage's time cap (stages, plus worker_import); repeatable")
    args, worker_args = p.parse_known_args(argv)
    args.worker_args = worker_args  # sizing flags of gpu_check_worker.py (--batch, --measure_steps, ...)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        print(f"error: --stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    args.caps = dict(DRY_CAPS if args.dry_run else GPU_CAPS)
    for item in args.cap:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in args.caps or seconds <= 0:
            print(f"error: --cap {item!r}: use STAGE=SECONDS with STAGE in {sorted(args.caps)}", file=sys.stderr)
            return 2
        args.caps[name] = seconds
    budget = args.budget or (DRY_BUDGET if args.dry_run else GPU_BUDGET)
    args.two_ranks_steps = args.two_ranks_steps or (4 if args.dry_run else 8)
    args.dpo_steps = args.dpo_steps or (4 if args.dry_run else 6)
    if args.dry_run:
        args.worker_args = ["--batch", "2", "--accum", "2", "--skip_steps", "1", "--measure_steps", "1",
                            "--warmup_steps", "1", "--rounds", "1", "--median_tokens", "48",
                            "--max_tokens", "256"] + worker_args

    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="opensloth_gpu_check_")
    os.makedirs(work, exist_ok=True)
    run = Run(args.out, args.dry_run)
    for s in STAGES:
        if s not in stages:
            run.data["stages"][s] = {"status": "skipped", "error": "not selected (--stages)"}
    run.save()
    deadline = time.time() + budget
    run.log(f"work dir {work}; budget {budget:.0f}s; stages {stages}; python {sys.executable}")
    background = model = None
    try:
        if "env" in stages:
            stage_env(run, args, work)
            m = run.data["meta"]
            run.log(f"device {m.get('device')}; torch {m.get('torch')} CUDA {m.get('cuda_runtime')}; "
                    f"unsloth {m.get('unsloth')}; trl {m.get('trl')}")
            if not args.dry_run and not m.get("cuda_available"):
                run.log("no CUDA device: use --dry-run on CPU machines")
                for s in stages:
                    if run.data["stages"][s]["status"] == "pending":
                        run.stage(s, status="skipped", error="no CUDA device (run with --dry-run on CPU)")
                return 2
        # two_ranks and dpo first, in the background: they use the small model and check correctness only.
        background = Background(run, args, work, stages, deadline)
        wanted_worker = [s for s in WORKER_STAGES if s in stages]
        model = ModelBuild(run, args, work) if ("model" in stages or wanted_worker) else None
        if wanted_worker:  # the worker imports Unsloth while the model is built
            run_worker_stages(run, args, work, model, wanted_worker, deadline, background=background.poll,
                              quiet_file=background.quiet_file if background.procs else None)
        if model is not None:
            model.wait(on_poll=background.poll)
        background.wait()
    finally:
        if background is not None:
            background.stop()
        if model is not None and model.proc is not None and model.proc.p.poll() is None:
            model.proc.kill()
        for s, r in run.data["stages"].items():
            if r.get("status") in ("pending", "running"):
                r.update(status="skipped" if r["status"] == "pending" else "crashed",
                         error=r.get("error") or "the driver stopped before this stage finished")
        run.data["meta"]["total_seconds"] = round(time.time() - run.t0, 1)
        run.save()
        _pack_logs(work, os.path.join(args.out, "stage_logs.tar.gz"))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = run.failed()
    run.log(f"done in {run.data['meta']['total_seconds']}s; " + (f"FAILED: {failed}" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
