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

A name is taken for a local path, never sent to the hub, when it starts with
``.``, ``/`` or ``~``, ends in a data-file extension, or its first component is
a folder that exists here (``data/sftt`` when ``data/`` exists: a typo, with
the close names suggested). :func:`inspect_source` reads a local source
completely without ``datasets`` (every JSONL line decoded and parsed), for the
pre-flight checks of :mod:`opensloth.preflight`.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from opensloth.data.errors import DatasetFormatError, DatasetSourceError

__all__ = [
    "DatasetSourceError",
    "SourceSummary",
    "inspect_source",
    "load_records",
    "looks_local",
    "missing_path_hint",
    "read_jsonl",
    "split_base",
]

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def split_base(split: str) -> str:
    """``"train[:1%]"`` -> ``"train"``; ``"train+test"`` -> ``"train"``."""
    return split.split("[", 1)[0].split("+", 1)[0].strip()


def looks_local(name: str) -> bool:
    """Whether ``name`` means a local file or folder rather than a hub id (see the module doc)."""
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        return True
    if os.path.splitext(name)[1].lower() in _FILE_BUILDERS:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(head)


def missing_path_hint(path: str) -> str:
    """`` (did you mean data/sft?)`` for a path that does not exist, from the names next to it; or ``""``."""
    parent, base = os.path.split(os.path.normpath(os.path.expanduser(path)))
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return ""
    close = difflib.get_close_matches(base, names, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(os.path.join(parent, c) for c in close)}?)" if close else ""


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file.

    Raises:
        DatasetFormatError: a line is not valid UTF-8, not valid JSON or not a
            JSON object; the message names the file and the 1-based line number.
    """
    with open(path, "rb") as fh:
        for line_number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as "
                    "UTF-8", path, line_number) from None
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
    if os.path.getsize(path) == 0:
        raise DatasetSourceError(f"{path} is empty; it must hold at least one record")
    try:
        return datasets.load_dataset(builder, data_files={base: path}, split=split)
    except Exception as exc:  # datasets wraps parser errors without the line number
        if builder == "json":
            located = _first_bad_jsonl_line(path) if ext == ".jsonl" else None
            if located is not None:
                raise located from exc
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatasetSourceError(f"{path}: could not be read as {builder}: {reason}") from exc


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
    if looks_local(source):
        raise DatasetSourceError(f"dataset path {source!r} does not exist{missing_path_hint(source)}; pass an "
                                 "existing file or folder")
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


# --------------------------------------------------------------------------- pre-flight inspection


@dataclass
class SourceSummary:
    """What :func:`inspect_source` found in a local source.

    Attributes:
        path: the file (or ``save_to_disk`` folder) holding the split.
        rows: records in it (before any slicing of the split).
        columns: every key seen (JSON) or the schema's columns.
        first: the first record, when it could be read cheaply.
    """

    path: str
    rows: int
    columns: list[str] = field(default_factory=list)
    first: dict | None = None


def _inspect_jsonl(path: str) -> SourceSummary:
    columns: dict[str, None] = {}
    first = None
    rows = 0
    for _, record in read_jsonl(path):
        rows += 1
        first = record if first is None else first
        columns.update(dict.fromkeys(record))
    return SourceSummary(path, rows, list(columns), first)


def _inspect_json(path: str) -> SourceSummary:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        return _inspect_jsonl(path)  # names the line with the bad byte
    except json.JSONDecodeError:
        return _inspect_jsonl(path)  # JSON lines in a .json file are valid for datasets; else names the line
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetFormatError("expected a list of JSON objects (or one object per line)", path)
    columns: dict[str, None] = {}
    for record in data:
        columns.update(dict.fromkeys(record))
    return SourceSummary(path, len(data), list(columns), data[0] if data else None)


def _inspect_parquet(path: str) -> SourceSummary:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        rows = parquet.metadata.num_rows
        first = parquet.read_row_group(0).slice(0, 1).to_pylist()[0] if rows and parquet.num_row_groups else None
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise DatasetSourceError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})") from None
    return SourceSummary(path, rows, list(parquet.schema_arrow.names), first)


def _inspect_file(path: str) -> SourceSummary:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DatasetSourceError(
            f"{path}: unsupported file type {ext!r}; use .jsonl, .json or .parquet (or a folder / hub id)")
    try:
        if os.path.getsize(path) == 0:
            raise DatasetSourceError(f"{path} is empty; it must hold at least one record")
        summary = {".jsonl": _inspect_jsonl, ".json": _inspect_json, ".parquet": _inspect_parquet}[ext](path)
    except PermissionError:
        raise DatasetSourceError(f"{path} is not readable (permission denied)") from None
    if summary.rows == 0:
        raise DatasetSourceError(f"{path} holds no records")
    return summary


def _inspect_saved(folder: str, split: str) -> SourceSummary | None:
    """A ``save_to_disk`` folder: columns and rows from its JSON metadata (no Arrow read)."""
    base = split_base(split)
    info_dir = folder
    if os.path.exists(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as fh:
            splits = json.load(fh).get("splits", [])
        if base not in splits:
            raise DatasetSourceError(f"{folder}: no split {base!r}; it has {sorted(splits)}")
        info_dir = os.path.join(folder, base)
    try:
        with open(os.path.join(info_dir, "dataset_info.json"), encoding="utf-8") as fh:
            features = json.load(fh).get("features") or {}
    except (OSError, ValueError) as exc:
        raise DatasetSourceError(f"{info_dir}: dataset_info.json is unreadable ({exc})") from None
    return SourceSummary(info_dir, -1, list(features), None)


def inspect_source(source: str, split: str = "train") -> SourceSummary | None:
    """Read a local source completely (no ``datasets``): every record decodes, and which columns there are.

    Returns None for a hub id or a folder only ``datasets`` understands (a hub
    repository copy): those are checked when they load.

    Raises:
        DatasetSourceError: the path does not exist, is empty, unreadable, or
            lacks the split (the message lists what is there).
        DatasetFormatError: a record is not valid UTF-8 / JSON / an object
            (the message names the file and the line).
    """
    if os.path.isfile(source):
        return _inspect_file(source)
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "dataset_dict.json")) or os.path.exists(
                os.path.join(source, "state.json")):
            return _inspect_saved(source, split)
        base = split_base(split)
        for ext in (".jsonl", ".json", ".parquet"):
            candidate = os.path.join(source, base + ext)
            if os.path.isfile(candidate):
                return _inspect_file(candidate)
        stems = {os.path.splitext(n)[0] for n in os.listdir(source) if os.path.splitext(n)[1].lower() in _FILE_BUILDERS}
        if stems and all(s.isidentifier() for s in stems):  # train.jsonl, test.jsonl, ...: one file per split
            raise DatasetSourceError(f"{source}: no split {base!r} ({base}.jsonl/.json/.parquet); it has "
                                     f"{sorted(stems)}")
        return None  # e.g. a hub repository copy (data/train-*.parquet): datasets resolves it when loading
    if looks_local(source):
        raise DatasetSourceError(f"dataset path {source!r} does not exist{missing_path_hint(source)}; pass an "
                                 "existing file or folder")
    return None
