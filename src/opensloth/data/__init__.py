"""Dataset sources and formats: chat messages, preference pairs, Anthropic HH, judged rollouts.

``import opensloth.data`` is cheap: ``datasets`` and tokenizers are imported
inside the functions that use them. The names below are resolved lazily.

- :func:`load_records` -- local JSON/JSONL/Parquet, folders, hub ids, split slicing.
- :func:`format_chat_dataset` / :func:`prepare_chat_dataset` -- chat ``messages``
  to ``text`` or to ``input_ids``/``labels`` (optionally assistant-only).
- :func:`load_preference_dataset` -- ``prompt``/``chosen``/``rejected`` from
  pairs, HH transcripts or judged rollout JSONL.
- :func:`clamp_preference_record` -- fit a tokenized pair in a length budget.
- :func:`load_prepared_dataset` -- a tokenized dataset from ``precompute_dataset.py``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_records": "opensloth.data.sources",
    "read_jsonl": "opensloth.data.sources",
    "format_chat_dataset": "opensloth.data.chat",
    "prepare_chat_dataset": "opensloth.data.chat",
    "build_hh_dataset": "opensloth.data.hh",
    "split_hh_pair": "opensloth.data.hh",
    "build_judged_dataset": "opensloth.data.judged",
    "load_preference_dataset": "opensloth.data.preference",
    "tokenize_preference_dataset": "opensloth.data.preference",
    "clamp_preference_record": "opensloth.data.preference",
    "load_prepared_dataset": "opensloth.data.prepared",
    "DropReport": "opensloth.data.report",
    "expected_steps_per_epoch": "opensloth.data.report",
    "DatasetFormatError": "opensloth.data.errors",
    "DatasetSourceError": "opensloth.data.errors",
    "MissingColumnsError": "opensloth.data.errors",
    "EmptyDatasetError": "opensloth.data.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'opensloth.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
