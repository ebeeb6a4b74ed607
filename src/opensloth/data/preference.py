"""The one preference-data pipeline: any supported format -> ``prompt``/``chosen``/``rejected`` -> token ids.

It feeds ``train_dpo.py`` (:func:`load_preference_splits`; TRL tokenizes),
``precompute_dataset.py`` (:func:`load_preference_dataset` then
:func:`tokenize_preference_dataset`) and the OaK-DPO loop
(:func:`pairs_to_dataset` on the judged rollout pairs) alike.

Formats are specs in the registry :mod:`opensloth.data.formats`: ``judged``
rollouts (ours, and the ``prompt_messages`` ones of dynamic-dpo-v1), ``pairs``
(prompt/chosen/rejected), ``chat_pairs`` (conversations that differ in the
last reply), Anthropic ``hh`` transcripts, and ``prepared`` folders;
``fmt="auto"`` picks one from the columns and the first row.

:func:`load_preference_splits` logs one size line per launch and split: the
records read, each format stage's drops and counts, the ``val_ratio`` split
and the ``train_samples`` / ``test_samples`` cut.

Length policy (:func:`clamp_preference_record`), applied to token ids:

1. A prompt longer than ``max_prompt_length`` keeps its last
   ``max_prompt_length`` tokens (truncated from the left: the end of the
   prompt, right before the reply, matters most).
2. If prompt + the longer completion still exceeds ``max_length``, the prompt
   is cut further from the left so that both completions fit whole.
3. Only when a completion alone leaves less than ``min_prompt_tokens`` of
   room is it cut (from the right, keeping its start), so that the prompt
   keeps ``min(len(prompt), min_prompt_tokens)`` tokens.

A record never raises because it is long; the number of records whose prompt
or completions were shortened is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from opensloth.data.errors import DatasetFormatError, MissingColumnsError, require_columns
from opensloth.data.formats import PREFERENCE_FORMATS, detect_preference_format, format_names
from opensloth.data.report import IDENTICAL_TOKENS, DropReport
from opensloth.data.sources import load_records
from opensloth.errors import UserInputError
from opensloth.log import log_rank0

__all__ = [
    "ClampResult",
    "clamp_preference_record",
    "detect_preference_format",
    "load_preference_dataset",
    "load_preference_splits",
    "pairs_to_dataset",
    "tokenize_preference_dataset",
]


@dataclass(frozen=True)
class ClampResult:
    """A preference record cut to fit; see the module doc for the policy."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    completion_truncated: bool

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.completion_truncated


def clamp_preference_record(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    max_length: int,
    max_prompt_length: int | None = None,
    min_prompt_tokens: int = 16,
) -> ClampResult:
    """Fit ``prompt + chosen`` and ``prompt + rejected`` into ``max_length`` tokens.

    Args:
        prompt_ids, chosen_ids, rejected_ids: token ids of the three parts.
        max_length: budget for prompt + completion.
        max_prompt_length: optional separate budget for the prompt.
        min_prompt_tokens: prompt tokens kept even when a completion alone is
            too long (the completion is cut instead).

    Returns:
        A :class:`ClampResult`; ``len(prompt) + len(completion) <= max_length``
        for both completions.

    Raises:
        ValueError: the budgets themselves are invalid (``max_length < 2``,
            ``max_prompt_length < 1``, ``min_prompt_tokens < 0``).

    >>> r = clamp_preference_record([1, 2, 3, 4, 5], [6, 7], [8], max_length=4, min_prompt_tokens=1)
    >>> r.prompt_ids, r.chosen_ids, r.rejected_ids, r.prompt_truncated, r.completion_truncated
    ([4, 5], [6, 7], [8], True, False)
    >>> r = clamp_preference_record([1, 2, 3, 4, 5], [6, 7, 8, 9], [10], max_length=6, min_prompt_tokens=3)
    >>> r.prompt_ids, r.chosen_ids, r.rejected_ids, r.completion_truncated
    ([3, 4, 5], [6, 7, 8], [10], True)
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2 (one prompt and one completion token)")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be >= 1 or None")
    if min_prompt_tokens < 0:
        raise ValueError(f"min_prompt_tokens={min_prompt_tokens} must be >= 0")
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    original_prompt_len = len(prompt)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    longest = max(len(chosen), len(rejected))
    completion_truncated = False
    if len(prompt) + longest > max_length:
        keep_prompt = min(len(prompt), min_prompt_tokens, max_length - 1)
        room = max_length - longest
        if room >= keep_prompt:
            keep_prompt = room
        else:
            completion_budget = max_length - keep_prompt
            completion_truncated = True
            chosen, rejected = chosen[:completion_budget], rejected[:completion_budget]
        prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt else []
    return ClampResult(prompt, chosen, rejected, len(prompt) < original_prompt_len, completion_truncated)


def _as_messages(batch):
    """String pairs -> one user message and one assistant message each (TRL's conversational form)."""
    return {
        "prompt": [[{"role": "user", "content": p}] for p in batch["prompt"]],
        "chosen": [[{"role": "assistant", "content": c}] for c in batch["chosen"]],
        "rejected": [[{"role": "assistant", "content": r}] for r in batch["rejected"]],
    }


def load_preference_dataset(source, split: str = "train", fmt: str = "auto", as_messages: bool = False,
                            name: str | None = None, hh_parser: str = "shared_prefix"):
    """Load preference pairs from any supported format (see :mod:`opensloth.data.formats`).

    Args:
        source: file, folder, hub id (see :func:`opensloth.data.sources.load_records`)
            or a ``datasets.Dataset``.
        split: split with optional slicing.
        fmt: ``"auto"`` or a format name (``"pairs"``, ``"hh"``, ``"judged"``, ``"chat_pairs"``).
        as_messages: conversational output: string prompts become one user
            message and replies one assistant message (HH transcripts are
            parsed into their turns).
        name: label of the drop report (default from the source).
        hh_parser: ``shared_prefix`` or ``reference`` (see :mod:`opensloth.data.hh`).

    Returns:
        ``(dataset, report)`` with ``prompt``, ``chosen``, ``rejected`` columns.

    Raises:
        MissingColumnsError, DatasetFormatError, EmptyDatasetError.
    """
    import datasets

    if fmt not in format_names():
        raise ValueError(f"fmt={fmt!r} must be one of {format_names()}")
    name = name or f"preference {source if isinstance(source, str) else 'dataset'}"
    where = source if isinstance(source, str) else None
    spec = None
    if isinstance(source, str):
        for candidate in sorted(PREFERENCE_FORMATS.values(), key=lambda f: f.priority):
            if fmt in ("auto", candidate.name) and candidate.claims_path and candidate.claims_path(source):
                spec = candidate
                break
    if spec is not None:
        ds, report = spec.load_path(source, name=name, split=split, as_messages=as_messages, hh_parser=hh_parser)
    else:
        ds = source if isinstance(source, datasets.Dataset) else load_records(source, split)
        if fmt == "auto":
            first = ds[0] if len(ds) else {}
            try:
                fmt = detect_preference_format(ds.column_names, first)
            except MissingColumnsError:
                raise
            except DatasetFormatError as exc:  # columns fit, values do not: name the source too
                raise DatasetFormatError(str(exc), where) from None
        spec = PREFERENCE_FORMATS[fmt]
        if spec.convert is None:
            raise DatasetFormatError(f"{where or 'the dataset'} is not a {fmt!r} source ({spec.summary})")
        ds, report = spec.convert(ds, name=name, source=where, split=split, as_messages=as_messages,
                                  hh_parser=hh_parser)
    report.format = spec.name
    report.raise_if_empty()
    if as_messages and len(ds) and isinstance(ds[0]["prompt"], str):
        ds = ds.map(_as_messages, batched=True, desc="pairs -> messages")
    return ds, report


def load_preference_splits(source: str, *, train_split: str = "train", test_split: str = "test",
                           train_samples: int | None = None, test_samples: int = 0, fmt: str = "auto",
                           as_messages: bool = False, val_ratio: float = 0.0, split_seed: int = 42,
                           hh_parser: str = "shared_prefix"):
    """``(train, eval_or_None)`` pairs for ``DPOTrainer`` from any supported format; the sizes are logged.

    ``train_samples`` / ``test_samples`` keep the first N pairs. With
    ``val_ratio`` > 0 the evaluation pairs are that fraction of the parsed
    training pairs (``datasets.train_test_split(test_size=val_ratio,
    seed=split_seed)``, as the dynamic-DPO repositories split) and
    ``test_split`` is not read; ``test_samples`` then caps it (0: all of it).
    Otherwise no eval split is read when ``test_samples`` is 0. One line per
    split names every stage: read, format (drops by reason, counted cases),
    split, cut.

    Raises:
        UserInputError (DatasetSourceError, DatasetFormatError, MissingColumnsError,
        EmptyDatasetError): the message names the source, the split and the fix.
    """
    if not 0 <= val_ratio < 1:
        raise UserInputError(f"val_ratio={val_ratio} must lie in [0, 1)")

    def load(split, label):
        try:
            return load_preference_dataset(source, split, fmt=fmt, as_messages=as_messages,
                                           name=f"preference {label} {source}", hh_parser=hh_parser)
        except UserInputError:
            raise
        except ValueError as exc:  # EmptyDatasetError
            raise UserInputError(f"dataset {source!r} split {split!r}: {exc}") from None

    def cut(ds, limit, stages, what):
        if limit is not None and limit < len(ds):
            stages.append(f"{what} {limit} -> {limit}")
            return ds.select(range(limit))
        return ds

    train, report = load(train_split, "train")
    stages = [_format_stage(report, train_split)]
    val = None
    if val_ratio > 0:
        if len(train) < 2:
            raise UserInputError(f"dataset {source!r}: {len(train)} pair(s) cannot be split by val_ratio={val_ratio}")
        parts = train.train_test_split(test_size=val_ratio, seed=split_seed)
        train, val = parts["train"], parts["test"]
        stages.append(f"val_ratio {val_ratio} (seed {split_seed}) -> {len(train)} train / {len(val)} eval")
        val = cut(val, test_samples or None, stages, "test_samples")
    train = cut(train, train_samples, stages, "train_samples")
    if val_ratio == 0 and test_samples:
        val, val_report = load(test_split, "test")
        val_stages = [_format_stage(val_report, test_split)]
        val = cut(val, test_samples, val_stages, "test_samples")
        log_rank0(f"preference eval data {source}: " + " | ".join(val_stages))
    log_rank0(f"preference data {source}: " + " | ".join(stages) + f" => {len(train)} train"
              + (f", {len(val)} eval" if val is not None else ", no eval"))
    return train, val


def _format_stage(report: DropReport, split: str) -> str:
    """``"split train: 44 read -> format hh: 41 kept (1 dropped (empty), ...)"``."""
    dropped = ", ".join(f"{n} {r}" for r, n in report.dropped.items() if n)
    noted = ", ".join(f"{n} {w}" for w, n in report.noted.items() if n)
    return (f"split {split}: {report.total_in} read -> format {report.format}: "
            f"{report.total_out} kept" + (f" (dropped: {dropped})" if dropped else "")
            + (f" (counted: {noted})" if noted else ""))


def pairs_to_dataset(pairs: list[dict], *, as_messages: bool):
    """Best-vs-worst rollout pairs (dicts) -> the ``prompt``/``chosen``/``rejected`` dataset TRL trains on.

    Goes through :func:`load_preference_dataset` (format ``pairs``), like
    ``train_dpo.py``'s data. With ``as_messages`` the prompt becomes one user
    message and each reply one assistant message, so TRL applies the chat
    template exactly as the rollout did; otherwise the strings pass through.
    """
    import datasets

    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    ds, _ = load_preference_dataset(datasets.Dataset.from_list(rows), fmt="pairs", as_messages=as_messages,
                                    name="rollout pairs")
    return ds


def _tokenize_prompt(tokenizer, prompt, use_chat_template: bool) -> list[int]:
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    if use_chat_template:
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _tokenize_completion(tokenizer, completion) -> list[int]:
    if isinstance(completion, list):
        if len(completion) != 1 or not isinstance(completion[0], dict):
            raise DatasetFormatError("a conversational completion must be a single assistant message")
        completion = completion[0].get("content", "")
    text = completion if completion.endswith(tokenizer.eos_token) else completion + tokenizer.eos_token
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_preference_dataset(
    ds,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool | None = None,
    min_prompt_tokens: int = 16,
    name: str = "preference",
):
    """Tokenize pairs into ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` and clamp them.

    The output columns are the ones TRL's ``DPOTrainer`` collator reads.
    Completions end with the tokenizer's EOS token. String prompts are wrapped
    as one user message when ``use_chat_template`` (default: the tokenizer has
    a chat template).

    Returns:
        ``(dataset, report)``; ``report.truncated`` counts clamped records;
        pairs whose chosen and rejected ids are identical after clamping are
        dropped and counted (``identical_after_truncation``), as ``train_dpo.py``
        drops them after TRL tokenizes.
    """
    require_columns(ds.column_names, ["prompt", "chosen", "rejected"], "preference pairs")
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; completions must end with one")

    def tokenize_batch(batch):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "_opensloth_truncated": [],
               "_opensloth_identical": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            clamped = clamp_preference_record(
                _tokenize_prompt(tokenizer, prompt, use_chat_template),
                _tokenize_completion(tokenizer, chosen),
                _tokenize_completion(tokenizer, rejected),
                max_length,
                max_prompt_length,
                min_prompt_tokens,
            )
            out["prompt_ids"].append(clamped.prompt_ids)
            out["chosen_ids"].append(clamped.chosen_ids)
            out["rejected_ids"].append(clamped.rejected_ids)
            out["_opensloth_truncated"].append(clamped.truncated)
            out["_opensloth_identical"].append(clamped.chosen_ids == clamped.rejected_ids)
        return out

    tokenized = ds.map(tokenize_batch, batched=True, desc=f"Tokenizing {name} pairs")
    report = DropReport(name=name, total_in=len(tokenized))
    identical = tokenized["_opensloth_identical"]
    for position, same in enumerate(identical):
        if same:
            report.drop(IDENTICAL_TOKENS, position)
    report.truncated = sum(t for t, same in zip(tokenized["_opensloth_truncated"], identical) if not same)
    if report.total_dropped:
        tokenized = tokenized.filter(lambda r: [not x for x in r], input_columns=["_opensloth_identical"],
                                     batched=True)
    report.raise_if_empty("Every pair has identical chosen and rejected tokens after clamping.")
    return tokenized.remove_columns(["_opensloth_truncated", "_opensloth_identical"]), report
