"""Utilities: packing, dataset caching, distributed environment checks.

``cache_dataset_wrapper`` and ``simple_cache_dataset_wrapper`` are exported
lazily so that ``import opensloth.utils`` stays cheap.
"""

from __future__ import annotations

__all__ = ["cache_dataset_wrapper", "simple_cache_dataset_wrapper"]


def __getattr__(name: str):
    if name in __all__:
        from opensloth.utils import dataset_cache

        return getattr(dataset_cache, name)
    raise AttributeError(f"module 'opensloth.utils' has no attribute {name!r}")
