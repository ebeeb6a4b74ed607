"""Load records from local files, local folders and hub dataset ids.

Everything goes through ``datasets`` so that large files are memory-mapped
Arrow tables. What this module adds is error messages that point at the
problem: a malformed JSONL line is reported as ``path:line``, a missing split
lists the splits that exist, and an unknown path is not sent to the hub.

Accepted sources (``load_records(source, split)``):

- a ``.jsonl`` / ``.json`` / ``.parquet`` file (the file is the split);
- a folder holding ``<split>.jsonl`` / ``<split>.json`` / ``<split>.parquet``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a local copy of a hub dataset repository (``data/train-*.parquet`` ...),
  resolved by ``datasets.load_dataset(folder)``;
- a hub dataset id such as ``trl-lib/Capybara`` (works offline from the
  ``datasets`` cache with ``HF_DATASETS_OFFLINE=1``).

``split`` accepts the ``datasets`` slicing syntax everywhere, also for
``save_to_disk`` folders: ``train[:1%]``, ``train[100:200]``, ``test[:-10]``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from opensloth.data.errors import DatasetFormatError, DatasetSourceError

__all__ = [
    "DatasetSourceError",
    "load_records",
    "read_jsonl",
    "split_base",
]

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def split_base(split: str) -> str:
    """``"train[:1%]"`` -> ``"train"``; ``"train+test"`` -> ``"train"``."""
    return split.split("[", 1)[0].split("+", 1)[0].strip()


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file.

    Raises:
        DatasetFormatError: a line is not valid JSON or not a JSON object; the
            message names the file and the 1-based line number.
    """
    with open(path, encoding="utf-8") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"malformed JSON ({exc.msg} at column {exc.colno})", path, line_number) from None
            if not isinstance(record, dict):
                raise DatasetFormatError(
                    f"expected a JSON object per line, got {type(record).__name__}", path, line_number
                )
            yield line_number, record


def _first_bad_jsonl_line(path: str) -> DatasetFormatError | None:
    try:
        for _ in read_jsonl(path):
            pass
    except DatasetFormatError as exc:
        return exc
    return None


def _load_file(path: str, split: str):
    import datasets

    ext = os.path.splitext(path)[1].lower()
    builder = _FILE_BUILDERS.get(ext)
    if builder is None:
        raise DatasetSourceError(
            f"{path}: unsupported file type {ext!r}; use .jsonl, .json or .parquet (or a folder / hub id)"
        )
    base = split_base(split)
    try:
        return datasets.load_dataset(builder, data_files={base: path}, split=split)
    except Exception as exc:  # datasets wraps parser errors without the line number
        if builder == "json":
            located = _first_bad_jsonl_line(path) if ext == ".jsonl" else None
            if located is not None:
                raise located from exc
        raise DatasetSourceError(f"{path}: could not be read as {builder}: {exc}") from exc


def _slice_dataset(split: str, available: dict[str, Any]):
    """Apply ``split`` (with slicing) to in-memory splits ``available``."""
    import datasets

    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute(
            {name: len(d) for name, d in available.items()}
        )
    except (ValueError, AssertionError, KeyError) as exc:
        raise DatasetSourceError(
            f"invalid split {split!r} for splits {sorted(available)}: {exc}"
        ) from None
    parts = [available[i.splitname].select(range(i.from_, i.to)) for i in instructions]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_folder(folder: str, split: str):
    import datasets

    base = split_base(split)
    if os.path.exists(os.path.join(folder, "dataset_dict.json")) or os.path.exists(
        os.path.join(folder, "state.json")
    ):
        loaded = datasets.load_from_disk(folder)
        available = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {base: loaded}
        if base not in available:
            raise DatasetSourceError(f"{folder}: no split {base!r}; it has {sorted(available)}")
        return _slice_dataset(split, available)
    for ext in (".jsonl", ".json", ".parquet"):
        candidate = os.path.join(folder, base + ext)
        if os.path.isfile(candidate):
            return _load_file(candidate, split)
    try:
        return datasets.load_dataset(folder, split=split)
    except Exception as exc:
        listing = sorted(os.listdir(folder))[:20]
        raise DatasetSourceError(
            f"{folder}: no {base}.jsonl/.json/.parquet and datasets could not read it as a dataset "
            f"repository ({exc}); files there: {listing}"
        ) from exc


def load_records(source: str, split: str = "train"):
    """Load ``split`` of ``source`` as a ``datasets.Dataset``.

    Args:
        source: a local file, a local folder, or a hub dataset id (see module doc).
        split: split name, with optional slicing (``"train[:1%]"``).

    Returns:
        A ``datasets.Dataset`` with the columns as stored.

    Raises:
        DatasetFormatError: a JSONL line is malformed (message names file and line).
        DatasetSourceError: the path does not exist, the split is missing, or
            the hub id cannot be loaded (e.g. offline without a cached copy).
    """
    import datasets

    if os.path.isfile(source):
        return _load_file(source, split)
    if os.path.isdir(source):
        return _load_folder(source, split)
    looks_local = source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in _FILE_BUILDERS
    if looks_local:
        raise DatasetSourceError(f"dataset path {source!r} does not exist; pass an existing file or folder")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        hint = (
            "HF_DATASETS_OFFLINE is set, so only cached copies can be used"
            if offline
            else "without network access set HF_DATASETS_OFFLINE=1 and use a cached copy, or pass a local path"
        )
        raise DatasetSourceError(f"could not load hub dataset {source!r} split {split!r}: {exc} ({hint})") from exc
