"""Tokenize once, on one rank, for all ranks and later launches.

- :mod:`~opensloth.cache.key` -- fingerprints of data and tokenizers, the cache key.
- :mod:`~opensloth.cache.store` -- a tokenized dataset on disk: atomic publish, inspect, load
  (also what ``train_scripts/precompute_dataset.py`` writes).
- :mod:`~opensloth.cache.coordination` -- who builds, how the other ranks wait, a dead builder.
- :mod:`~opensloth.cache.wrapper` -- ``cache_dataset_wrapper`` / ``simple_cache_dataset_wrapper``
  around a trainer factory (the protocol is described there).
- :mod:`~opensloth.cache.legacy` -- ``CacheConfig``, the original OpenSloth's settings class.

``import opensloth.cache`` is cheap: ``datasets`` is imported by the functions that need it.
"""

from opensloth.cache.coordination import (
    CACHE_DIR_ENV,
    CacheBuildFailedError,
    CacheBuilderDiedError,
    CacheWaitTimeout,
    DatasetCacheConfig,
    DatasetCacheError,
    DatasetCacheMismatchError,
    default_cache_dir,
)
from opensloth.cache.legacy import CacheConfig
from opensloth.cache.store import PreparedDatasetError, PreparedDatasetMismatchError, load_prepared_dataset
from opensloth.cache.wrapper import cache_dataset_wrapper, sft_dataset_kwargs, simple_cache_dataset_wrapper

__all__ = [
    "CACHE_DIR_ENV",
    "CacheBuildFailedError",
    "CacheConfig",
    "CacheBuilderDiedError",
    "CacheWaitTimeout",
    "DatasetCacheConfig",
    "DatasetCacheError",
    "DatasetCacheMismatchError",
    "PreparedDatasetError",
    "PreparedDatasetMismatchError",
    "cache_dataset_wrapper",
    "default_cache_dir",
    "load_prepared_dataset",
    "sft_dataset_kwargs",
    "simple_cache_dataset_wrapper",
]
