"""Multi-rank coordination of the dataset cache: who builds, how the others wait, how a dead builder is seen.

Pieces used by :mod:`opensloth.cache.wrapper` (the protocol is described there):

- :class:`DatasetCacheConfig` -- where the cache lives and the waiting knobs;
- the builder's marker files (``.<key>.building.json`` refreshed by a
  heartbeat thread, ``.<key>.failed.json`` with its error) and
  :func:`builder_liveness`, the pure decision "is the builder dead?";
- :func:`wait_for_prepared` -- the polling loop of the ranks that do not build;
- the launch id and the key agreement of a process group (one all-gather).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping

from opensloth.atomic import write_json_atomic
from opensloth.cache.key import diff_key_parts
from opensloth.cache.store import READY_FILE, VERIFY_MODES, inspect_prepared, pid_alive
from opensloth.distributed import DistEnv, all_gather_object_list, barrier, ensure_process_group
from opensloth.errors import EXIT_USER, ReportedError
from opensloth.log import log_all_ranks

__all__ = [
    "BUILDER_MODES",
    "SYNC_MODES",
    "CacheBuildFailedError",
    "CacheBuilderDiedError",
    "CacheLaunch",
    "CacheNotSharedError",
    "CacheWaitTimeout",
    "DatasetCacheConfig",
    "DatasetCacheError",
    "DatasetCacheMismatchError",
    "Heartbeat",
    "agree_on_key",
    "builder_liveness",
    "builder_name",
    "is_builder",
    "marker_path",
    "read_marker",
    "remove_file",
    "require_shared_cache_dir",
    "setup_launch",
    "wait_for_prepared",
    "write_marker",
]

BUILDER_MODES = ("global", "local")
SYNC_MODES = ("auto", "barrier", "file")
# Clock skew tolerated between hosts when a marker's time is compared with ours.
_CLOCK_SKEW_S = 5.0


class DatasetCacheError(ReportedError, RuntimeError):
    """Base class of the dataset-cache errors; each message names the cache and what to do, so scripts
    print it as one line (exit code 1: the run failed; see :func:`opensloth.errors.run_cli`)."""


class CacheWaitTimeout(DatasetCacheError):
    """A waiting rank gave up: the builder did not publish the cache in time."""


class CacheBuildFailedError(DatasetCacheError):
    """The builder raised while building the cache (its error is in the message)."""


class CacheBuilderDiedError(DatasetCacheError):
    """The builder process disappeared (killed) while building the cache."""


class CacheNotSharedError(DatasetCacheError):
    """``builder="global"`` but some hosts do not see the cache folder of global rank 0."""

    exit_code = EXIT_USER


class DatasetCacheMismatchError(DatasetCacheError):
    """Ranks disagree on the cache key, or the trainer's data options differ from the cached ones."""

    exit_code = EXIT_USER


CACHE_DIR_ENV = "OPENSLOTH_CACHE_DIR"


def default_cache_dir(environ=None) -> str:
    """Where tokenized datasets go when no folder is named.

    ``$OPENSLOTH_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/opensloth/datasets``
    (``~/.cache/opensloth/datasets``): a user cache folder, never a project's
    data folder (runtime output does not belong next to shipped data). Keys are
    content hashes, so runs of different projects never collide there.
    """
    env = os.environ if environ is None else environ
    if env.get(CACHE_DIR_ENV):
        return env[CACHE_DIR_ENV]
    root = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "opensloth", "datasets")


@dataclass
class DatasetCacheConfig:
    """Where and how tokenized datasets are cached and shared between ranks."""

    cache_dir: str | None = field(default=None, metadata={
        "help": "folder holding one sub-folder per cache key (default: $OPENSLOTH_CACHE_DIR, else "
                "$XDG_CACHE_HOME/opensloth/datasets, i.e. ~/.cache/opensloth/datasets)"})
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
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()
        if not self.cache_dir:
            raise ValueError("cache_dir is empty; pass a folder (e.g. outputs/cache) or do not wrap the factory")
        if self.builder not in BUILDER_MODES:
            raise ValueError(f"builder={self.builder!r} must be one of {BUILDER_MODES}")
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync={self.sync!r} must be one of {SYNC_MODES}")
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


def marker_path(cache_dir: str, key: str, kind: str) -> str:
    return os.path.join(cache_dir, f".{key}.{kind}.json")


def read_marker(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_marker(path: str, payload: dict) -> None:
    # Heartbeats rewrite markers often; skip fsync (a lost heartbeat only delays a timeout).
    write_json_atomic(path, payload, indent=None, sort_keys=False, fsync=False)


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def marker_is_current(marker: Mapping, launch_id: str | None) -> bool:
    """Does a marker belong to this launch? Only decidable with a shared launch id."""
    return launch_id is not None and marker.get("launch_id") == launch_id


def builder_liveness(marker: Mapping | None, launch_id: str | None, host: str, now: float,
                     heartbeat_timeout_s: float, pid_alive: Callable[[int], bool]) -> str | None:
    """Why the builder of this launch must be presumed dead, or None.

    Pure decision over the builder marker: a marker of another launch says
    nothing; on this host a vanished pid is proof; on any host a heartbeat
    older than ``heartbeat_timeout_s`` is.
    """
    if marker is None or not marker_is_current(marker, launch_id):
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


class Heartbeat:
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
                write_marker(self.path, self.payload)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def stage(self, name: str) -> None:
        self.payload["stage"] = name
        self._beat()

    def __enter__(self) -> "Heartbeat":
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        remove_file(self.path)


@dataclass
class CacheLaunch:
    env: DistEnv
    use_group: bool
    launch_id: str | None
    host: str
    started: float
    hosts: list[str] = field(default_factory=list)  # host of every rank (known with a process group)


def setup_launch(env: DistEnv, cfg: DatasetCacheConfig) -> CacheLaunch:
    """Decide barrier vs file flags, and agree on a launch id when a group exists."""
    host = socket.gethostname()
    use_group = False
    if env.is_distributed and cfg.sync != "file":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            use_group = True
        elif os.environ.get("MASTER_ADDR") or cfg.sync == "barrier":
            use_group = ensure_process_group(env)
    launch_id = None
    if not use_group:
        run_id = os.environ.get("OPENSLOTH_LAUNCH_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
        launch_id = run_id if run_id and run_id.lower() != "none" else None
    return CacheLaunch(env=env, use_group=use_group, launch_id=launch_id, host=host, started=time.time())


def agree_on_key(launch: CacheLaunch, key: str, parts: dict) -> None:
    """With a process group: share rank 0's launch id and check every rank has the same key."""
    if not launch.use_group:
        return
    mine = {"key": key, "parts": parts, "launch_id": uuid.uuid4().hex, "host": launch.host}
    gathered = all_gather_object_list(mine)
    launch.launch_id = gathered[0]["launch_id"]
    launch.hosts = [item["host"] for item in gathered]
    reference = gathered[0]
    bad = [rank for rank, item in enumerate(gathered) if item["key"] != reference["key"]]
    if bad:
        differs = diff_key_parts(reference["parts"], gathered[bad[0]]["parts"])
        raise DatasetCacheMismatchError(
            f"ranks {bad} computed a different dataset cache key than rank 0 ({gathered[bad[0]]['key']} vs "
            f"{reference['key']}); they differ in {differs}. Every rank must load the same data, tokenizer and "
            f"cache_key_params."
        )


def require_shared_cache_dir(launch: CacheLaunch, cfg: DatasetCacheConfig, cache_dir: str) -> None:
    """With ``builder="global"`` on several hosts, check at once that every rank sees global rank 0's folder.

    Otherwise the other nodes would poll for a cache they cannot see until
    ``timeout_minutes`` (30 by default). Global rank 0 writes a probe file,
    every rank looks for it (two barriers and one gather, only when the ranks
    span several hosts). A rank that does not see it at once keeps looking
    for up to ``heartbeat_timeout_s`` (a network filesystem may cache the
    directory listing for a while) before it is counted as blind.

    Raises:
        CacheNotSharedError: on every rank, naming the hosts that do not see it.
    """
    if not launch.use_group or cfg.builder != "global" or len(set(launch.hosts)) < 2:
        return
    probe = os.path.join(cache_dir, f".probe-{launch.launch_id}.json")
    if launch.env.rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        write_marker(probe, {"host": launch.host, "launch_id": launch.launch_id})
    barrier()
    deadline = time.monotonic() + min(cfg.heartbeat_timeout_s, cfg.timeout_s)
    while not os.path.exists(probe) and time.monotonic() < deadline:
        time.sleep(cfg.poll_interval_s)
    seen = all_gather_object_list(os.path.exists(probe))
    barrier()
    if launch.env.rank == 0:
        remove_file(probe)
    blind = sorted({launch.hosts[rank] for rank, ok in enumerate(seen) if not ok})
    if blind:
        exc = CacheNotSharedError(
            f"--cache_dir {cache_dir} is not shared: {', '.join(blind)} cannot see what global rank 0 on "
            f"{launch.hosts[0]} writes there, so they would wait for a cache they never see. Pass --cache_builder "
            "local (each node tokenizes into its own folder) or put --cache_dir on a filesystem every node mounts")
        exc.every_rank = True
        raise exc


def is_builder(env: DistEnv, cfg: DatasetCacheConfig) -> bool:
    return env.rank == 0 if cfg.builder == "global" else env.local_rank == 0


def builder_name(env: DistEnv, cfg: DatasetCacheConfig) -> str:
    return "global rank 0" if cfg.builder == "global" else "local rank 0 of this node"


def wait_for_prepared(path: str, key: str, cfg: DatasetCacheConfig, launch: CacheLaunch,
                      sleep: Callable[[float], None] = time.sleep):
    """Poll until the cache at ``path`` is published and intact; return its metadata.

    Raises:
        CacheBuildFailedError: the builder of this launch recorded an error.
        CacheBuilderDiedError: the builder's process is gone or its heartbeat stopped.
        CacheWaitTimeout: nothing usable appeared within ``cfg.timeout_minutes``.
    """
    cache_dir = os.path.dirname(path)
    building_path = marker_path(cache_dir, key, "building")
    failed_path = marker_path(cache_dir, key, "failed")
    start = time.monotonic()
    deadline = start + cfg.timeout_s
    next_progress = start
    rejected_stamp = None  # (mtime, inode) of a READY whose folder failed validation
    last_reason = "missing"
    who = builder_name(launch.env, cfg)
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
        failed = read_marker(failed_path)
        if failed is not None and marker_is_current(failed, launch.launch_id):
            raise CacheBuildFailedError(
                f"rank {launch.env.rank}: the builder ({who}, pid {failed.get('pid')} on {failed.get('host')}) "
                f"failed to build the tokenized dataset cache {path}: {failed.get('error')}"
            )
        building = read_marker(building_path)
        dead = builder_liveness(building, launch.launch_id, launch.host, time.time(), cfg.heartbeat_timeout_s,
                                pid_alive)
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
