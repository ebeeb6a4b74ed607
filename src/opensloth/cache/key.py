"""The cache key: fingerprints of data and tokenizers, and the trainer options that shape tokenized data.

A tokenized dataset may be reused only when everything that shaped its token
ids is the same: the records, the tokenizer, the length limit and the
formatting options. These functions reduce each of those to a short hex
string; :func:`compute_cache_key` combines them. World size is deliberately
not an input: tokenization does not depend on it, so launches on 1, 2 or 8
ranks share one cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

__all__ = [
    "COMPARED_TOKENIZER_PARTS",
    "cache_key_parts",
    "compute_cache_key",
    "dataset_fingerprint",
    "diff_key_parts",
    "stable_json",
    "tokenizer_fingerprint",
    "trainer_prepare_args",
]

# Bumped whenever the layout or the meaning of a cached dataset changes.
CACHE_FORMAT_VERSION = 1
_ROWS_PER_HASH_BATCH = 4096


def stable_json(value: Any) -> str:
    """JSON with sorted keys; non-JSON values are written with ``repr``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def _sha(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def dataset_fingerprint(ds) -> str:
    """SHA-256 of a ``datasets.Dataset``'s features and rows, in order.

    Rows are hashed as Arrow IPC bytes in fixed-size batches. Each batch is
    first rebuilt with ``take`` so that the bytes do not depend on how the
    table happens to be stored (memory-mapped file, in-memory table, a slice
    or an indices mapping), and the schema metadata (where ``datasets`` keeps
    its own per-instance fingerprint) is dropped: equal content and features
    give an equal fingerprint.

    Raises:
        TypeError: ``ds`` is not a map-style ``datasets.Dataset`` (an
            ``IterableDataset`` cannot be fingerprinted without consuming it).
    """
    import datasets
    import numpy as np
    import pyarrow as pa

    if not isinstance(ds, datasets.Dataset):
        raise TypeError(
            f"cannot fingerprint {type(ds).__name__}; the dataset cache needs a map-style datasets.Dataset"
        )
    digest = hashlib.sha256()
    digest.update(str(ds.features).encode("utf-8"))
    digest.update(str(len(ds)).encode("utf-8"))
    arrow = ds.with_format("arrow")
    for start in range(0, len(ds), _ROWS_PER_HASH_BATCH):
        table = arrow[start : start + _ROWS_PER_HASH_BATCH]
        table = table.take(pa.array(np.arange(len(table)))).combine_chunks()
        table = table.replace_schema_metadata(None)  # holds datasets' own (per-instance) fingerprint
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def _backend_parts(tokenizer) -> dict[str, str] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    # truncation/padding are runtime settings of the backend, not of the vocabulary.
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return {
        "model": _sha(stable_json(spec.get("model"))),
        "pipeline": _sha(stable_json({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor")})),
        "added_tokens": _sha(stable_json(spec.get("added_tokens"))),
    }


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Describe what in a tokenizer decides token ids.

    Returns a dict of parts -- ``vocab`` (vocabulary and merges),
    ``pipeline`` (normalizer, pre-tokenizer, post-processor: e.g. an added
    BOS), ``added_tokens``, ``special_tokens`` (BOS/EOS/UNK; the pad token is
    left out because it never appears in tokenized rows), ``chat_template``
    -- plus ``combined`` over all of them, and informational ``vocab_size``
    and ``name_or_path`` that are not compared.
    """
    parts: dict[str, Any] = {}
    backend = _backend_parts(tokenizer)
    if backend is not None:
        parts["vocab"] = backend["model"]
        parts["pipeline"] = backend["pipeline"]
        parts["added_tokens"] = backend["added_tokens"]
    else:  # slow (Python) tokenizer: the vocabulary is all we can read
        parts["vocab"] = _sha(stable_json(sorted(tokenizer.get_vocab().items())))
        parts["pipeline"] = _sha(type(tokenizer).__name__)
        parts["added_tokens"] = _sha(stable_json(sorted((str(k), str(v)) for k, v in tokenizer.added_tokens_decoder.items())))
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    parts["special_tokens"] = _sha(stable_json({k: str(v) if v is not None else None for k, v in special.items()}))
    template = getattr(tokenizer, "chat_template", None)
    parts["chat_template"] = _sha(stable_json(template))
    compared = {k: parts[k] for k in sorted(parts)}
    parts["combined"] = _sha(stable_json(compared))
    parts["vocab_size"] = len(tokenizer)
    parts["name_or_path"] = getattr(tokenizer, "name_or_path", None)
    return parts


COMPARED_TOKENIZER_PARTS = ("vocab", "pipeline", "added_tokens", "special_tokens", "chat_template")


def compute_cache_key(parts: Mapping[str, Any]) -> str:
    """A 24-hex-digit key from JSON-able key parts (order of dict keys does not matter).

    >>> compute_cache_key({"a": 1, "b": [1, 2]}) == compute_cache_key({"b": [1, 2], "a": 1})
    True
    >>> compute_cache_key({"a": 1}) == compute_cache_key({"a": 2})
    False
    """
    return _sha(stable_json({"format_version": CACHE_FORMAT_VERSION, **parts}))[:24]


def diff_key_parts(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two (nested) key-part dicts."""
    changed = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed.extend(diff_key_parts(a, b, f"{prefix}{name}."))
        elif stable_json(a) != stable_json(b):
            changed.append(f"{prefix}{name}")
    return changed


def cache_key_parts(train_dataset, val_dataset, tokenizer, max_seq_length, cache_key_params) -> dict:
    """Everything the cache key is computed from (see :func:`compute_cache_key`).

    ``val_dataset`` may be None, a Dataset or a dict of Datasets.
    """
    if isinstance(val_dataset, Mapping):
        val_fp = {name: dataset_fingerprint(ds) for name, ds in sorted(val_dataset.items())}
    else:
        val_fp = dataset_fingerprint(val_dataset) if val_dataset is not None else None
    tok = tokenizer_fingerprint(tokenizer)
    return {
        "data": {"train": dataset_fingerprint(train_dataset), "val": val_fp},
        "tokenizer": tok["combined"],
        "max_seq_length": max_seq_length,
        "params": dict(cache_key_params or {}),
    }


# The SFTConfig fields that change what TRL's preparation produces.
_PREPARE_FIELDS = (
    "max_length",
    "packing",
    "packing_strategy",
    "padding_free",
    "truncation_mode",
    "assistant_only_loss",
    "completion_only_loss",
    "dataset_text_field",
    "shuffle_dataset",
    "eval_packing",
    "chat_template_path",
)


# Options a trainer library rewrites on its own, depending on whether it tokenizes the data
# itself (the cache's builder) or is handed tokenized rows (every other rank). Unsloth
# 2026.10.9's SFTTrainer, with `padding_free` unset (None): turns padding-free on when it
# tokenizes raw data, clearing `max_length` (unsloth/trainer.py, models/rl.py), and off
# for already-tokenized data ("your dataset is already tokenized").
TRAINER_REWRITES = {"Unsloth": ("padding_free", "max_length")}


def trainer_library(trainer) -> str:
    """``"Unsloth"`` for Unsloth's (compiled) trainers, else the top-level package of the trainer's class."""
    cls = type(trainer)
    names = " ".join(f"{k.__module__}.{k.__qualname__}" for k in cls.__mro__)
    if "unsloth" in names.lower():  # the compiled UnslothSFTTrainer lives in unsloth_compiled_cache
        return "Unsloth"
    return (cls.__module__ or "").split(".")[0] or cls.__qualname__


def trainer_prepare_args(trainer) -> dict:
    """The trainer options that shaped (or would shape) its tokenized data."""
    args = getattr(trainer, "args", None)
    out = {name: getattr(args, name) for name in _PREPARE_FIELDS if hasattr(args, name)}
    if "padding_free" in out and out["padding_free"] is None:
        out["padding_free"] = False  # left unset after construction means off (TRL: `padding_free or ...`)
    if out.get("shuffle_dataset"):
        out["seed"] = getattr(args, "seed", None)
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in out.items()}
