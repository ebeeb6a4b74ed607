"""Tokenize a dataset once, ahead of training, for a given model's tokenizer.

    python train_scripts/precompute_dataset.py --model_name data/tiny-qwen3 --dataset data/sft \
        --name tiny-sft --max_seq_length 1024
    torchrun --nproc_per_node=2 train_scripts/train_configurable.py \
        --skip_prepare --prepared_dataset_path outputs/precomputed/tiny-sft --max_seq_length 1024

    # preference pairs (pairs, Anthropic HH or judged rollout JSONL) for DPO
    python train_scripts/precompute_dataset.py --format preference --dataset data/preference \
        --name tiny-pref --max_seq_length 512 --max_prompt_length 256

Writes ``<output_root>/<name>/train`` and ``.../val`` (``Dataset.save_to_disk``)
plus ``cache_metadata.json`` (tokenizer fingerprint, data fingerprints, length
limit, formatting options, what was dropped or truncated, library versions,
file checksums) and a ``READY`` marker, published atomically like the dataset
cache. Only the tokenizer of ``--model_name`` is loaded, not the weights.

Chat data becomes ``input_ids``/``labels`` (``--assistant_only`` masks
everything but assistant replies); sequences longer than ``--max_seq_length``
keep their start and records left with nothing to learn from are dropped.
Preference data becomes ``prompt_ids``/``chosen_ids``/``rejected_ids``,
clamped so that long prompts are cut from the left and completions fit.

Before the tokenizer loads, the model folder (tokenizer files), every record
of the split (decoding, columns) and the output folder are checked; each
problem is one ``error:`` line and exit code 2 (``--debug`` shows the traceback).

Training loads it with ``opensloth.cache.load_prepared_dataset``, which
refuses data made with another tokenizer or a longer length limit. Preference
data goes through the same pipeline as ``train_dpo.py``
(:mod:`opensloth.data.preference`; formats in :mod:`opensloth.data.formats`).

The original OpenSloth's command line works too::

    python train_scripts/precompute_dataset.py --model_name data/tiny-qwen3 --dataset_name data/sft \
        --output_dir outputs/precomputed --target_token_only --dataset_name_suffix v1

``--dataset_name`` and ``--output_dir`` are ``--dataset`` and ``--output_root``;
without ``--name`` the folder gets the original's name
(``<model>_<dataset>[_target_only][_<suffix>]_processed``);
``--target_token_only`` trains only the tokens after each ``--response_part``
up to the next ``--instruction_part`` (:mod:`opensloth.data.response_markers`);
``--batch_size`` is accepted and unused, as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from opensloth.cache.key import compute_cache_key, dataset_fingerprint, tokenizer_fingerprint
from opensloth.cache.store import inspect_prepared, library_versions, publish_prepared
from opensloth.config import ArgumentParser
from opensloth.data import (DatasetSourceError, load_preference_dataset, load_records, prepare_chat_dataset,
                            tokenize_preference_dataset)
from opensloth.data.formats import PREFERENCE_FORMATS
from opensloth.data.response_markers import DEFAULT_INSTRUCTION_PART, DEFAULT_RESPONSE_PART, mask_to_responses
from opensloth.errors import UserInputError, one_line, run_cli
from opensloth.log import log_rank0, warn_rank0
from opensloth.preflight import DataCheck, check_data, check_model_folder, check_model_source, check_output_dir

# Formats that start from text (a prepared folder is already tokenized).
TEXT_FORMATS = ("auto", *(name for name, spec in PREFERENCE_FORMATS.items() if not spec.tokenized))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="data/tiny-qwen3", help="model folder or hub id whose tokenizer to use")
    p.add_argument("--dataset", "--dataset_name", dest="dataset", default="data/sft",
                   help="file, folder or hub id (see opensloth.data.load_records); --dataset_name is the original's name")
    p.add_argument("--name", default=None,
                   help="output folder name under --output_root (default: the original OpenSloth's "
                        "<model>_<dataset>[_target_only][_<suffix>]_processed)")
    p.add_argument("--output_root", "--output_dir", dest="output_root", default="outputs/precomputed",
                   help="parent of the output folder; --output_dir is the original's name")
    p.add_argument("--format", choices=("chat", "preference"), default="chat",
                   help="chat: messages -> input_ids/labels; preference: pairs/chat pairs/HH/judged -> prompt/chosen/rejected ids")
    p.add_argument("--preference_format", choices=TEXT_FORMATS, default="auto",
                   help="input layout for --format preference (see opensloth.data.formats)")
    p.add_argument("--hh_parser", choices=("shared_prefix", "reference"), default="shared_prefix",
                   help="Anthropic HH transcripts: shared_prefix, or reference (the dynamic-DPO repositories' parser; "
                        "see opensloth.data.hh)")
    p.add_argument("--train_split", default="train", help="split to tokenize for training; slicing like train[:10%%] works")
    p.add_argument("--val_split", default="test", help="split to tokenize for evaluation ('' for none)")
    p.add_argument("--train_samples", type=int, default=None, help="keep the first N training records")
    p.add_argument("--val_samples", type=int, default=None, help="keep the first N evaluation records")
    p.add_argument("--max_seq_length", type=int, default=1024, help="token budget per sequence (prompt + completion)")
    p.add_argument("--max_prompt_length", type=int, default=None, help="preference only: token budget of the prompt")
    p.add_argument("--assistant_only", action="store_true",
                   help="chat only: labels only on assistant replies (needs {%% generation %%} in the chat template)")
    p.add_argument("--num_proc", type=int, default=None, help="worker processes for tokenization")
    legacy = p.add_argument_group("the original OpenSloth's flags")
    legacy.add_argument("--target_token_only", action="store_true",
                        help="chat only: labels only after each --response_part up to the next --instruction_part "
                             "(works without {%% generation %%} markers)")
    legacy.add_argument("--instruction_part", default=DEFAULT_INSTRUCTION_PART,
                        help="marker before user turns (with --target_token_only)")
    legacy.add_argument("--response_part", default=DEFAULT_RESPONSE_PART,
                        help="marker before assistant turns (with --target_token_only)")
    legacy.add_argument("--dataset_name_suffix", default="", help="appended to the default folder name as _<suffix>")
    legacy.add_argument("--batch_size", type=int, default=None, help="accepted and unused (as in the original)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if an identical output already exists")
    p.add_argument("--debug", action="store_true", help="print the Python traceback above an error line")
    return p


def original_folder_name(model_name: str, dataset: str, target_token_only: bool, suffix: str) -> str:
    """The folder name the original OpenSloth's precompute_dataset.py derived from its flags."""
    name = f"{model_name.replace('/', '_').replace('-', '_')}_{dataset.replace('/', '_')}"
    return f"{name}{'_target_only' if target_token_only else ''}{f'_{suffix}' if suffix else ''}_processed"
def check_args(args) -> None:
    """Everything that can be checked before the tokenizer loads (one UserInputError per problem)."""
    if args.max_seq_length < 8:
        raise UserInputError(f"--max_seq_length {args.max_seq_length} is too small; use at least 8")
    if args.max_prompt_length is not None and not 1 <= args.max_prompt_length < args.max_seq_length:
        raise UserInputError(f"--max_prompt_length {args.max_prompt_length} must be >= 1 and below --max_seq_length "
                             f"{args.max_seq_length}")
    for name in ("train_samples", "val_samples", "num_proc"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserInputError(f"--{name} {value} must be >= 1 (or left out)")
    if not args.name.strip() or os.path.isabs(args.name) or ".." in args.name.split(os.sep):
        raise UserInputError(f"--name {args.name!r} must be a folder name under --output_root {args.output_root!r}")
    if args.format == "chat" and args.preference_format != "auto":
        raise UserInputError("--preference_format is read only with --format preference")
    if check_model_source(args.model_name) == "local":
        check_model_folder(args.model_name, weights=False)  # only the tokenizer is loaded
    kind = "chat" if args.format == "chat" else "preference"
    check_data(DataCheck(args.dataset, args.train_split, kind, fmt=args.preference_format))
    check_output_dir(os.path.join(args.output_root, args.name), None, flag="--output_root")


def _limit(ds, n):
    return ds if n is None else ds.select(range(min(n, len(ds))))


def _split_exists(dataset: str, split: str) -> bool:
    try:
        load_records(dataset, split)
    except DatasetSourceError:
        return False
    return True


def tokenize_split(args, tokenizer, split: str, samples: int | None, label: str):
    """Load one split and tokenize it; returns ``(raw, tokenized, report)``."""
    if args.format == "chat":
        raw = _limit(load_records(args.dataset, split), samples)
        tokenized, report = prepare_chat_dataset(
            raw, tokenizer, mode="tokens", assistant_only=args.assistant_only,
            max_seq_length=args.max_seq_length, num_proc=args.num_proc, name=label, source=args.dataset,
        )
        if not args.target_token_only:
            return raw, tokenized, [report]
        tokenized, marker_report = mask_to_responses(tokenized, tokenizer, args.instruction_part, args.response_part,
                                                     name=f"{label} responses only")
        return raw, tokenized, [report, marker_report]
    pairs, load_report = load_preference_dataset(args.dataset, split, fmt=args.preference_format,
                                                 hh_parser=args.hh_parser)
    raw = _limit(pairs, samples)
    tokenized, clamp_report = tokenize_preference_dataset(
        raw, tokenizer, max_length=args.max_seq_length, max_prompt_length=args.max_prompt_length, name=label,
    )
    return raw, tokenized, [load_report, clamp_report]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target_token_only and args.format != "chat":
        raise UserInputError("--target_token_only masks chat data; preference data trains on completions already")
    if args.batch_size is not None:
        warn_rank0("--batch_size is accepted for the original's command lines and unused (the original ignored it too)")
    if args.name is None:
        args.name = original_folder_name(args.model_name, args.dataset, args.target_token_only, args.dataset_name_suffix)
        log_rank0(f"no --name: writing to {os.path.join(args.output_root, args.name)} (the original OpenSloth's name)")
    check_args(args)

    from transformers import AutoTokenizer

    out_path = os.path.join(args.output_root, args.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    except OSError as exc:
        raise UserInputError(f"could not load the tokenizer of --model_name {args.model_name!r}: {one_line(exc)}; "
                             "pass a local model folder or a hub id in the Hugging Face cache") from exc
    start = time.perf_counter()

    try:
        raw_train, train, train_reports = tokenize_split(args, tokenizer, args.train_split, args.train_samples,
                                                         "train")
        raw_val = val = None
        val_reports = []
        if args.val_split and _split_exists(args.dataset, args.val_split):
            raw_val, val, val_reports = tokenize_split(args, tokenizer, args.val_split, args.val_samples, "val")
        elif args.val_split:
            log_rank0(f"{args.dataset} has no split {args.val_split!r}; writing train only")
    except UserInputError:
        raise
    except ValueError as exc:  # the data functions' own checks (e.g. --assistant_only without markers)
        raise UserInputError(one_line(exc)) from exc

    formatting = {
        "format": args.format,
        "preference_format": args.preference_format if args.format == "preference" else None,
        "assistant_only": args.assistant_only,
        "max_prompt_length": args.max_prompt_length,
        "truncation": "keep_start" if args.format == "chat" else "prompt_left",
    }
    if args.target_token_only:  # only then: the keys of other folders stay as they were
        formatting["responses_only"] = [args.instruction_part, args.response_part]
    tok = tokenizer_fingerprint(tokenizer)
    key_parts = {
        "data": {
            "train": dataset_fingerprint(raw_train),
            "val": dataset_fingerprint(raw_val) if raw_val is not None else None,
        },
        "tokenizer": tok["combined"],
        "max_seq_length": args.max_seq_length,
        "params": formatting,
    }
    key = compute_cache_key(key_parts)
    existing = inspect_prepared(out_path, key)
    if existing.ok and not args.overwrite:
        log_rank0(f"{out_path} already holds this exact dataset (key {key}); nothing to do (--overwrite rebuilds)")
        return 0
    metadata = {
        "cache_key": key,
        "key_parts": key_parts,
        "tokenizer": tok,
        "source": {"dataset": args.dataset, "train_split": args.train_split, "val_split": args.val_split or None,
                   "train_samples": args.train_samples, "val_samples": args.val_samples,
                   "model_name": args.model_name},
        "reports": [r.as_dict() for r in train_reports + val_reports],
        "versions": library_versions(),
        "created_by": {"script": "train_scripts/precompute_dataset.py"},
    }
    written = publish_prepared(out_path, {"train": train, "val": val}, metadata)
    for report in train_reports + val_reports:
        log_rank0(report.summary())
    sizes = ", ".join(f"{name}: {s['rows']} rows, {s.get('num_tokens', 0)} tokens" for name, s in written["splits"].items())
    log_rank0(f"wrote {out_path} ({sizes}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
