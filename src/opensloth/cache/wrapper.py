"""Tokenize once for all ranks: ``cache_dataset_wrapper`` / ``simple_cache_dataset_wrapper``.

Stock Unsloth/TRL SFT tokenizes the whole dataset on every rank. Decorating
the trainer factory with :func:`simple_cache_dataset_wrapper` (or
:func:`cache_dataset_wrapper`) makes one rank do it::

    @simple_cache_dataset_wrapper(cache_dir="outputs/cache", max_seq_length=2048)
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
   :mod:`opensloth.cache.store`).
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
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Mapping

from opensloth.cache.coordination import (
    DatasetCacheConfig,
    DatasetCacheMismatchError,
    Heartbeat,
    agree_on_key,
    is_builder,
    marker_path,
    remove_file,
    require_shared_cache_dir,
    setup_launch,
    wait_for_prepared,
    write_marker,
)
from opensloth.cache.key import (
    TRAINER_REWRITES,
    cache_key_parts,
    compute_cache_key,
    tokenizer_fingerprint,
    trainer_library,
    trainer_prepare_args,
)
from opensloth.cache.legacy import CacheConfig
from opensloth.cache.store import inspect_prepared, library_versions, load_prepared_splits, publish_prepared
from opensloth.distributed import barrier, distributed_env
from opensloth.log import log_all_ranks, log_rank0, warn_rank0
from opensloth.patches.prepare_alone import prepare_alone

__all__ = ["DATA_REPORT", "cache_dataset_wrapper", "simple_cache_dataset_wrapper", "sft_dataset_kwargs"]

# A trainer attribute (a JSON-able dict) the factory may set on the raw data; the cache stores it in
# cache_metadata.json and sets it again on every trainer built from the cache.
DATA_REPORT = "opensloth_data_report"


def sft_dataset_kwargs(train_dataset) -> dict | None:
    """``SFTConfig(dataset_kwargs=...)`` for a trainer factory.

    Returns ``{"skip_prepare_dataset": True}`` when ``train_dataset`` is
    already tokenized (has ``input_ids``: the cache or a precomputed folder
    handed it over), so TRL neither tokenizes nor re-shuffles it; None
    otherwise (TRL prepares raw data as usual).
    """
    columns = getattr(train_dataset, "column_names", None) or []
    return {"skip_prepare_dataset": True} if "input_ids" in columns else None


def _as_config(cache_config) -> DatasetCacheConfig:
    if isinstance(cache_config, DatasetCacheConfig):
        return cache_config
    if isinstance(cache_config, CacheConfig):  # the original OpenSloth's settings class
        return cache_config.dataset_cache_config()
    if cache_config is None:
        return DatasetCacheConfig()
    if isinstance(cache_config, Mapping):
        return DatasetCacheConfig(**cache_config)
    if isinstance(cache_config, (str, os.PathLike)):
        return DatasetCacheConfig(cache_dir=os.fspath(cache_config))
    raise TypeError(f"cache_config must be a DatasetCacheConfig, a CacheConfig, a dict or a folder path, "
                    f"got {type(cache_config)}")


FACTORY_ARGS = ("model", "tokenizer", "train_dataset", "val_dataset", "world_size")


def _factory_args_positional(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Move the contract's five arguments passed by keyword (the original allowed it) into their slots."""
    args, kwargs = tuple(args), dict(kwargs)
    for name in FACTORY_ARGS[len(args):]:
        if name not in kwargs:
            break
        args += (kwargs.pop(name),)
    return args, kwargs


def _build_and_publish(factory, call_args, call_kwargs, path, key, parts, cfg, launch, alone: bool):
    """Builder side of a cold cache: run the factory, publish its tokenized splits."""
    cache_dir = os.path.dirname(path)
    os.makedirs(cache_dir, exist_ok=True)
    failed_path = marker_path(cache_dir, key, "failed")
    remove_file(failed_path)
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
        with Heartbeat(marker_path(cache_dir, key, "building"), marker, cfg.heartbeat_interval_s) as beat:
            t0, cpu0 = time.perf_counter(), time.process_time()
            with prepare_alone(alone):
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
                # What the factory found in the raw data (e.g. conversations it cut), for later launches.
                DATA_REPORT: getattr(trainer, DATA_REPORT, None),
            }
            written = publish_prepared(
                path, {"train": trainer.train_dataset, "val": trainer.eval_dataset}, metadata, cfg.verify
            )
    except BaseException as exc:
        with contextlib.suppress(OSError):
            write_marker(failed_path, {**marker, "error": f"{type(exc).__name__}: {exc}", "time": time.time()})
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
        library = trainer_library(trainer)
        rewritten = TRAINER_REWRITES.get(library, ())
        # padding_free is what the library flips; max_length only moves along with it.
        if rewritten and rewritten[0] in differing and set(differing) <= set(rewritten):
            # The cache key covers the settings, so with one factory only the trainer's own
            # rewrite (raw data on the builder, tokenized rows here) can make these differ.
            raise DatasetCacheMismatchError(
                f"the tokenized dataset cache {path} was prepared with other trainer options ({detail}): "
                f"{library}'s {type(trainer).__name__} rewrote them itself, differently for the raw data the "
                f"builder tokenized and for the tokenized rows this rank reads (with padding_free unset it "
                f"turns padding-free on when it tokenizes, clearing max_length, and off for tokenized data). "
                f"Set padding_free explicitly in the SFTConfig (opensloth.sft.make_sft_config passes "
                f"padding_free=False), then delete {path}."
            )
        raise DatasetCacheMismatchError(
            f"the tokenized dataset cache {path} was prepared with other trainer options ({detail}). Add these "
            f"options to cache_key_params so that each setting gets its own cache, or delete {path}."
        )


def _run_factory_on_cache(factory, call_args, call_kwargs, path, metadata, alone: bool):
    """Load the published splits and build this rank's trainer from them."""
    splits = load_prepared_splits(path, metadata)
    train, val = splits["train"], splits.get("val")
    model, tokenizer, _, _, world_size = call_args[:5]
    with prepare_alone(alone):
        trainer = factory(model, tokenizer, train, val, world_size, *call_args[5:], **call_kwargs)
    _check_prepare_args(trainer, metadata, path)
    if metadata.get(DATA_REPORT) is not None:
        setattr(trainer, DATA_REPORT, metadata[DATA_REPORT])
    if getattr(trainer, "train_dataset", None) is not train or getattr(trainer, "eval_dataset", None) is not val:
        # The factory let the trainer prepare the cached data again. Nothing is re-tokenized
        # (the rows carry input_ids), but a shuffle would give this rank another order than
        # the builder, so the published splits are put back.
        log_all_ranks(
            "the trainer factory re-prepared the cached dataset; pass "
            "SFTConfig(dataset_kwargs=opensloth.cache.sft_dataset_kwargs(train_dataset)) "
            "to skip that. Restoring the cached splits so all ranks train on identical data.",
            logging.WARNING,
        )
        trainer.train_dataset, trainer.eval_dataset = train, val
    return trainer


def _cached_trainer(factory, cfg: DatasetCacheConfig, cache_key_params: dict, call_args: tuple, call_kwargs: dict):
    if len(call_args) < 5:
        raise TypeError(
            "a cached trainer factory is called as factory(model, tokenizer, train_dataset, val_dataset, "
            f"world_size, ...); got {len(call_args)} positional arguments"
        )
    model, tokenizer, train_dataset, val_dataset, world_size = call_args[:5]
    env = distributed_env()
    if world_size != env.world_size:
        warn_rank0(f"the factory got world_size={world_size} but WORLD_SIZE is {env.world_size}")
    launch = setup_launch(env, cfg)
    max_seq_length = cache_key_params.get("max_seq_length", getattr(model, "max_seq_length", None))
    t0 = time.perf_counter()
    parts = cache_key_parts(train_dataset, val_dataset, tokenizer, max_seq_length, cache_key_params)
    key = compute_cache_key(parts)
    agree_on_key(launch, key, parts)
    require_shared_cache_dir(launch, cfg, os.path.abspath(cfg.cache_dir))
    path = os.path.join(os.path.abspath(cfg.cache_dir), key)
    log_rank0(f"dataset cache key {key} ({time.perf_counter() - t0:.2f}s to fingerprint); cache {path}")
    alone = launch.use_group  # only a process group can make main_process_first wait
    if is_builder(env, cfg):
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


def cache_dataset_wrapper(cache_config=None, cache_key_params: Mapping[str, Any] | None = None,
                          validate_cache: bool = True):
    """Decorate a trainer factory so that one rank tokenizes and every rank reuses it.

    Args:
        cache_config: a :class:`DatasetCacheConfig`, a dict of its fields, the
            cache folder as a string, or the original OpenSloth's
            :class:`~opensloth.cache.legacy.CacheConfig`.
        cache_key_params: JSON-able values that change tokenization and so
            must select a different cache: ``max_seq_length`` (else taken
            from ``model.max_seq_length``), formatting options, and any
            trainer option such as ``assistant_only_loss`` or ``packing``.
        validate_cache: the original OpenSloth's switch. A cache is reused
            only when complete (``READY``, metadata, file manifest); True
            (default) also checks each file as ``cache_config.verify`` says
            (SHA-256 by default), False checks file sizes only.

    Returns:
        A decorator. The decorated factory has the signature
        ``(model, tokenizer, train_dataset, val_dataset, world_size, *args, **kwargs)``
        (the first five may also be passed by keyword) and must return a trainer with ``train_dataset`` / ``eval_dataset``
        attributes (TRL's ``SFTTrainer``). On ranks that load the cache it is
        called with the tokenized splits in place of the raw ones.

    The wrapped call raises :class:`CacheWaitTimeout`,
    :class:`CacheBuildFailedError`, :class:`CacheBuilderDiedError` or
    :class:`DatasetCacheMismatchError`; see the module doc for the protocol.
    """
    cfg = _as_config(cache_config)
    if not validate_cache:
        cfg = dataclasses.replace(cfg, verify="size")
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
            return _cached_trainer(factory, cfg, params, *_factory_args_positional(args, kwargs))

        wrapped.cache_config = cfg
        wrapped.cache_key_params = params
        return wrapped

    return decorate


def simple_cache_dataset_wrapper(cache_dir: str | None = None, timeout_minutes: float = 60.0,
                                 builder: str = "global", **cache_key_params):
    """:func:`cache_dataset_wrapper` with the common settings as keywords.

    ``@simple_cache_dataset_wrapper(cache_dir="outputs/cache", max_seq_length=2048, assistant_only_loss=False)``;
    every keyword other than ``cache_dir``, ``timeout_minutes`` and ``builder``
    goes into the cache key. ``cache_dir=None`` is :func:`opensloth.cache.default_cache_dir`
    (the original OpenSloth defaulted to ``data/cache``).
    """
    config = DatasetCacheConfig(cache_dir=cache_dir, timeout_minutes=timeout_minutes, builder=builder)
    return cache_dataset_wrapper(config, cache_key_params)
