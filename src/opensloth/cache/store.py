"""A tokenized dataset on disk: layout, atomic publishing, validation, loading.

Both the dataset cache (:mod:`opensloth.cache.wrapper`) and
``train_scripts/precompute_dataset.py`` write this layout::

    <path>/
        train/                 Dataset.save_to_disk
        val/                   optional; val/<name>/ for several eval sets
        cache_metadata.json    key parts, sizes, versions, file manifest, time
        READY                  written last: the folder is complete

Publishing is atomic: everything is written to a hidden temporary folder next
to ``<path>``, renamed into place, and ``READY`` is written last. A reader
accepts a folder only when ``READY`` exists, the metadata parses and matches
the expected key, and every file in the manifest has its recorded size (and
SHA-256, with ``verify="checksum"``). So a half-written folder (killed
builder, full disk) or a corrupted file is never loaded; it is reported as
invalid and rebuilt.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from opensloth.cache.key import COMPARED_TOKENIZER_PARTS, tokenizer_fingerprint
from opensloth.errors import UserInputError
from opensloth.atomic import write_json_atomic
from opensloth.log import warn_rank0

METADATA_FILE = "cache_metadata.json"
READY_FILE = "READY"
TRAIN_DIR = "train"
VAL_DIR = "val"
VERIFY_MODES = ("checksum", "size")
LEGACY_CONFIG_FILE = "dataset_config.json"  # what the original OpenSloth's precompute_dataset.py wrote

__all__ = [
    "METADATA_FILE",
    "READY_FILE",
    "PreparedDatasetError",
    "PreparedDatasetMismatchError",
    "PreparedStatus",
    "inspect_prepared",
    "is_legacy_prepared",
    "load_legacy_prepared",
    "load_prepared_dataset",
    "load_prepared_splits",
    "publish_prepared",
    "split_stats",
    "library_versions",
    "pid_alive",
    "sweep_stale_temporaries",
]


class PreparedDatasetError(UserInputError):
    """A prepared dataset folder is missing, incomplete or corrupt (scripts print it as one line)."""


class PreparedDatasetMismatchError(PreparedDatasetError):
    """A prepared dataset was made with another tokenizer or a longer length limit."""


@dataclass(frozen=True)
class PreparedStatus:
    """Result of :func:`inspect_prepared`: ``ok`` or why not."""

    ok: bool
    reason: str
    metadata: dict | None = None

    @property
    def missing(self) -> bool:
        return self.reason == "missing"


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape tokenized data (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version
    import platform

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("opensloth", "torch", "transformers", "tokenizers", "trl", "datasets", "pyarrow", "unsloth"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(root: str) -> dict[str, dict]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root)
            if rel in (METADATA_FILE, READY_FILE):
                continue
            files[rel] = {"size": os.path.getsize(full), "sha256": _file_sha256(full)}
    return files


def split_stats(ds) -> dict[str, Any]:
    """Rows, columns and (when tokenized) token counts of one split."""
    stats: dict[str, Any] = {"rows": len(ds), "columns": list(ds.column_names)}
    if not len(ds):
        return stats
    import pyarrow.compute as pc

    table = ds.with_format("arrow")

    def lengths(column):
        return pc.list_value_length(table[column].combine_chunks())

    if "input_ids" in ds.column_names:
        per_row = lengths("input_ids")
    elif {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(ds.column_names):
        # A preference row is as long as its prompt plus the longer completion.
        per_row = pc.add(lengths("prompt_ids"), pc.max_element_wise(lengths("chosen_ids"), lengths("rejected_ids")))
    else:
        return stats
    stats["num_tokens"] = int(pc.sum(per_row).as_py() or 0)
    stats["max_tokens"] = int(pc.max(per_row).as_py() or 0)
    return stats


def _normalise_splits(splits: Mapping[str, Any]) -> dict[str, Any]:
    """Map split name -> Dataset; a dict of eval sets becomes ``val/<name>``."""
    import datasets

    out = {}
    for name, value in splits.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            for sub, ds in value.items():
                out[f"{name}/{sub}"] = ds
        else:
            out[name] = value
    for name, ds in out.items():
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(
                f"split {name!r} is a {type(ds).__name__}; only map-style datasets.Dataset splits can be saved "
                f"(an IterableDataset cannot be cached)"
            )
    return out


def _write_json_atomic(path: str, payload: dict) -> None:
    write_json_atomic(path, payload, indent=2)


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sweep_stale_temporaries(path: str) -> int:
    """Delete temporary/trash folders left next to ``path`` by killed builders.

    Only this host's folders of processes that no longer run are removed, so a
    concurrent builder on another host is never disturbed. Returns the count.
    """
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return 0
    host = socket.gethostname()
    removed = 0
    for entry in os.listdir(parent):
        if not entry.startswith(f".{name}.") or not (".tmp-" in entry or ".trash-" in entry):
            continue
        try:
            _, tag = entry.rsplit(".tmp-" if ".tmp-" in entry else ".trash-", 1)
            entry_host, pid, _ = tag.rsplit("-", 2)
            pid = int(pid)
        except ValueError:
            continue
        if entry_host == host and not pid_alive(pid):
            _remove_tree(os.path.join(parent, entry))
            removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_prepared(path: str, splits: Mapping[str, Any], metadata: Mapping[str, Any], verify: str = "checksum") -> dict:
    """Write tokenized splits and their metadata to ``path``, atomically.

    Args:
        path: the final folder. An existing folder there is replaced (callers
            only publish over folders that failed :func:`inspect_prepared`).
        splits: ``{"train": Dataset, "val": Dataset | dict | None}``.
        metadata: JSON-able entries recorded in ``cache_metadata.json``;
            ``splits``, ``files``, ``created_at`` and ``created_by`` are added.
        verify: how a folder found at ``path`` is checked before it is
            replaced; an intact one was published meanwhile by another
            builder and is kept.

    Returns:
        The metadata as written.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    sweep_stale_temporaries(path)
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{name}.tmp-{tag}")
    to_save = _normalise_splits(splits)
    try:
        for split_name, ds in to_save.items():
            ds.save_to_disk(os.path.join(tmp, split_name))
        written = dict(metadata)
        written["splits"] = {split_name: split_stats(ds) for split_name, ds in to_save.items()}
        written["files"] = _manifest(tmp)
        written["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        written["created_by"] = {"host": socket.gethostname(), "pid": os.getpid(), **written.get("created_by", {})}
        _write_json_atomic(os.path.join(tmp, METADATA_FILE), written)
        if os.path.lexists(path):
            existing = inspect_prepared(path, written.get("cache_key"), verify=verify)
            if existing.ok:  # another builder (e.g. a second node on a shared disk) published first
                _remove_tree(tmp)
                return existing.metadata
            trash = os.path.join(parent, f".{name}.trash-{tag}")
            os.replace(path, trash)
            _remove_tree(trash)
        os.rename(tmp, path)
    except BaseException:
        _remove_tree(tmp)
        raise
    _write_json_atomic(
        os.path.join(path, READY_FILE),
        {"cache_key": written.get("cache_key"), "created_at": written["created_at"]},
    )
    return written


def inspect_prepared(path: str, expected_key: str | None = None, verify: str = "checksum") -> PreparedStatus:
    """Decide whether the folder at ``path`` is a complete, intact prepared dataset.

    Args:
        path: the folder.
        expected_key: when given, the recorded ``cache_key`` must equal it.
        verify: ``"checksum"`` (sizes and SHA-256 of every file) or ``"size"``.

    Returns:
        :class:`PreparedStatus`; ``reason`` is ``"missing"`` when there is no
        folder, otherwise a sentence saying what is wrong.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r} must be one of {VERIFY_MODES}")
    if not os.path.isdir(path):
        return PreparedStatus(False, "missing")
    if not os.path.isfile(os.path.join(path, READY_FILE)):
        return PreparedStatus(False, f"no {READY_FILE} marker (a build was interrupted)")
    try:
        with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as fh:
            metadata = json.load(fh)
    except (OSError, ValueError) as exc:
        return PreparedStatus(False, f"{METADATA_FILE} unreadable ({exc})")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("files"), dict):
        return PreparedStatus(False, f"{METADATA_FILE} has no file manifest")
    if expected_key is not None and metadata.get("cache_key") != expected_key:
        return PreparedStatus(
            False, f"cache key {metadata.get('cache_key')!r} differs from the expected {expected_key!r}", metadata
        )
    for rel, info in metadata["files"].items():
        full = os.path.join(path, rel)
        try:
            size = os.path.getsize(full)
        except OSError:
            return PreparedStatus(False, f"file {rel} is missing", metadata)
        if size != info.get("size"):
            return PreparedStatus(False, f"file {rel} has {size} bytes, expected {info.get('size')}", metadata)
        if verify == "checksum" and _file_sha256(full) != info.get("sha256"):
            return PreparedStatus(False, f"file {rel} fails its SHA-256 check (corrupted)", metadata)
    return PreparedStatus(True, "ok", metadata)


def load_prepared_splits(path: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Memory-map every split listed in ``metadata`` (``val/<name>`` become a dict under ``val``).

    Raises:
        PreparedDatasetError: a split cannot be loaded or has the wrong row count.
    """
    import datasets

    out: dict[str, Any] = {}
    for split_name, stats in metadata.get("splits", {}).items():
        try:
            ds = datasets.load_from_disk(os.path.join(path, split_name))
        except Exception as exc:
            raise PreparedDatasetError(f"{path}: split {split_name!r} cannot be loaded: {exc}") from exc
        if len(ds) != stats.get("rows"):
            raise PreparedDatasetError(
                f"{path}: split {split_name!r} has {len(ds)} rows, the metadata says {stats.get('rows')}"
            )
        head, _, sub = split_name.partition("/")
        if sub:
            out.setdefault(head, {})[sub] = ds
        else:
            out[head] = ds
    return out


def load_prepared_dataset(path: str, tokenizer, max_seq_length: int | None = None, verify: str = "checksum"):
    """Load ``train`` and ``val`` from a folder written by ``precompute_dataset.py`` (or the cache).

    A folder of the original OpenSloth's ``precompute_dataset.py`` goes to
    :func:`load_legacy_prepared`.

    Args:
        path: e.g. ``outputs/precomputed/<name>``.
        tokenizer: the tokenizer of the model about to train; it must match
            the one the data was tokenized with.
        max_seq_length: the training length limit; the longest stored row
            must fit in it (a skipped preparation does not truncate).
        verify: ``"checksum"`` or ``"size"`` (see :func:`inspect_prepared`).

    Returns:
        ``(train_dataset, val_dataset_or_None)``.

    Raises:
        PreparedDatasetError: the folder is missing, incomplete or corrupt.
        PreparedDatasetMismatchError: the tokenizer differs (the message
            names the differing parts and both tokenizers) or a row is longer
            than ``max_seq_length``.
    """
    if is_legacy_prepared(path):
        return load_legacy_prepared(path, tokenizer, max_seq_length)
    status = inspect_prepared(path, verify=verify)
    if not status.ok:
        hint = "run train_scripts/precompute_dataset.py again" if status.missing else "re-create it with precompute_dataset.py"
        raise PreparedDatasetError(f"prepared dataset {path!r} is not usable: {status.reason}; {hint}")
    metadata = status.metadata
    stored = metadata.get("tokenizer") or {}
    current = tokenizer_fingerprint(tokenizer)
    differing = [part for part in COMPARED_TOKENIZER_PARTS if stored.get(part) != current.get(part)]
    if differing:
        raise PreparedDatasetMismatchError(
            f"prepared dataset {path!r} was tokenized with {stored.get('name_or_path')!r} "
            f"(vocab size {stored.get('vocab_size')}), but the model's tokenizer {current.get('name_or_path')!r} "
            f"(vocab size {current.get('vocab_size')}) differs in: {', '.join(differing)}. Training on it would feed "
            f"the model wrong token ids. Re-run precompute_dataset.py with --model_name of this model."
        )
    splits = load_prepared_splits(path, metadata)
    if "train" not in splits:
        raise PreparedDatasetError(f"prepared dataset {path!r} has no train split")
    if max_seq_length is not None:
        for split_name, stats in metadata.get("splits", {}).items():
            longest = stats.get("max_tokens")
            if longest is not None and longest > max_seq_length:
                raise PreparedDatasetMismatchError(
                    f"prepared dataset {path!r} split {split_name!r} has rows of {longest} tokens, longer than "
                    f"max_seq_length={max_seq_length}; re-run precompute_dataset.py with "
                    f"--max_seq_length {max_seq_length} or train with a larger limit"
                )
    return splits["train"], splits.get("val")


def is_legacy_prepared(path: str) -> bool:
    """True for a folder the original OpenSloth's ``precompute_dataset.py`` wrote.

    That is ``train/`` saved by ``Dataset.save_to_disk`` (its ``state.json``),
    without opensloth's ``cache_metadata.json`` and ``READY``. A folder of
    ours that lacks ``READY`` has the metadata, so an interrupted build is
    never mistaken for one.
    """
    return (os.path.isfile(os.path.join(path, TRAIN_DIR, "state.json"))
            and not os.path.exists(os.path.join(path, METADATA_FILE))
            and not os.path.exists(os.path.join(path, READY_FILE)))


def _check_legacy_split(path: str, name: str, ds, vocab_size: int, max_seq_length: int | None) -> int:
    """Raise unless ``ds`` holds token ids this tokenizer can embed, in rows that fit; returns the longest row."""
    import pyarrow.compute as pc

    where = f"prepared dataset {path!r} split {name!r}"
    if "input_ids" not in ds.column_names:
        raise PreparedDatasetError(f"{where} has no input_ids column (columns: {ds.column_names}); "
                                   f"re-create it with train_scripts/precompute_dataset.py")
    if not len(ds):
        return 0
    table = ds.with_format("arrow")
    ids = table["input_ids"].combine_chunks()
    lengths = pc.list_value_length(ids)
    for column in ("labels", "attention_mask"):
        if column in ds.column_names and not pc.all(pc.equal(pc.list_value_length(table[column].combine_chunks()),
                                                             lengths)).as_py():
            raise PreparedDatasetError(f"{where}: {column} and input_ids differ in length in some rows; "
                                       f"re-create it with train_scripts/precompute_dataset.py")
    flat = pc.min_max(pc.list_flatten(ids)).as_py()
    if flat["min"] is not None and (flat["min"] < 0 or flat["max"] >= vocab_size):
        raise PreparedDatasetMismatchError(
            f"{where} holds token ids {flat['min']}..{flat['max']}, outside this tokenizer's vocabulary of "
            f"{vocab_size}: it was tokenized for another model. Re-run precompute_dataset.py with --model_name "
            f"of this model")
    longest = int(pc.max(lengths).as_py() or 0)
    if max_seq_length is not None and longest > max_seq_length:
        raise PreparedDatasetMismatchError(
            f"{where} has rows of {longest} tokens, longer than max_seq_length={max_seq_length}; train with "
            f"--max_seq_length {longest} or re-run precompute_dataset.py with --max_seq_length {max_seq_length}")
    return longest


def load_legacy_prepared(path: str, tokenizer, max_seq_length: int | None = None):
    """Load a folder of the original OpenSloth's ``precompute_dataset.py``, checking what can be checked.

    It has no checksums and no tokenizer fingerprint, so the checks are:
    ``train/`` (and ``val/`` when present) load; each has ``input_ids``;
    ``labels`` / ``attention_mask`` match its row lengths; every token id is
    inside this tokenizer's vocabulary; no row is longer than
    ``max_seq_length``. The model named in ``dataset_config.json`` is compared
    with the tokenizer's name. One warning line says the folder is accepted
    on these checks.

    Returns:
        ``(train_dataset, val_dataset_or_None)``.

    Raises:
        PreparedDatasetError: a split cannot be loaded or lacks ``input_ids``.
        PreparedDatasetMismatchError: token ids outside the vocabulary, or rows
            longer than ``max_seq_length``.
    """
    import datasets

    config = {}
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(path, LEGACY_CONFIG_FILE), encoding="utf-8") as fh:
            config = json.load(fh)
    if not isinstance(config, dict):
        config = {}
    vocab_size = len(tokenizer)
    splits = {}
    for name in (TRAIN_DIR, VAL_DIR):
        folder = os.path.join(path, name)
        if name == VAL_DIR and not os.path.isdir(folder):
            continue
        try:
            splits[name] = datasets.load_from_disk(folder)
        except Exception as exc:
            raise PreparedDatasetError(f"prepared dataset {path!r}: split {name!r} cannot be loaded: {exc}") from exc
    longest = max(_check_legacy_split(path, name, ds, vocab_size, max_seq_length) for name, ds in splits.items())
    made_for = config.get("model_name")
    current = getattr(tokenizer, "name_or_path", None)
    model_note = (f"; it names the model {made_for!r}, not this tokenizer's {current!r}"
                  if made_for and current and made_for != current else "")
    warn_rank0(
        f"{path} was written by the original OpenSloth's precompute_dataset.py (no checksums, no tokenizer "
        f"fingerprint): accepted after checking its columns, token ids < vocab size {vocab_size} and rows <= "
        f"{max_seq_length if max_seq_length is not None else longest} tokens{model_note}. Re-create it with "
        f"train_scripts/precompute_dataset.py for the full checks")
    return splits[TRAIN_DIR], splits.get(VAL_DIR)
