"""Old home of packing, the dataset cache and the distributed helpers; the names stay importable from here.

``opensloth.utils.simple_cache_dataset_wrapper``, ``cache_dataset_wrapper`` and
``CacheConfig`` are :mod:`opensloth.cache`'s; see :mod:`opensloth.utils.packing` and
:mod:`opensloth.utils.dataset_cache` for the other moved names.
"""

from opensloth.cache import CacheConfig, cache_dataset_wrapper, simple_cache_dataset_wrapper

__all__ = ["CacheConfig", "cache_dataset_wrapper", "simple_cache_dataset_wrapper"]
