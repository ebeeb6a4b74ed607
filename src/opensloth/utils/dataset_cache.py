"""Tokenize once for all ranks, and the one check of the distributed environment.

``_check_distributed_environment`` is the single place where opensloth reads
and validates ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and
``LOCAL_WORLD_SIZE`` when set). Every other module calls it.

The dataset cache
=================

Stock Unsloth/TRL SFT tokenizes the whole dataset on every rank. Decorating
the trainer factory with :func:`simple_cache_dataset_wrapper` (or
:func:`cache_dataset_wrapper`) makes one rank do it::

    @simple_cache_dataset_wrapper(cache_dir="data/cache", max_seq_length=2048)
    def build_trainer(model, tokenizer, train_dataset, val_dataset, world_size, args):
        config = SFTConfig(..., dataset_kwargs=sft_dataset_kwargs(train_dataset))
        return SFTTrainer(model=model, args=config, train_dataset=train_dataset, ...)

What happens on each launch:

1. Every rank computes the cache key from the raw train/val data (content
   hash), the tokenizer (vocabulary, special tokens, chat template),
   ``max_seq_length`` and ``cache_key_params``. World size is not part of
   it: launches on 1, 2 or 8 ranks share a cache. With a process group the
   ranks compare keys, so ranks that see different data fail at once.
2. The builder -- global rank 0 with ``builder="global"`` (the cache folder
   is on a filesystem every node sees), local rank 0 of each node with
   ``builder="local"`` (node-local disks) -- checks ``<cache_dir>/<key>``.
   If it is complete and intact (ready marker, metadata, file sizes and
   SHA-256) it is reused: no rank tokenizes. Otherwise (missing, half
   written, corrupted; the latter two with a warning) the builder calls the
   factory on the raw data -- the trainer tokenizes -- and publishes
   ``trainer.train_dataset`` / ``trainer.eval_dataset`` atomically (see
   :mod:`opensloth.data.prepared`).
3. The other ranks poll for the ready marker. They print progress, fail fast
   with the builder's error if it raised, fail when the builder's process is
   gone or its heartbeat stopped, and give up after ``timeout_minutes`` with
   an error naming the cache path and what they waited for. Polling instead of
   a collective barrier is what makes a killed builder a clear error rather
   than a hang; the barrier comes only after every rank has its trainer.
4. Ranks that did not build load the published splits (memory-mapped) and
   call the factory with them. ``sft_dataset_kwargs`` tells TRL to skip its
   preparation, so these ranks never tokenize. The builder swaps its
   trainer's datasets for the published copies too, so all ranks train on
   byte-identical, memory-mapped data.

While a rank runs the factory alone, accelerate's ``main_process_first``
(which TRL wraps around its dataset maps) would wait in a barrier for ranks
that are not there; the scoped patch :data:`PREPARE_ALONE_PATCH` makes those
waits no-ops for the duration of the call.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from opensloth.distributed import DistEnv, DistributedEnvError, _check_distributed_environment, distributed_env  # noqa: F401


# --------------------------------------------------------------------------
# Dataset cache
# --------------------------------------------------------------------------

BUILDER_MODES = ("global", "local")
SYNC_MODES = ("auto", "barrier", "file")
# Clock skew tolerated between hosts when a marker's time is compared with ours.
_CLOCK_SKEW_S = 5.0


class DatasetCacheError(RuntimeError):
    """Base class of the dataset-cache errors."""


class CacheWaitTimeout(DatasetCacheError):
    """A waiting rank gave up: the builder did not publish the cache in time."""


class CacheBuildFailedError(DatasetCacheError):
    """The builder raised while building the cache (its error is in the message)."""


class CacheBuilderDiedError(DatasetCacheError):
    """The builder process disappeared (killed) while building the cache."""


class DatasetCacheMismatchError(DatasetCacheError):
    """Ranks disagree on the cache key, or the trainer's data options differ from the cached ones."""


@dataclass
class DatasetCacheConfig:
    """Where and how tokenized datasets are cached and shared between ranks."""

    cache_dir: str = field(default="data/cache", metadata={"help": "folder holding one sub-folder per cache key"})
    timeout_minutes: float = field(
        default=30.0, metadata={"help": "how long non-builder ranks wait for the builder before failing"}
    )
    builder: str = field(
        default="global",
        metadata={
            "help": "'global': global rank 0 builds, cache_dir must be on a filesystem all nodes share; "
            "'local': local rank 0 of each node builds into its node-local cache_dir"
        },
    )
    sync: str = field(
        default="auto",
        metadata={
            "help": "'auto': a torch.distributed barrier after success when a process group exists (created "
            "when torchrun's MASTER_ADDR is set), file flags only otherwise; 'barrier': require the process "
            "group; 'file': never touch torch.distributed (only for factories that do not create a process "
            "group themselves: TRL's SFTConfig does under torchrun, so keep 'auto' there)"
        },
    )
    verify: str = field(
        default="checksum", metadata={"help": "'checksum' (size + SHA-256 of each file) or 'size' before reuse"}
    )
    poll_interval_s: float = field(default=0.5, metadata={"help": "how often waiting ranks look for the cache"})
    progress_interval_s: float = field(default=30.0, metadata={"help": "how often waiting ranks log progress"})
    heartbeat_interval_s: float = field(default=5.0, metadata={"help": "how often the builder refreshes its marker"})
    heartbeat_timeout_s: float = field(
        default=180.0, metadata={"help": "a builder marker older than this means the builder died"}
    )

    def __post_init__(self):
        if not self.cache_dir:
            raise ValueError("cache_dir is empty; pass a folder (e.g. data/cache) or do not wrap the factory")
        if self.builder not in BUILDER_MODES:
            raise ValueError(f"builder={self.builder!r} must be one of {BUILDER_MODES}")
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync={self.sync!r} must be one of {SYNC_MODES}")
        from opensloth.data.prepared import VERIFY_MODES

        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify={self.verify!r} must be one of {VERIFY_MODES}")
        for name in ("timeout_minutes", "poll_interval_s", "progress_interval_s", "heartbeat_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s={self.heartbeat_timeout_s} must exceed heartbeat_interval_s="
                f"{self.heartbeat_interval_s}, or a live builder would look dead"
            )

    @property
    def timeout_s(self) -> float:
        return self.timeout_minutes * 60.0


def _as_config(cache_config) -> DatasetCacheConfig:
    if isinstance(cache_config, DatasetCacheConfig):
        return cache_config
    if cache_config is None:
        return DatasetCacheConfig()
    if isinstance(cache_config, Mapping):
        return DatasetCacheConfig(**cache_config)
    if isinstance(cache_config, (str, os.PathLike)):
        return DatasetCacheConfig(cache_dir=os.fspath(cache_config))
    raise TypeError(f"cache_config must be a DatasetCacheConfig, a dict or a folder path, got {type(cache_config)}")


# ---- key -----------------------------------------------------------------


def cache_key_parts(train_dataset, val_dataset, tokenizer, max_seq_length, cache_key_params) -> dict:
    """Everything the cache key is computed from (see :func:`opensloth.data.fingerprint.compute_cache_key`).

    ``val_dataset`` may be None, a Dataset or a dict of Datasets.
    """
    from opensloth.data.fingerprint import dataset_fingerprint, tokenizer_fingerprint

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


def sft_dataset_kwargs(train_dataset) -> dict | None:
    """``SFTConfig(dataset_kwargs=...)`` for a trainer factory.

    Returns ``{"skip_prepare_dataset": True}`` when ``train_dataset`` is
    already tokenized (has ``input_ids``: the cache or a precomputed folder
    handed it over), so TRL neither tokenizes nor re-shuffles it; None
    otherwise (TRL prepares raw data as usual).
    """
    columns = getattr(train_dataset, "column_names", None) or []
    return {"skip_prepare_dataset": True} if "input_ids" in columns else None


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


def trainer_prepare_args(trainer) -> dict:
    """The trainer options that shaped (or would shape) its tokenized data."""
    args = getattr(trainer, "args", None)
    out = {name: getattr(args, name) for name in _PREPARE_FIELDS if hasattr(args, name)}
    if out.get("shuffle_dataset"):
        out["seed"] = getattr(args, "seed", None)
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in out.items()}


# ---- markers (builder progress, failure) ----------------------------------


def _marker_path(cache_dir: str, key: str, kind: str) -> str:
    return os.path.join(cache_dir, f".{key}.{kind}.json")


def _read_marker(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_marker(path: str, payload: dict) -> None:
    from opensloth.utils.atomic import write_json_atomic

    # Heartbeats rewrite markers often; skip fsync (a lost heartbeat only delays a timeout).
    write_json_atomic(path, payload, indent=None, sort_keys=False, fsync=False)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _marker_is_current(marker: Mapping, launch_id: str | None) -> bool:
    """Does a marker belong to this launch? Only decidable with a shared launch id."""
    return launch_id is not None and marker.get("launch_id") == launch_id


def builder_liveness(marker: Mapping | None, launch_id: str | None, host: str, now: float,
                     heartbeat_timeout_s: float, pid_alive: Callable[[int], bool]) -> str | None:
    """Why the builder of this launch must be presumed dead, or None.

    Pure decision over the builder marker: a marker of another launch says
    nothing; on this host a vanished pid is proof; on any host a heartbeat
    older than ``heartbeat_timeout_s`` is.
    """
    if marker is None or not _marker_is_current(marker, launch_id):
        return None
    pid = marker.get("pid")
    if marker.get("host") == host and isinstance(pid, int) and not pid_alive(pid):
        return f"builder process {pid} on {host} is gone (killed or crashed) during stage {marker.get('stage')!r}"
    beat = marker.get("heartbeat")
    if isinstance(beat, (int, float)) and now - beat > heartbeat_timeout_s + _CLOCK_SKEW_S:
        return (
            f"builder (rank {marker.get('rank')} on {marker.get('host')}, pid {pid}) stopped its heartbeat "
            f"{now - beat:.0f}s ago during stage {marker.get('stage')!r}"
        )
    return None


class _Heartbeat:
    """The builder's marker, refreshed from a daemon thread while it works."""

    def __init__(self, path: str, payload: dict, interval_s: float):
        self.path, self.payload, self.interval_s = path, dict(payload), interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="opensloth-cache-heartbeat", daemon=True)

    def _beat(self) -> None:
        with self._lock:
            self.payload["heartbeat"] = time.time()
            with contextlib.suppress(OSError):
                _write_marker(self.path, self.payload)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def stage(self, name: str) -> None:
        self.payload["stage"] = name
        self._beat()

    def __enter__(self) -> "_Heartbeat":
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        _remove(self.path)


# ---- the scoped accelerate patch -------------------------------------------

PREPARE_ALONE_PATCH = "dataset_cache_prepare_alone"
PREPARE_ALONE_WRITTEN_FOR = "accelerate 1.x (PartialState._goes_first behind main_process_first)"
_PREPARE_ALONE_DESCRIPTION = (
    "scoped: only while the dataset cache runs the trainer factory on one rank, main_process_first / "
    "local_main_process_first run their block without waiting for the other ranks"
)


def _no_wait_goes_first_factory(original):
    def _goes_first(self, is_main: bool):
        # The other ranks are not inside this block now (they poll for the cache),
        # so there is nobody to go first of; waiting would deadlock.
        yield

    return _goes_first


@contextlib.contextmanager
def _prepare_alone(active: bool):
    """Make accelerate's main-process-first blocks non-blocking while ``active``.

    Raises:
        PatchTargetError: accelerate no longer implements ``main_process_first``
            through ``PartialState._goes_first`` and ``wait_for_everyone``.
    """
    if not active:
        yield
        return
    from accelerate.state import PartialState

    from opensloth.patching.registry import record_patch, require_attr, require_source_contains, swap_method, unpatch

    goes_first = require_attr(PartialState, "_goes_first", PREPARE_ALONE_PATCH, PREPARE_ALONE_WRITTEN_FOR)
    require_source_contains(goes_first, ["wait_for_everyone"], PREPARE_ALONE_PATCH, PREPARE_ALONE_WRITTEN_FOR)
    for method in ("main_process_first", "local_main_process_first"):
        require_source_contains(
            require_attr(PartialState, method, PREPARE_ALONE_PATCH, PREPARE_ALONE_WRITTEN_FOR),
            ["_goes_first"],
            PREPARE_ALONE_PATCH,
            PREPARE_ALONE_WRITTEN_FOR,
        )
    swapped = swap_method(
        PartialState,
        "_goes_first",
        _no_wait_goes_first_factory,
        name=PREPARE_ALONE_PATCH,
        written_for=PREPARE_ALONE_WRITTEN_FOR,
        description=_PREPARE_ALONE_DESCRIPTION,
    )
    try:
        yield
    finally:
        if swapped:
            unpatch(PartialState, "_goes_first", PREPARE_ALONE_PATCH)
            # Keep it listed in applied_patches(): it was applied in this process.
            record_patch(PREPARE_ALONE_PATCH, "accelerate.state.PartialState._goes_first",
                         PREPARE_ALONE_WRITTEN_FOR, _PREPARE_ALONE_DESCRIPTION)


# ---- coordination ------------------------------------------------------------


@dataclass
class _Launch:
    env: DistEnv
    use_group: bool
    launch_id: str | None
    host: str
    started: float


def _setup_launch(env: DistEnv, cfg: DatasetCacheConfig) -> _Launch:
    """Decide barrier vs file flags, and agree on a launch id when a group exists."""
    host = socket.gethostname()
    use_group = False
    if env.is_distributed and cfg.sync != "file":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            use_group = True
        elif os.environ.get("MASTER_ADDR") or cfg.sync == "barrier":
            from opensloth.utils.distributed import ensure_process_group

            use_group = ensure_process_group(env)
    launch_id = None
    if not use_group:
        run_id = os.environ.get("OPENSLOTH_LAUNCH_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
        launch_id = run_id if run_id and run_id.lower() != "none" else None
    return _Launch(env=env, use_group=use_group, launch_id=launch_id, host=host, started=time.time())


def _agree_on_key(launch: _Launch, key: str, parts: dict) -> None:
    """With a process group: share rank 0's launch id and check every rank has the same key."""
    if not launch.use_group:
        return
    from opensloth.data.fingerprint import diff_key_parts
    from opensloth.utils.distributed import all_gather_object_list

    mine = {"key": key, "parts": parts, "launch_id": uuid.uuid4().hex, "host": launch.host}
    gathered = all_gather_object_list(mine)
    launch.launch_id = gathered[0]["launch_id"]
    reference = gathered[0]
    bad = [rank for rank, item in enumerate(gathered) if item["key"] != reference["key"]]
    if bad:
        differs = diff_key_parts(reference["parts"], gathered[bad[0]]["parts"])
        raise DatasetCacheMismatchError(
            f"ranks {bad} computed a different dataset cache key than rank 0 ({gathered[bad[0]]['key']} vs "
            f"{reference['key']}); they differ in {differs}. Every rank must load the same data, tokenizer and "
            f"cache_key_params."
        )


def _is_builder(env: DistEnv, cfg: DatasetCacheConfig) -> bool:
    return env.rank == 0 if cfg.builder == "global" else env.local_rank == 0


def _builder_name(env: DistEnv, cfg: DatasetCacheConfig) -> str:
    return "global rank 0" if cfg.builder == "global" else "local rank 0 of this node"


def wait_for_prepared(path: str, key: str, cfg: DatasetCacheConfig, launch: _Launch,
                      sleep: Callable[[float], None] = time.sleep):
    """Poll until the cache at ``path`` is published and intact; return its metadata.

    Raises:
        CacheBuildFailedError: the builder of this launch recorded an error.
        CacheBuilderDiedError: the builder's process is gone or its heartbeat stopped.
        CacheWaitTimeout: nothing usable appeared within ``cfg.timeout_minutes``.
    """
    from opensloth.data.prepared import READY_FILE, _pid_alive, inspect_prepared
    from opensloth.log import log_all_ranks

    cache_dir = os.path.dirname(path)
    building_path = _marker_path(cache_dir, key, "building")
    failed_path = _marker_path(cache_dir, key, "failed")
    start = time.monotonic()
    deadline = start + cfg.timeout_s
    next_progress = start
    rejected_stamp = None  # (mtime, inode) of a READY whose folder failed validation
    last_reason = "missing"
    who = _builder_name(launch.env, cfg)
    while True:
        ready = os.path.join(path, READY_FILE)
        try:
            st = os.stat(ready)
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and stamp != rejected_stamp:
            status = inspect_prepared(path, key, cfg.verify)
            if status.ok:
                return status.metadata
            rejected_stamp, last_reason = stamp, status.reason
        failed = _read_marker(failed_path)
        if failed is not None and _marker_is_current(failed, launch.launch_id):
            raise CacheBuildFailedError(
                f"rank {launch.env.rank}: the builder ({who}, pid {failed.get('pid')} on {failed.get('host')}) "
                f"failed to build the tokenized dataset cache {path}: {failed.get('error')}"
            )
        building = _read_marker(building_path)
        dead = builder_liveness(building, launch.launch_id, launch.host, time.time(), cfg.heartbeat_timeout_s,
                                _pid_alive)
        if dead:
            raise CacheBuilderDiedError(
                f"rank {launch.env.rank}: gave up waiting for the tokenized dataset cache {path}: {dead}. "
                f"Nothing half-written is ever loaded; relaunch and the cache is rebuilt."
            )
        now = time.monotonic()
        if now >= deadline:
            seen = (
                f"last builder status: stage {building.get('stage')!r}, heartbeat "
                f"{time.time() - building.get('heartbeat', time.time()):.0f}s ago"
                if building
                else "no builder marker was seen"
            )
            raise CacheWaitTimeout(
                f"rank {launch.env.rank}: waited {cfg.timeout_minutes:g} min for {who} to publish the tokenized "
                f"dataset cache {path} (waiting for {ready} and an intact cache_metadata.json; last check: "
                f"{last_reason}; {seen}). If the builder crashed, relaunch: the cache is rebuilt. If tokenizing "
                f"takes longer, raise timeout_minutes."
            )
        if now >= next_progress:
            stage = f"builder stage {building.get('stage')!r}" if building else "builder not started yet"
            log_all_ranks(
                f"waiting for {who} to tokenize into {path} ({stage}; {now - start:.0f}s of "
                f"{cfg.timeout_s:.0f}s)"
            )
            next_progress = now + cfg.progress_interval_s
        sleep(min(cfg.poll_interval_s, max(deadline - now, 0.01)))


def _build_and_publish(factory, call_args, call_kwargs, path, key, parts, cfg, launch, alone: bool):
    """Builder side of a cold cache: run the factory, publish its tokenized splits."""
    from opensloth.data.fingerprint import tokenizer_fingerprint
    from opensloth.data.prepared import library_versions, load_prepared_splits, publish_prepared
    from opensloth.log import log_all_ranks

    cache_dir = os.path.dirname(path)
    os.makedirs(cache_dir, exist_ok=True)
    failed_path = _marker_path(cache_dir, key, "failed")
    _remove(failed_path)
    marker = {
        "launch_id": launch.launch_id,
        "rank": launch.env.rank,
        "host": launch.host,
        "pid": os.getpid(),
        "started": time.time(),
        "stage": "tokenizing",
    }
    model, tokenizer, train_dataset, val_dataset, world_size = call_args[:5]
    try:
        with _Heartbeat(_marker_path(cache_dir, key, "building"), marker, cfg.heartbeat_interval_s) as beat:
            t0, cpu0 = time.perf_counter(), time.process_time()
            with _prepare_alone(alone):
                trainer = factory(*call_args, **call_kwargs)
            build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
            beat.stage("saving")
            metadata = {
                "cache_key": key,
                "key_parts": parts,
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "trainer_prepare_args": trainer_prepare_args(trainer),
                "raw_sizes": {
                    "train": len(train_dataset),
                    "val": (
                        {k: len(v) for k, v in val_dataset.items()} if isinstance(val_dataset, Mapping)
                        else (len(val_dataset) if val_dataset is not None else None)
                    ),
                },
                "versions": library_versions(),
                "build_seconds": round(build_s, 3),
                "build_cpu_seconds": round(build_cpu_s, 3),
                "created_by": {"rank": launch.env.rank, "world_size": launch.env.world_size},
            }
            written = publish_prepared(
                path, {"train": trainer.train_dataset, "val": trainer.eval_dataset}, metadata, cfg.verify
            )
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _write_marker(failed_path, {**marker, "error": f"{type(exc).__name__}: {exc}", "time": time.time()})
        raise
    # Train from the published files, like every other rank: identical bytes everywhere, and the
    # in-memory copy the trainer made can be freed.
    splits = load_prepared_splits(path, written)
    trainer.train_dataset, trainer.eval_dataset = splits["train"], splits.get("val")
    log_all_ranks(
        f"built the tokenized dataset cache {path} in {build_s:.1f}s "
        f"({written['splits']['train']['rows']} train rows)"
    )
    return trainer


def _check_prepare_args(trainer, metadata: Mapping, path: str) -> None:
    recorded = metadata.get("trainer_prepare_args") or {}
    current = trainer_prepare_args(trainer)
    differing = {k: (recorded[k], current[k]) for k in recorded.keys() & current.keys() if recorded[k] != current[k]}
    if differing:
        detail = ", ".join(f"{k}: cached {a!r} vs now {b!r}" for k, (a, b) in sorted(differing.items()))
        raise DatasetCacheMismatchError(
            f"the tokenized dataset cache {path} was prepared with other trainer options ({detail}). Add these "
            f"options to cache_key_params so that each setting gets its own cache, or delete {path}."
        )


def _run_factory_on_cache(factory, call_args, call_kwargs, path, metadata, alone: bool):
    """Load the published splits and build this rank's trainer from them."""
    from opensloth.data.prepared import load_prepared_splits
    from opensloth.log import log_all_ranks

    splits = load_prepared_splits(path, metadata)
    train, val = splits["train"], splits.get("val")
    model, tokenizer, _, _, world_size = call_args[:5]
    with _prepare_alone(alone):
        trainer = factory(model, tokenizer, train, val, world_size, *call_args[5:], **call_kwargs)
    _check_prepare_args(trainer, metadata, path)
    if getattr(trainer, "train_dataset", None) is not train or getattr(trainer, "eval_dataset", None) is not val:
        # The factory let the trainer prepare the cached data again. Nothing is re-tokenized
        # (the rows carry input_ids), but a shuffle would give this rank another order than
        # the builder, so the published splits are put back.
        log_all_ranks(
            "the trainer factory re-prepared the cached dataset; pass "
            "SFTConfig(dataset_kwargs=opensloth.utils.dataset_cache.sft_dataset_kwargs(train_dataset)) "
            "to skip that. Restoring the cached splits so all ranks train on identical data.",
            logging.WARNING,
        )
        trainer.train_dataset, trainer.eval_dataset = train, val
    return trainer


def _cached_trainer(factory, cfg: DatasetCacheConfig, cache_key_params: dict, call_args: tuple, call_kwargs: dict):
    from opensloth.data.fingerprint import compute_cache_key
    from opensloth.data.prepared import inspect_prepared
    from opensloth.log import log_all_ranks, log_rank0, warn_rank0
    from opensloth.utils.distributed import barrier

    if len(call_args) < 5:
        raise TypeError(
            "a cached trainer factory is called as factory(model, tokenizer, train_dataset, val_dataset, "
            f"world_size, ...); got {len(call_args)} positional arguments"
        )
    model, tokenizer, train_dataset, val_dataset, world_size = call_args[:5]
    env = _check_distributed_environment()
    if world_size != env.world_size:
        warn_rank0(f"the factory got world_size={world_size} but WORLD_SIZE is {env.world_size}")
    launch = _setup_launch(env, cfg)
    max_seq_length = cache_key_params.get("max_seq_length", getattr(model, "max_seq_length", None))
    t0 = time.perf_counter()
    parts = cache_key_parts(train_dataset, val_dataset, tokenizer, max_seq_length, cache_key_params)
    key = compute_cache_key(parts)
    _agree_on_key(launch, key, parts)
    path = os.path.join(os.path.abspath(cfg.cache_dir), key)
    log_rank0(f"dataset cache key {key} ({time.perf_counter() - t0:.2f}s to fingerprint); cache {path}")
    alone = launch.use_group  # only a process group can make main_process_first wait
    if _is_builder(env, cfg):
        status = inspect_prepared(path, key, cfg.verify)
        if status.ok:
            log_all_ranks(f"reusing the tokenized dataset cache {path}; no rank tokenizes")
            trainer = _run_factory_on_cache(factory, call_args, call_kwargs, path, status.metadata, alone)
        else:
            if not status.missing:
                log_all_ranks(f"the tokenized dataset cache {path} is unusable ({status.reason}); rebuilding",
                              logging.WARNING)
            trainer = _build_and_publish(factory, call_args, call_kwargs, path, key, parts, cfg, launch, alone)
    else:
        metadata = wait_for_prepared(path, key, cfg, launch)
        trainer = _run_factory_on_cache(factory, call_args, call_kwargs, path, metadata, alone)
    if launch.use_group:
        barrier()  # every rank holds a trainer over the same published data
    return trainer


def cache_dataset_wrapper(cache_config=None, cache_key_params: Mapping[str, Any] | None = None):
    """Decorate a trainer factory so that one rank tokenizes and every rank reuses it.

    Args:
        cache_config: a :class:`DatasetCacheConfig`, a dict of its fields, or
            the cache folder as a string.
        cache_key_params: JSON-able values that change tokenization and so
            must select a different cache: ``max_seq_length`` (else taken
            from ``model.max_seq_length``), formatting options, and any
            trainer option such as ``assistant_only_loss`` or ``packing``.

    Returns:
        A decorator. The decorated factory has the signature
        ``(model, tokenizer, train_dataset, val_dataset, world_size, *args, **kwargs)``
        and must return a trainer with ``train_dataset`` / ``eval_dataset``
        attributes (TRL's ``SFTTrainer``). On ranks that load the cache it is
        called with the tokenized splits in place of the raw ones.

    The wrapped call raises :class:`CacheWaitTimeout`,
    :class:`CacheBuildFailedError`, :class:`CacheBuilderDiedError` or
    :class:`DatasetCacheMismatchError`; see the module doc for the protocol.
    """
    cfg = _as_config(cache_config)
    params = dict(cache_key_params or {})
    for name, value in params.items():
        try:  # a repr() of an object would hold its address: a new key on every launch
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise TypeError(
                f"cache_key_params[{name!r}] = {value!r} is not a plain JSON value (str, int, float, bool, None, "
                f"list, dict); pass the setting itself, e.g. a number or a string"
            ) from None

    def decorate(factory):
        @functools.wraps(factory)
        def wrapped(*args, **kwargs):
            return _cached_trainer(factory, cfg, params, args, kwargs)

        wrapped.cache_config = cfg
        wrapped.cache_key_params = params
        return wrapped

    return decorate


def simple_cache_dataset_wrapper(cache_dir: str = "data/cache", timeout_minutes: float = 30.0,
                                 builder: str = "global", **cache_key_params):
    """:func:`cache_dataset_wrapper` with the common settings as keywords.

    ``@simple_cache_dataset_wrapper(cache_dir="data/cache", max_seq_length=2048, assistant_only_loss=False)``;
    every keyword other than ``cache_dir``, ``timeout_minutes`` and ``builder``
    goes into the cache key.
    """
    config = DatasetCacheConfig(cache_dir=cache_dir, timeout_minutes=timeout_minutes, builder=builder)
    return cache_dataset_wrapper(config, cache_key_params)


def load_prepared_dataset(path: str, tokenizer, max_seq_length: int | None = None, verify: str = "checksum"):
    """Load ``(train, val)`` written by ``train_scripts/precompute_dataset.py``; see
    :func:`opensloth.data.prepared.load_prepared_dataset` (raises on a tokenizer mismatch)."""
    from opensloth.data.prepared import load_prepared_dataset as _load

    return _load(path, tokenizer, max_seq_length=max_seq_length, verify=verify)
