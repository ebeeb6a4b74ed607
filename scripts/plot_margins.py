"""Render beta, tau, p_hat and margin quantiles of a dynamic-beta DPO run to a PNG.

    python scripts/plot_margins.py outputs/dpo_ws2                       # -> outputs/dpo_ws2/logs/margins/margins.png
    python scripts/plot_margins.py path/to/margins.jsonl --out beta.png

Reads the margins JSONL written by rank 0 (one ``step`` record per optimizer
step, a ``warmup_end`` record, ``resume`` markers). When a run was resumed
into the same file, the last record of a step wins. The x axis is the
trainer's ``global_step`` (1-based, as in trainer_state.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def find_log(path: str) -> str:
    """The JSONL for a run dir, a margins dir or the file itself; raises FileNotFoundError."""
    candidates = [path, os.path.join(path, "margins.jsonl"), os.path.join(path, "logs", "margins", "margins.jsonl")]
    for cand in candidates:
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"no margins JSONL at {path!r} (looked for {candidates[1:]})")


def read_records(log_path: str) -> tuple[list[dict], list[dict]]:
    """``(step records sorted by global_step, last one per step wins; warmup_end records)``."""
    steps, warmup_ends = {}, []
    with open(log_path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if rec.get("type") == "step":
                steps[rec["global_step"]] = rec
            elif rec.get("type") == "warmup_end":
                warmup_ends.append(rec)
    return [steps[k] for k in sorted(steps)], warmup_ends


def plot(records: list[dict], warmup_ends: list[dict], out_path: str, title: str = "") -> str:
    """Four panels (beta, tau, p_hat, margin quantiles) sharing the step axis. Returns ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["global_step"] for r in records]

    def series(key, source=None):
        pts = [(xi, (r if source is None else r[source]).get(key)) for xi, r in zip(x, records)]
        pts = [(a, b) for a, b in pts if b is not None]
        return [a for a, _ in pts], [b for _, b in pts]

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(*series("beta_used"), label="beta (used at step)")
    axes[0].plot(*series("beta_next"), linestyle="--", label="beta (next step)")
    axes[0].set_ylabel("beta")
    axes[1].plot(*series("tau"), color="tab:orange", label="tau")
    axes[1].set_ylabel("tau")
    px, py = series("p_hat")
    axes[2].plot(px, py, color="tab:green", marker=".", linestyle="-", label="p_hat")
    flagged = [(a, b) for a, b, r in zip(px, py, [r for r in records if r.get("p_hat") is not None]) if r.get("risk_over")]
    if flagged:
        axes[2].scatter([a for a, _ in flagged], [b for _, b in flagged], color="tab:red", zorder=3, label="over-risk")
    axes[2].set_ylabel("p_hat")
    for key, style in (("p10", ":"), ("p50", "-"), ("p90", "--"), ("mean", "-.")):
        axes[3].plot(*series(key, "margins"), linestyle=style, label=f"margin {key}")
    axes[3].set_ylabel("margin")
    axes[3].set_xlabel("optimizer step")
    for ax in axes:
        for rec in warmup_ends:
            ax.axvline(rec["global_step"], color="grey", linewidth=0.8, linestyle=":")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "dynamic-beta DPO")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run dir, margins dir, or margins.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: margins.png next to the JSONL)")
    args = parser.parse_args(argv)
    try:
        log_path = find_log(args.path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records, warmup_ends = read_records(log_path)
    if not records:
        print(f"error: {log_path} has no step records", file=sys.stderr)
        return 2
    out = args.out or os.path.join(os.path.dirname(log_path), "margins.png")
    plot(records, warmup_ends, out, title=os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(log_path)))))
    print(f"wrote {out} ({len(records)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
