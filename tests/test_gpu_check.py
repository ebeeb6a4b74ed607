"""scripts/gpu_check.sh --dry-run: every stage of the GPU check, its result files and its checks, on CPU.

The real Unsloth GPU path needs CUDA; the dry run drives the same stages (the
worker's four SFT configurations warmed up and alternated, the packing
comparison with its negative control, 1 vs 2 ranks with
OPENSLOTH_SHARE_DEVICE=1 and dynamic-beta DPO alongside the worker) on the
tiny model, so the orchestration, the result files and the comparisons cannot
rot. Also: a stage that overruns its cap is recorded as a
timeout while the others still report, and the wheel trimmer keeps RECORD
consistent.
"""

from __future__ import annotations

import json
import sys
import zipfile

import pytest
from helpers import REPO, run

sys.path.insert(0, str(REPO / "scripts"))


def _check(tmp_path, *extra, timeout=900):
    out = tmp_path / "out"
    proc = run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run", "--work", str(tmp_path / "work"), *extra],
               timeout=timeout, PYTHON=sys.executable)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return proc, out, results


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_results(tmp_path):
    proc, out, res = _check(tmp_path)
    assert res is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    st = res["stages"]
    assert proc.returncode == 0, json.dumps({k: (v.get("status"), v.get("error")) for k, v in st.items()})
    assert {k: v["status"] for k, v in st.items()} == {
        "env": "ok", "model": "ok", "sft_throughput": "ok", "packing": "ok",
        "four_bit": "skipped",  # needs CUDA
        "two_ranks": "ok", "dpo": "ok",
    }
    assert res["meta"]["dry_run"] is True and res["meta"]["torch"] and res["meta"]["trl"]

    thr = st["sft_throughput"]["result"]
    configs = ["unsloth", "unsloth_token_balance", "opensloth_varlen", "opensloth_padded"]
    assert thr["order"] == configs + configs  # each warmed up once, then one measured round (dry run)
    assert [r["warmup"] for r in thr["runs"]["unsloth"]] == [True, False]
    assert thr["same_tokens_per_step"] is True  # the four configurations trained on the same samples
    assert set(thr["summary"]) == set(configs) and thr["not_measured"] == []
    for config, summary in thr["summary"].items():
        assert summary["tokens_per_second"] > 0 and summary["measured_steps"] >= 1, config
    assert thr["summary"]["unsloth"]["ratio_vs_unsloth"] == 1.0
    assert thr["summary"]["opensloth_varlen"]["layout"] == "varlen"
    assert thr["summary"]["opensloth_padded"]["layout"] == "padded"
    assert thr["runs"]["unsloth"][-1]["opensloth_layout"] is None  # the patch was really off
    assert thr["auto_layout"] == "varlen" and "cpu" in thr["auto_layout_reason"]  # CPU: as before
    assert set(thr["quiet"]) == {"waited_s", "device_shared_while_measuring"}  # two_ranks/dpo ran alongside

    pk = st["packing"]["result"]
    assert pk["honest_ok"] and pk["leaks_detected"]
    diffs = pk["max_abs_logprob_diff"]
    assert diffs["leak_naive_concat"] > 10 * diffs["opensloth_varlen"]
    assert max(diffs["opensloth_padded"], diffs["opensloth_padded_no_mask"]) < pk["honest_tolerance"]

    tr = st["two_ranks"]["result"]
    assert tr["steps"] == 4 and tr["max_rel_loss_difference"] <= tr["tolerance"] < tr["mixup_scale"]
    assert tr["layout_2ranks"].startswith("varlen")

    dp = st["dpo"]["result"]
    assert dp["steps"] == 4 and dp["phase"][0] == "warmup" and dp["phase"][-1] == "dynamic"
    assert dp["beta_next"][-1] != dp["beta_used"][0]  # the controller moved beta

    md = (out / "results.md").read_text()
    for heading in ("| stage | status |", "LoRA SFT throughput", "micro-batches vs per-sequence", "1 rank vs 2 ranks",
                    "Dynamic-beta DPO", "token balancer", "what 'auto' picks here"):
        assert heading in md
    assert "----- worker1" in (out / "gpu_check.log").read_text()
    assert len(list(out.iterdir())) <= 8  # what a device run can bring back


@pytest.mark.slow
def test_a_stage_over_its_cap_is_a_timeout_and_the_rest_still_report(tmp_path):
    proc, out, res = _check(tmp_path, "--stages", "model,sft_throughput,four_bit", "--cap", "sft_throughput=1")
    assert proc.returncode == 1
    st = res["stages"]
    assert st["sft_throughput"]["status"] == "timeout", st["sft_throughput"]
    # A fresh worker ran the stage left (on CPU it reports itself skipped: it needs CUDA).
    assert st["four_bit"]["status"] == "skipped" and "CUDA" in st["four_bit"]["error"], st["four_bit"]
    assert "----- worker2" in (out / "gpu_check.log").read_text()
    assert st["two_ranks"]["status"] == "skipped" and "not selected" in st["two_ranks"]["error"]
    assert "| sft_throughput | timeout |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_failed_model_build_stops_the_worker_that_waits_for_it(tmp_path):
    proc, out, res = _check(tmp_path, "--stages", "model,sft_throughput,packing", "--cap", "model=0.5")
    st = res["stages"]
    assert st["model"]["status"] == "timeout", st["model"]
    for name in ("sft_throughput", "packing"):
        assert st[name]["status"] == "skipped" and "no model" in st[name]["error"], st[name]
    assert proc.returncode == 1 and "worker_waited_for_model_seconds" not in res["meta"]


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = run(["bash", "scripts/gpu_check.sh"], timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--stages", "env,warp"], timeout=60)
    assert proc.returncode == 2 and "warp" in proc.stderr and "Traceback" not in proc.stderr
    proc = run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--cap", "env=soon"], timeout=60)
    assert proc.returncode == 2 and "--cap" in proc.stderr and "Traceback" not in proc.stderr


def test_markdown_renders_partial_results():
    from gpu_check import STAGES, render_markdown

    data = {"meta": {"dry_run": False, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"},
            "stages": {s: {"status": "pending"} for s in STAGES}}
    data["stages"]["sft_throughput"] = {"status": "timeout", "seconds": 150.0, "error": "no result within 150 s"}
    md = render_markdown(data)
    assert "NVIDIA H100 80GB HBM3" in md and "| sft_throughput | timeout | 150.0 | no result within 150 s |" in md


def test_tokens_per_second_leaves_out_recompile_steps():
    from gpu_check_worker import robust_rate

    # Run 1 (H200), the second measured Unsloth run: an 11.9 s recompile in its first step.
    seconds = [11.9415, 0.4927, 0.5372, 0.4062, 0.8143]
    tokens = [15397, 12738, 14210, 12315, 22338]
    r = robust_rate(seconds, tokens)
    assert r["excluded_steps"] == 1 and r["measured_steps"] == 4
    assert r["excluded_seconds"] == pytest.approx(11.9415, abs=1e-3)
    assert r["tokens_per_second"] == round(sum(tokens[1:]) / sum(seconds[1:]), 1)
    # A step with twice the tokens and twice the time is not an outlier: the rate is per token.
    r = robust_rate([1.0, 1.0, 2.0, 1.0], [100, 100, 200, 100])
    assert r["excluded_steps"] == 0 and r["tokens_per_second"] == 100.0
    assert robust_rate([], [])["tokens_per_second"] is None


def test_measured_runs_wait_for_the_stages_alongside(tmp_path):
    from types import SimpleNamespace

    from gpu_check_worker import wait_for_quiet

    done = tmp_path / "background_done"
    ctx = SimpleNamespace(args=SimpleNamespace(quiet_file=str(done), quiet_wait=0.0), clock=None)
    assert wait_for_quiet(ctx)["device_shared_while_measuring"] is True  # still running: measured anyway, said so
    done.write_text("1")
    assert wait_for_quiet(ctx) == {"waited_s": 0.0, "device_shared_while_measuring": False}
    ctx.args.quiet_file = None  # nothing runs alongside
    assert wait_for_quiet(ctx)["device_shared_while_measuring"] is False


def _fake_worker(monkeypatch, tmp_path, seconds_left):
    """gpu_check_worker with model loading and training replaced: the stages' control flow on CPU."""
    import types

    import gpu_check_worker as w

    calls = []

    def fake_run(ctx, model, tokenizer, data, initial, config, steps, run_dir):
        calls.append((config, steps))
        times = [5.0] + [0.5] * (steps - 1)
        return {"step_seconds": times, "step_tokens": [100] * steps, "wall_seconds": sum(times) + 1,
                "peak_allocated_gib": 1.0, "losses": [1.0] * steps, "tokens": 100 * (steps - 1),
                "seconds": 0.5 * (steps - 1), "tokens_per_second": 200.0, "measured_steps": steps - 1,
                "excluded_steps": 0, "padding_free": False, "token_balance_active": None,
                "opensloth_layout": w.PATCH_LAYOUT.get(config)}

    model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=10), named_parameters=lambda: [],
                                  parameters=lambda: iter([]))
    monkeypatch.setattr(w, "_load_lora_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(w, "_dataset", lambda ctx, tok, vocab, n: (None, {"samples": n}))
    monkeypatch.setattr(w, "_one_run", fake_run)
    monkeypatch.setattr(w, "_attention_info", lambda m: {})
    monkeypatch.setattr(w, "_set_config", lambda name: None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.50.2"))
    args = types.SimpleNamespace(model="m", skip_steps=1, measure_steps=4, warmup_steps=0, rounds=2, batch=8,
                                 accum=2, max_tokens=4096, work=str(tmp_path), quiet_file=None, quiet_wait=0.0)
    ctx = types.SimpleNamespace(cuda=True, args=args, clock=types.SimpleNamespace(left=lambda: seconds_left),
                                free=lambda: None)
    return w, ctx, calls


def test_four_bit_runs_its_measured_run_only_when_the_clock_allows(monkeypatch, tmp_path):
    w, ctx, calls = _fake_worker(monkeypatch, tmp_path, seconds_left=100.0)
    r = w.stage_four_bit(ctx, emit=lambda partial: None)
    assert calls == [("unsloth", 2), ("unsloth", 5)] and r["tokens_per_second"] == 200.0 and r["note"] is None
    w, ctx, calls = _fake_worker(monkeypatch, tmp_path, seconds_left=5.0)
    r = w.stage_four_bit(ctx, emit=lambda partial: None)
    assert calls == [("unsloth", 2)] and r["tokens_per_second"] is None and "left out" in r["note"]
    assert r["peak_allocated_gib"] == 1.0  # the warm-up's figures are kept


def test_throughput_warms_every_configuration_up_and_cuts_runs_it_has_no_time_for(monkeypatch, tmp_path):
    w, ctx, calls = _fake_worker(monkeypatch, tmp_path, seconds_left=1000.0)
    r = w.stage_sft_throughput(ctx, emit=lambda partial: None)
    assert calls == [(c, 5) for c in w.CONFIGS] * 3  # warm-ups over the measured steps, then 2 rounds
    assert r["cut_for_time"] == [] and r["not_measured"] == [] and r["summary"]["unsloth"]["runs"] == 2
    w, ctx, calls = _fake_worker(monkeypatch, tmp_path, seconds_left=12.0)
    r = w.stage_sft_throughput(ctx, emit=lambda partial: None)
    assert calls == [(c, 5) for c in w.CONFIGS] and len(r["cut_for_time"]) == 8
    assert r["not_measured"] == list(w.CONFIGS) and r["summary"] == {}


def test_an_optional_stage_timeout_is_not_a_failure(tmp_path):
    from gpu_check import Run

    run = Run(str(tmp_path), dry_run=True)
    for name in run.data["stages"]:
        run.data["stages"][name]["status"] = "ok"
    run.data["stages"]["four_bit"]["status"] = "timeout"
    assert run.failed() == []
    run.data["stages"]["four_bit"]["status"] = "failed"  # an error in it still fails the check
    run.data["stages"]["packing"]["status"] = "timeout"
    assert run.failed() == ["packing", "four_bit"]


def test_lognormal_lengths_are_deterministic_and_clipped():
    from gpu_check_worker import lognormal_lengths

    a = lognormal_lengths(2000, seed=1, median=600, sigma=0.9, cap=4096)
    assert a == lognormal_lengths(2000, seed=1, median=600, sigma=0.9, cap=4096)
    assert max(a) == 4096 and min(a) >= 16
    assert 540 <= sorted(a)[1000] <= 660


def test_trim_wheel_drops_files_and_their_record_lines(tmp_path):
    from trim_wheel import trim

    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": "x = 1\n", "pkg/lib_cuda130.so": "a", "pkg/lib_cuda118.so": "b",
             "studio/app.js": "c", "pkg-1.0.dist-info/METADATA": "Name: pkg\n"}
    record = "".join(f"{n},sha256=fake,1\n" for n in files) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    dst = tmp_path / "out" / src.name
    dst.parent.mkdir()
    n, _ = trim(str(src), str(dst), drop=["studio/"], drop_glob=["pkg/lib_*.so"], keep_glob=["pkg/lib_cuda130.so"])
    assert n == 2
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        kept_record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert names == {"pkg/__init__.py", "pkg/lib_cuda130.so", "pkg-1.0.dist-info/METADATA", "pkg-1.0.dist-info/RECORD"}
    assert "studio/app.js" not in kept_record and "lib_cuda118" not in kept_record and "lib_cuda130" in kept_record


@pytest.mark.slow
def test_gpu_path_imports_are_covered_by_the_image_and_the_carried_wheels(tmp_path):
    """Unsloth's CUDA-shaped import path (UNSLOTH_ALLOW_CPU=1) with everything else blocked imports fine."""
    pytest.importorskip("unsloth")
    report = tmp_path / "imports.json"
    proc = run([sys.executable, "scripts/check_gpu_imports.py", "--json", str(report)], timeout=600,
               UNSLOTH_ALLOW_CPU="1", UNSLOTH_COMPILE_LOCATION=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(report.read_text())
    assert {"unsloth", "unsloth-zoo", "trl", "datasets"} <= set(res["from_wheels"])
    assert "torch" in res["from_image"] and "transformers" in res["from_image"]
