"""scripts/gpu_check.sh --dry-run: every stage of the GPU check, its result files and its checks, on CPU.

The real Unsloth GPU path needs CUDA; the dry run drives the same stages (the
worker's three SFT configurations alternated, the packing comparison with its
negative control, 1 vs 2 ranks with OPENSLOTH_SHARE_DEVICE=1, dynamic-beta
DPO) on the tiny model, so the orchestration, the result files and the
comparisons cannot rot. Also: a stage that overruns its cap is recorded as a
timeout while the others still report, and the wheel trimmer keeps RECORD
consistent.
"""

from __future__ import annotations

import json
import sys
import zipfile

import pytest
from conftest import REPO, run

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
    assert thr["order"] == ["unsloth", "unsloth", "unsloth_token_balance", "opensloth"]  # warm-up, then A B C
    assert thr["same_tokens_per_step"] is True  # the three configurations trained on the same samples
    for config, summary in thr["summary"].items():
        assert summary["tokens_per_second"] > 0, config
    assert thr["summary"]["unsloth"]["ratio_vs_unsloth"] == 1.0
    assert thr["runs"]["opensloth"][-1]["opensloth_layout"] in ("varlen", "rows4d", "padded")
    assert thr["runs"]["unsloth"][-1]["opensloth_layout"] is None  # the patch was really off

    pk = st["packing"]["result"]
    assert pk["honest_ok"] and pk["leaks_detected"]
    assert pk["max_abs_logprob_diff"]["leak_naive_concat"] > 10 * pk["max_abs_logprob_diff"]["opensloth_varlen"]

    tr = st["two_ranks"]["result"]
    assert tr["steps"] == 4 and tr["max_rel_loss_difference"] <= tr["tolerance"] < tr["mixup_scale"]

    dp = st["dpo"]["result"]
    assert dp["steps"] == 4 and dp["phase"][0] == "warmup" and dp["phase"][-1] == "dynamic"
    assert dp["beta_next"][-1] != dp["beta_used"][0]  # the controller moved beta

    md = (out / "results.md").read_text()
    for heading in ("| stage | status |", "LoRA SFT throughput", "Packed forward", "1 rank vs 2 ranks",
                    "Dynamic-beta DPO"):
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
