"""Dataset sources and formats: chat messages, and the one preference pipeline.

``import opensloth.data`` is cheap: ``datasets`` and tokenizers are imported
inside the functions that use them.

- :func:`load_records` -- local JSON/JSONL/Parquet, folders, hub ids, split slicing (:mod:`~opensloth.data.sources`).
- :func:`load_chat_splits`, :func:`format_chat_dataset` / :func:`prepare_chat_dataset` -- chat
  ``messages`` for SFT, as TRL's input or as ``input_ids``/``labels`` (:mod:`~opensloth.data.chat`).
- :func:`load_preference_dataset` / :func:`load_preference_splits` -- ``prompt``/``chosen``/``rejected``
  from any format of the registry :mod:`~opensloth.data.formats` (pairs, chat-message pairs,
  Anthropic HH, judged rollouts); :func:`tokenize_preference_dataset` and
  :func:`clamp_preference_record` fit tokenized pairs in a length budget (:mod:`~opensloth.data.preference`).
- :func:`load_prepared_dataset` -- a tokenized dataset from ``precompute_dataset.py`` (:mod:`opensloth.cache.store`).
- :class:`DropReport`, :func:`expected_steps_per_epoch` -- what each stage dropped, in steps (:mod:`~opensloth.data.report`).
"""

from opensloth.cache.store import load_prepared_dataset
from opensloth.data.chat import format_chat_dataset, load_chat_splits, prepare_chat_dataset
from opensloth.data.errors import DatasetFormatError, DatasetSourceError, EmptyDatasetError, MissingColumnsError
from opensloth.data.hh import build_hh_dataset, split_hh_pair
from opensloth.data.judged import build_judged_dataset
from opensloth.data.preference import (
    clamp_preference_record,
    load_preference_dataset,
    load_preference_splits,
    pairs_to_dataset,
    tokenize_preference_dataset,
)
from opensloth.data.report import DropReport, expected_steps_per_epoch
from opensloth.data.sources import load_records, read_jsonl

__all__ = [
    "DatasetFormatError",
    "DatasetSourceError",
    "DropReport",
    "EmptyDatasetError",
    "MissingColumnsError",
    "build_hh_dataset",
    "build_judged_dataset",
    "clamp_preference_record",
    "expected_steps_per_epoch",
    "format_chat_dataset",
    "load_chat_splits",
    "load_preference_dataset",
    "load_preference_splits",
    "load_prepared_dataset",
    "load_records",
    "pairs_to_dataset",
    "prepare_chat_dataset",
    "read_jsonl",
    "split_hh_pair",
    "tokenize_preference_dataset",
]
