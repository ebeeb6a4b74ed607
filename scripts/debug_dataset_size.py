"""How many records survive each data stage, and how many optimizer steps that makes.

    python scripts/debug_dataset_size.py --dataset data/sft --max_seq_length 1024 \
        --world_size 2 --per_device_batch_size 8 --grad_accum 2
    python scripts/debug_dataset_size.py --format preference --dataset data/formats/hh_sample.jsonl \
        --max_seq_length 256 --max_prompt_length 128
    python scripts/debug_dataset_size.py --prepared_dataset_path outputs/precomputed/tiny-sft --world_size 8

For chat data the stages are: loaded -> bad structure / empty (dropped) ->
tokenized and truncated to --max_seq_length (kept, shortened) -> nothing left
to learn from after truncation (dropped, ``too_long``). For preference data:
loaded -> bad structure / empty / identical / tie / single candidate
(dropped) -> clamped to the length budget (kept, shortened). Nothing here
depends on the world size except the step count: every rank sees the same
records, the sampler deals them out.

Steps follow ``transformers.Trainer`` under DDP (accelerate's even batches):
``ceil(ceil(N / per_device_batch_size) / world_size / grad_accum)`` per epoch.
"""

from __future__ import annotations

import argparse
import json
import sys

from opensloth.data.formats import format_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="data/sft", help="file, folder or hub id")
    p.add_argument("--split", default="train", help="split, slicing allowed (train[:10%%])")
    p.add_argument("--format", choices=("chat", "preference"), default="chat", help="what the records are")
    p.add_argument("--preference_format", choices=[f for f in format_names() if f != "prepared"], default="auto",
                   help="input layout for --format preference (see opensloth.data.formats)")
    p.add_argument("--model_name", default="data/tiny-qwen3", help="model folder or hub id whose tokenizer to use")
    p.add_argument("--max_seq_length", type=int, default=1024, help="token budget per sequence")
    p.add_argument("--max_prompt_length", type=int, default=None, help="preference only: prompt token budget")
    p.add_argument("--assistant_only", action="store_true", help="chat only: loss on assistant replies only")
    p.add_argument("--prepared_dataset_path", default=None,
                   help="report on a precompute_dataset.py output instead (no tokenizer needed)")
    p.add_argument("--world_size", type=int, default=1, help="number of ranks")
    p.add_argument("--per_device_batch_size", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--grad_accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def chat_stages(args) -> tuple[list[tuple[str, int, str]], int]:
    from transformers import AutoTokenizer

    from opensloth.data import load_records, prepare_chat_dataset

    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    raw = load_records(args.dataset, args.split)
    _, report = prepare_chat_dataset(
        raw, tokenizer, mode="tokens", assistant_only=args.assistant_only,
        max_seq_length=args.max_seq_length, source=args.dataset,
    )
    d = report.dropped
    rows = [
        (f"loaded ({args.dataset} {args.split})", report.total_in, ""),
        ("dropped: bad structure", -d.get("bad_structure", 0), "messages not a list of role/content strings"),
        ("dropped: empty", -d.get("empty", 0), "no assistant reply with content"),
        ("dropped: too long", -d.get("too_long", 0), f"no trainable token left within {args.max_seq_length}"),
        ("kept", report.total_out, ""),
        ("  of which truncated", report.truncated, f"shortened to {args.max_seq_length} tokens (keep start)"),
    ]
    return rows, report.total_out


def preference_stages(args) -> tuple[list[tuple[str, int, str]], int]:
    from transformers import AutoTokenizer

    from opensloth.data import load_preference_dataset, tokenize_preference_dataset

    pairs, load_report = load_preference_dataset(args.dataset, args.split, fmt=args.preference_format)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    _, clamp_report = tokenize_preference_dataset(
        pairs, tokenizer, max_length=args.max_seq_length, max_prompt_length=args.max_prompt_length
    )
    rows = [(f"loaded ({args.dataset} {args.split})", load_report.total_in, "")]
    notes = {
        "bad_structure": "not a usable record for its format",
        "empty": "blank prompt or completion",
        "identical_texts": "chosen == rejected",
        "tie": "best and worst judged scores equal",
        "single_candidate": "fewer than two candidates",
    }
    for reason, n in load_report.dropped.items():
        rows.append((f"dropped: {reason.replace('_', ' ')}", -n, notes.get(reason, "")))
    rows.append(("kept", clamp_report.total_out, ""))
    budget = f"prompt cut from the left to fit {args.max_seq_length}"
    if args.max_prompt_length:
        budget += f" (prompt <= {args.max_prompt_length})"
    rows.append(("  of which truncated", clamp_report.truncated, budget))
    return rows, clamp_report.total_out


def prepared_stages(args) -> tuple[list[tuple[str, int, str]], int]:
    from opensloth.cache.store import inspect_prepared

    status = inspect_prepared(args.prepared_dataset_path, verify="size")
    if not status.ok:
        raise SystemExit(f"{args.prepared_dataset_path}: {status.reason}")
    meta = status.metadata
    rows = []
    for report in meta.get("reports", []):
        rows.append((f"[{report['name']}] read", report["total_in"], ""))
        for reason, n in report["dropped"].items():
            rows.append((f"[{report['name']}] dropped: {reason.replace('_', ' ')}", -n, ""))
        if report.get("truncated"):
            rows.append((f"[{report['name']}] truncated (kept)", report["truncated"], ""))
    train_rows = meta["splits"]["train"]["rows"]
    rows.append(("train rows on disk", train_rows, f"longest {meta['splits']['train'].get('max_tokens')} tokens"))
    return rows, train_rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from opensloth.data.report import batches_per_rank, expected_steps_per_epoch

    if args.prepared_dataset_path:
        rows, kept = prepared_stages(args)
    elif args.format == "chat":
        rows, kept = chat_stages(args)
    else:
        rows, kept = preference_stages(args)
    batches = batches_per_rank(kept, args.world_size, args.per_device_batch_size)
    steps = expected_steps_per_epoch(kept, args.world_size, args.per_device_batch_size, args.grad_accum)
    global_batch = args.world_size * args.per_device_batch_size * args.grad_accum
    if args.json:
        print(json.dumps({"stages": [{"stage": s, "records": n, "note": note} for s, n, note in rows],
                          "kept": kept, "batches_per_rank": batches, "steps_per_epoch": steps,
                          "global_batch": global_batch}, indent=2))
        return 0
    width = max(len(s) for s, _, _ in rows)
    print(f"{'stage':<{width}}  {'records':>8}  note")
    for stage, n, note in rows:
        print(f"{stage:<{width}}  {n:>8}  {note}")
    print()
    print(f"global batch = {args.world_size} rank(s) x {args.per_device_batch_size} per device x "
          f"{args.grad_accum} accum = {global_batch} records per optimizer step")
    print(f"per epoch: {batches} batches per rank, {steps} optimizer steps "
          f"({kept} records; the last batch is topped up from the start so every rank takes the same number)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
