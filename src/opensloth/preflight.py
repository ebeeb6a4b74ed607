"""Pre-flight: everything that can be checked before the model loads, checked once, one verdict for all ranks.

A run that cannot finish should fail in seconds with one line, not after the
model loaded (or at the first checkpoint). :func:`run_preflight` checks, in
this order, and raises :class:`~opensloth.errors.UserInputError` at the first
problem:

1. the model folder is complete: ``config.json`` parses, every safetensors file
   (and every shard its index lists) has a readable header and all the bytes
   the header promises, a tokenizer is there (the file is named);
2. every data split the run reads decodes (UTF-8, JSON, Parquet; file and line
   named) and has the columns its format needs;
3. ``--resume_from_checkpoint`` names a complete checkpoint (``last``: the last
   complete one; :mod:`opensloth.checkpoint`) with every file the run needs;
4. the output folder is writable (a probe file is written and removed next to
   where the run dir goes; nothing is created) and its disk has room for at
   least one checkpoint: adapter plus AdamW state, estimated from the
   safetensors headers and the LoRA settings.

Who checks: :func:`opensloth.launch.setup_run` runs it on local rank 0 of
every node (node-local disks differ) before the heavy imports; one process
raises at once, several ranks all-gather the verdicts once the process group
exists (:func:`share_verdict`), so every rank stops together on the first
error and rank 0 prints it (``every_rank``). The resolved checkpoint of global
rank 0 is the one every rank resumes from.

Cheap checks of the settings themselves (numbers, choices) happen earlier, in
the settings dataclasses; this module reads files. Standard library and
pyarrow only (no torch, transformers or datasets).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import uuid
from dataclasses import dataclass, field

from opensloth.cache.store import inspect_prepared, is_legacy_prepared
from opensloth.checkpoint import resolve_resume
from opensloth.data.chat import chat_columns_problem
from opensloth.data.errors import DatasetFormatError, MissingColumnsError
from opensloth.data.formats import PREFERENCE_FORMATS, detect_preference_format
from opensloth.data.sources import inspect_source, looks_local, missing_path_hint
from opensloth.distributed import DistEnv, all_gather_object_list
from opensloth.errors import UserInputError, one_line

__all__ = [
    "DataCheck",
    "Plan",
    "Verdict",
    "check_data",
    "check_model_folder",
    "check_model_source",
    "check_output_dir",
    "checkpoint_bytes",
    "human_bytes",
    "run_preflight",
    "safetensors_header",
    "share_verdict",
]

DATA_KINDS = ("chat", "preference", "prepared")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_MAX_HEADER = 100 * 2**20  # safetensors refuses larger headers too
_OVERHEAD_BYTES = 2 * 2**20  # trainer state, scheduler, RNG states, configs
_BYTES_PER_TRAINABLE = 4 + 8  # fp32 weight + AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class DataCheck:
    """One split a run reads: ``kind`` chat (SFT messages), preference (pairs; ``fmt``) or prepared (tokenized)."""

    source: str
    split: str = "train"
    kind: str = "chat"
    fmt: str = "auto"
    flag: str = "--dataset"

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {DATA_KINDS}")


@dataclass(frozen=True)
class Plan:
    """What a run will read and write.

    Attributes:
        model_name: ``--model_name`` (a local folder is checked file by file).
        run_dir: where the adapter and checkpoints go (None: the run writes nothing).
        data: the splits it reads.
        resume_from_checkpoint: None, ``"last"`` or a folder.
        resume_files: files a checkpoint must hold besides the Trainer's own.
        lora_r, lora_targets: the adapter (``lora_r=None``: every weight trains).
        output_flag: the flag that sets the output folder, for messages.
    """

    model_name: str
    run_dir: str | None = None
    data: tuple[DataCheck, ...] = ()
    resume_from_checkpoint: str | None = None
    resume_files: tuple[str, ...] = ()
    lora_r: int | None = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    output_flag: str = "--output_dir"


@dataclass
class Verdict:
    """A passed pre-flight: the checkpoint to resume from and notes for the log."""

    resume_from_checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------- model


def check_model_source(model_name: str) -> str:
    """Validate ``--model_name``: an existing local folder, or a hub id.

    Returns ``"local"`` or ``"hub"``. A name that looks like a path (see
    :func:`opensloth.data.sources.looks_local`: ``./x``, ``/x``, ``data/tiny-qwen``
    when ``data/`` exists) must exist; close names are suggested.

    Raises:
        UserInputError: a missing local path, or a folder without ``config.json``.
    """
    if os.path.isdir(model_name):
        if not os.path.exists(os.path.join(model_name, "config.json")):
            raise UserInputError(
                f"--model_name {model_name!r} is a folder without config.json; pass a folder written by "
                "save_pretrained (e.g. data/tiny-qwen3) or a hub id"
            )
        return "local"
    if looks_local(model_name) or os.path.isfile(model_name):
        raise UserInputError(
            f"--model_name {model_name!r} does not exist{missing_path_hint(model_name)}; pass a local model folder "
            "(e.g. data/tiny-qwen3) or a hub id like Qwen/Qwen3-0.6B"
        )
    return "hub"


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, after checking the file holds every byte it promises.

    Raises:
        UserInputError: the file is unreadable, its header is not valid, or it is
            shorter than the header says (truncated download or copy); names the file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            header = json.loads(fh.read(length)) if 0 < length <= min(_MAX_HEADER, size - 8) else None
    except PermissionError:
        raise UserInputError(f"model file {path} is not readable (permission denied)") from None
    except (ValueError, UnicodeDecodeError):
        raise UserInputError(f"model file {path} has a corrupt safetensors header; download or copy it again") from None
    if header is None:
        raise UserInputError(f"model file {path} is not a safetensors file (bad header length); download or copy "
                             "it again")
    if not isinstance(header, dict):
        raise UserInputError(f"model file {path} has a corrupt safetensors header; download or copy it again")
    end = max((t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__"
               and isinstance(t, dict)), default=0)
    if 8 + length + end > size:
        raise UserInputError(f"model file {path} is truncated ({size:,} bytes, its header needs "
                             f"{8 + length + end:,}); download or copy it again")
    return header


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of a model folder (the shards its index lists, when it has one)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            raise UserInputError(f"model file {index} is not a valid shard index; download or copy it again") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise UserInputError(f"model folder {folder} lacks the shards {missing[:3]} listed in {index}; the "
                                 "download or copy is incomplete")
        return [os.path.join(folder, s) for s in shards]
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def check_model_folder(folder: str, *, weights: bool = True) -> list[str]:
    """Check a local model folder before anything loads it; returns its safetensors files.

    Raises:
        UserInputError: ``config.json`` does not parse, a weight file is
            corrupt or truncated, there are no weights, or no tokenizer file (named).
    """
    config = os.path.join(folder, "config.json")
    try:
        with open(config, encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"model file {config} is not valid JSON ({one_line(exc)})") from None
    if not any(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_FILES):
        raise UserInputError(f"model folder {folder} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); save the "
                             "tokenizer next to the model (tokenizer.save_pretrained)")
    if not weights:
        return []
    files = _weight_files(folder)
    if not files and not any(n.endswith(".bin") for n in os.listdir(folder)):
        raise UserInputError(f"model folder {folder} has no weights (*.safetensors); the download or copy is "
                             "incomplete")
    for path in files:
        safetensors_header(path)
    return files


def _count_parameters(files: list[str], lora_r: int | None, targets: tuple[str, ...]) -> tuple[int, int]:
    """``(trainable, total)`` parameters from safetensors headers: LoRA adds r x (in + out) per target."""
    trainable = total = 0
    for path in files:
        for name, info in safetensors_header(path).items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            shape = info.get("shape") or []
            count = 1
            for dim in shape:
                count *= dim
            total += count
            if lora_r is not None and len(shape) == 2 and any(name.endswith(f".{t}.weight") for t in targets):
                trainable += lora_r * (shape[0] + shape[1])
    return (total if lora_r is None else trainable), total


def checkpoint_bytes(folder: str, files: list[str], lora_r: int | None, targets: tuple[str, ...]) -> int:
    """Estimated size of one checkpoint: trained weights + AdamW state in fp32, tokenizer files, small state."""
    trainable, _ = _count_parameters(files, lora_r, targets)
    tokenizer = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                    if n.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")))
    return trainable * _BYTES_PER_TRAINABLE + tokenizer + _OVERHEAD_BYTES


# --------------------------------------------------------------------------- output folder


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(run_dir: str, need_bytes: int | None, flag: str = "--output_dir") -> None:
    """The run dir (or the folder it will be created in) takes files, and its disk has ``need_bytes`` free.

    Writes and removes one probe file; creates no folder.

    Raises:
        UserInputError: a file is in the way, the folder is read-only, or the disk is too full.
    """
    where = _existing_ancestor(run_dir)
    if not os.path.isdir(where):
        raise UserInputError(f"{flag}: {where} is a file, so the run dir {run_dir} cannot be created there; "
                             f"choose another {flag}")
    probe = os.path.join(where, f".opensloth-write-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(probe, "w") as fh:
            fh.write("ok")
    except OSError as exc:
        raise UserInputError(f"{flag}: cannot write into {where} ({exc.strerror or one_line(exc)}), where the run "
                             f"dir {run_dir} goes; choose a writable {flag}") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    if need_bytes:
        free = shutil.disk_usage(where).free
        if free < need_bytes:
            raise UserInputError(
                f"{flag}: only {human_bytes(free)} free on the disk of {where}; one checkpoint of this run needs "
                f"about {human_bytes(need_bytes)} (adapter + AdamW state + tokenizer); free space or choose "
                f"another {flag}")


# --------------------------------------------------------------------------- data


def check_data(check: DataCheck) -> None:
    """Read a local split completely and check its columns for its kind (hub ids are checked when they load).

    Raises:
        UserInputError (DatasetSourceError, DatasetFormatError, MissingColumnsError).
    """
    if check.kind == "prepared":
        if is_legacy_prepared(check.source):
            return  # the original OpenSloth's train/ + val/ folder: checked against the tokenizer when it loads
        status = inspect_prepared(check.source)
        if not status.ok:
            raise UserInputError(f"--prepared_dataset_path {check.source!r} is not usable: {status.reason}"
                                 f"{missing_path_hint(check.source) if status.missing else ''}; run "
                                 "train_scripts/precompute_dataset.py to (re)create it")
        return
    prepared = PREFERENCE_FORMATS["prepared"]
    if check.kind == "preference" and check.fmt in ("auto", "prepared") and prepared.claims_path(check.source):
        prepared.load_path(check.source, name=check.source, split=check.split, as_messages=False,
                           hh_parser="shared_prefix")  # raises
    summary = inspect_source(check.source, check.split)
    if summary is None:
        return
    where = f"{summary.path} (split {check.split!r} of {check.flag} {check.source})"
    if check.kind == "chat":
        problem = chat_columns_problem(summary.columns)
        if problem:
            raise DatasetFormatError(f"{problem}; found {summary.columns}", where)
        return
    if check.fmt == "auto":
        try:
            detect_preference_format(summary.columns, summary.first)
        except MissingColumnsError as exc:
            raise DatasetFormatError(str(exc), where) from None
    else:
        spec = PREFERENCE_FORMATS[check.fmt]
        missing = [c for c in spec.columns if c not in summary.columns]
        if missing:
            raise DatasetFormatError(f"format {check.fmt!r} needs columns {list(spec.columns)}; found "
                                     f"{summary.columns} (missing {missing})", where)


# --------------------------------------------------------------------------- the whole plan


def run_preflight(plan: Plan) -> Verdict:
    """Check ``plan`` (see the module doc); returns the :class:`Verdict` or raises the first problem.

    Raises:
        UserInputError: naming the file, line, flag or folder and the fix.
    """
    verdict = Verdict()
    files: list[str] = []
    local_model = check_model_source(plan.model_name) == "local"
    if local_model:
        files = check_model_folder(plan.model_name)
    for check in plan.data:
        check_data(check)
    if plan.run_dir is not None:
        path, note = resolve_resume(plan.resume_from_checkpoint, plan.run_dir, plan.resume_files)
        verdict.resume_from_checkpoint = path
        if note:
            verdict.notes.append(note)
        need = checkpoint_bytes(plan.model_name, files, plan.lora_r, plan.lora_targets) if files else None
        check_output_dir(plan.run_dir, need, plan.output_flag)
    return verdict


def share_verdict(env: DistEnv, verdict: Verdict | None, error: UserInputError | None) -> Verdict:
    """Every rank gets the same outcome: the first error of any rank (in rank order), or rank 0's verdict.

    Call on every rank once the process group exists; ranks that did not
    check pass ``(None, None)``.

    Raises:
        UserInputError: marked ``every_rank``; an error found on a rank other
            than 0 names its host and rank.
    """
    mine = {"verdict": verdict, "error": one_line(error) if error is not None else None,
            "host": socket.gethostname(), "rank": env.rank}
    gathered = all_gather_object_list(mine) if env.is_distributed else [mine]
    for item in gathered:
        if item["error"]:
            where = "" if item["rank"] == 0 else f"on {item['host']} (rank {item['rank']}): "
            exc = UserInputError(where + item["error"])
            exc.every_rank = True
            raise exc
    return gathered[0]["verdict"] or Verdict()
