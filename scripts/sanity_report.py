"""Compare the runs of scripts/sanity_check_training.sh against the 1-process reference.

    python scripts/sanity_report.py --root outputs/sanity --tasks sft dpo --tolerance 1e-3 --png sanity.png

For every task it reads ``<root>/<task>_<label>_ws<N>[_nopatches]/trainer_state.json``
(per-step ``loss`` and ``eval_loss``) and, for DPO, the beta trajectory from
``logs/margins/margins.jsonl``; prints a table of the maximum deviation of
each run from its 1-process reference (``<task>_<label>_ws1`` when that run
exists, else ``<task>_plain_ws1``) and the wall-clock of each run
(``walltimes.tsv``); draws all curves into one PNG; exits 1 when a deviation
exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REFERENCE = "plain_ws1"


NO_PATCHES_SUFFIX = "_nopatches"  # train scripts add it to the run dir of a --no_patches run


def _runs(root: str, task: str) -> dict[str, str]:
    """Run name (``<task>_<label>_ws<N>``, as in walltimes.tsv) -> its folder, in report order."""
    folders = [d for d in os.listdir(root) if d.startswith(f"{task}_") and os.path.isdir(os.path.join(root, d))]
    names = {d.removesuffix(NO_PATCHES_SUFFIX): d for d in folders}
    order = {"plain_ws1": 0, "patched_ws1": 1, "patched_ws2": 2, "patched_ws4": 3, "plain_ws4": 4}
    return {n: names[n] for n in sorted(names, key=lambda n: (order.get(n[len(task) + 1:], 9), n))}


def _series(run_dir: str, key: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "trainer_state.json")) as fh:
        history = json.load(fh)["log_history"]
    return {rec["step"]: rec[key] for rec in history if key in rec}


def _beta(run_dir: str) -> dict[int, float]:
    path = os.path.join(run_dir, "logs", "margins", "margins.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return {r["step"]: r["beta_used"] for r in records if r.get("type") == "step"}


def _max_dev(a: dict[int, float], b: dict[int, float]) -> float | None:
    if not a:
        return None
    if sorted(a) != sorted(b):
        return float("inf")  # different steps logged: a failure in itself
    return max(abs(a[k] - b[k]) for k in a)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder holding the run directories")
    p.add_argument("--tasks", nargs="+", default=["sft", "dpo"], help="tasks to compare")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max allowed |loss - reference loss|")
    p.add_argument("--png", default=None, help="write all curves to this PNG")
    args = p.parse_args()

    walltimes = {}
    wt_path = os.path.join(args.root, "walltimes.tsv")
    if os.path.exists(wt_path):
        with open(wt_path) as fh:
            walltimes = {name: int(ms) / 1000 for name, ms in (line.split("\t") for line in fh if line.strip())}

    failures, curves = [], {}
    print("\n| task | run | reference | steps | final loss | max dev loss | max dev eval_loss | max dev beta | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        names = _runs(args.root, task)
        if not any(n.endswith("_ws1") for n in names):
            print(f"missing a 1-process reference run {task}_*_ws1 in {args.root}", file=sys.stderr)
            return 1
        for name in names:
            label = name[len(task) + 1:].rsplit("_ws", 1)[0]
            ref_name = f"{task}_{label}_ws1" if f"{task}_{label}_ws1" in names else f"{task}_{REFERENCE}"
            ref_dir = os.path.join(args.root, names[ref_name])
            ref = {k: _series(ref_dir, k) for k in ("loss", "eval_loss")}
            ref_beta = _beta(ref_dir)
            run_dir = os.path.join(args.root, names[name])
            cur = {k: _series(run_dir, k) for k in ("loss", "eval_loss")}
            beta = _beta(run_dir)
            curves[name] = (cur["loss"], cur["eval_loss"], beta)
            devs = {k: _max_dev(ref[k], cur[k]) for k in ("loss", "eval_loss")}
            devs["beta"] = _max_dev(ref_beta, beta) if ref_beta else None
            fmt = {k: ("-" if v is None else f"{v:.2e}") for k, v in devs.items()}
            final = cur["loss"][max(cur["loss"])] if cur["loss"] else float("nan")
            print(f"| {task} | {name[len(task) + 1:]} | {ref_name[len(task) + 1:]} | {len(cur['loss'])} | {final:.4f} | {fmt['loss']} | "
                  f"{fmt['eval_loss']} | {fmt['beta']} | {walltimes.get(name, float('nan')):.1f} |")
            bad = [k for k, v in devs.items() if v is not None and v > args.tolerance]
            if bad:
                failures.append(f"{name}: {', '.join(f'{k} deviates by {devs[k]:.2e}' for k in bad)}")
    print(f"\ntolerance {args.tolerance:g} (absolute)")

    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.tasks) + (1 if any(t.startswith("dpo") for t in args.tasks) else 0),
                                 figsize=(6 * (len(args.tasks) + 1), 4.2), squeeze=False)
        axes = axes[0]
        for ax, task in zip(axes, args.tasks):
            for name, (loss, eval_loss, _) in curves.items():
                if not name.startswith(task + "_"):
                    continue
                label = name[len(task) + 1:]
                style = "-" if "plain_ws1" in label else "--"
                ax.plot(list(loss), list(loss.values()), style, label=f"{label} train", alpha=0.8)
                if eval_loss:
                    ax.plot(list(eval_loss), list(eval_loss.values()), "o" + style, label=f"{label} eval", alpha=0.8)
            ax.set_title(f"{task}: loss by world size (global batch fixed)")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss")
            ax.legend(fontsize=7)
        if any(t.startswith("dpo") for t in args.tasks):
            ax = axes[-1]
            for name, (_, _, beta) in curves.items():
                if name.startswith("dpo") and beta:
                    ax.plot(list(beta), list(beta.values()), label=name)
            ax.set_title("dpo: dynamic beta by world size")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("beta used")
            ax.legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"figure: {args.png}")

    if failures:
        print("FAIL:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("PASS: every curve is within tolerance of the 1-process run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
