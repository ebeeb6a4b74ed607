"""Accuracy per iteration of an OaK-DPO run, as a table and a plot, rebuilt from the run folder.

    python scripts/oak_report.py outputs/oak_demo --png docs/img/oak_accuracy.png

Everything is read back from disk (``eval/sft.json`` and each iteration's
completion marker), so a resumed run reports the same as an uninterrupted one.
"""

from __future__ import annotations

import json
import os

from opensloth.atomic import write_json_atomic, write_text_atomic
from opensloth.online_dpo.layout import completed_iterations, read_marker

SFT_EVAL = os.path.join("eval", "sft.json")


def collect_summary(output: str) -> list[dict]:
    """One row per evaluated policy: iteration 0 is the SFT model, k the policy after DPO round k."""
    rows = []
    sft_path = os.path.join(output, SFT_EVAL)
    if os.path.isfile(sft_path):
        with open(sft_path) as fh:
            ev = json.load(fh)
        rows.append({"iteration": 0, "policy": "SFT", "accuracy": ev["accuracy"], "n": ev["n"],
                     "sampled_accuracy": ev.get("sampled_accuracy")})
    for k in completed_iterations(output):
        marker = read_marker(output, k)
        ev = marker.get("eval") or {}
        rollout = marker.get("rollout", {})
        rows.append({
            "iteration": k, "policy": f"DPO round {k}", "accuracy": ev.get("accuracy"), "n": ev.get("n"),
            "sampled_accuracy": ev.get("sampled_accuracy"),
            "rollout_score": rollout.get("mean_score"), "prompts": rollout.get("prompts"),
            "pairs": rollout.get("pairs"), "skipped": rollout.get("skipped"),
            "dpo_steps": marker.get("dpo", {}).get("steps"), "final_beta": marker.get("dpo", {}).get("final_beta"),
            "seconds": marker.get("seconds"),
        })
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_markdown(rows: list[dict]) -> str:
    """A markdown table of :func:`collect_summary` rows."""
    lines = ["| iteration | policy | held-out accuracy, greedy (n) | held-out accuracy, sampled | "
             "rollout mean score (policy before the round) | pairs | skipped | DPO steps | final beta | seconds |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in rows:
        acc = "-" if row.get("accuracy") is None else f"{row['accuracy']:.3f} ({row['n']})"
        skipped = row.get("skipped")
        skipped_text = "-" if skipped is None else (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "0")
        lines.append(f"| {row['iteration']} | {row['policy']} | {acc} | {_fmt(row.get('sampled_accuracy'), '.3f')} | "
                     f"{_fmt(row.get('rollout_score'), '.3f')} | "
                     f"{_fmt(row.get('pairs'), 'd')} | {skipped_text} | {_fmt(row.get('dpo_steps'), 'd')} | "
                     f"{_fmt(row.get('final_beta'), '.4g')} | {_fmt(row.get('seconds'), '.1f')} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict], png: str, title: str = "OaK-DPO: held-out accuracy per iteration") -> str:
    """Write a PNG of held-out accuracy (and rollout mean score) against the iteration. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot([r["iteration"] for r in evaluated], [r["accuracy"] for r in evaluated], marker="o",
            label="held-out, greedy answer")
    sampled = [r for r in rows if r.get("sampled_accuracy") is not None]
    if sampled:
        ax.plot([r["iteration"] for r in sampled], [r["sampled_accuracy"] for r in sampled], marker="s",
                linestyle="--", label="held-out, sampled answers")
    ax.set_xlabel("iteration (0 = SFT policy, k = after DPO round k)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks([r["iteration"] for r in rows])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def write_reports(output: str, png: str | None = None, title: str | None = None) -> dict:
    """Write ``oak_summary.json`` and ``oak_summary.md`` (and a PNG when matplotlib is installed)."""
    rows = collect_summary(output)
    write_json_atomic(os.path.join(output, "oak_summary.json"), {"rows": rows})
    write_text_atomic(os.path.join(output, "oak_summary.md"), summary_markdown(rows))
    png = png or os.path.join(output, "oak_accuracy.png")
    try:
        plot_accuracy(rows, png, **({"title": title} if title else {}))
    except ImportError:
        png = None
    return {"rows": rows, "png": png}


SECTION = "oak_dpo"  # the docs/benchmarks.md block scripts/oak_demo.py writes
