"""``CacheConfig``: the original OpenSloth's cache settings, mapped onto :class:`DatasetCacheConfig`.

The original's ``CacheConfig(cache_dir, timeout_seconds, ready_flag_name,
train_subdir, val_subdir, metadata_file, enable_validation)`` named its own
folder layout. opensloth keeps one layout for every cache (``<cache_dir>/<key>/``
with ``train/``, ``val/``, ``cache_metadata.json`` and ``READY``, published
atomically), so only the folder, the timeout and the validation switch carry
over; layout names other than the original's defaults are accepted and
ignored with a one-time warning.
"""

from __future__ import annotations

from opensloth.cache.coordination import DatasetCacheConfig
from opensloth.log import warn_once

__all__ = ["CacheConfig"]

_LAYOUT_DEFAULTS = {
    "ready_flag_name": ".ready",
    "train_subdir": "train_dataset",
    "val_subdir": "val_dataset",
    "metadata_file": "cache_metadata.json",
}


class CacheConfig:
    """The original OpenSloth's cache settings (keyword arguments, same names and defaults).

    Args:
        cache_dir: parent folder of the caches.
        timeout_seconds: how long ranks that do not build wait for the builder.
        ready_flag_name, train_subdir, val_subdir, metadata_file: the
            original's layout names; opensloth's layout is fixed (see the
            module doc), so other values are ignored with a warning.
        enable_validation: True checks every cached file's size and SHA-256
            before reuse; False checks sizes only (the original ignored it).

    Pass it where the original did: ``cache_dataset_wrapper(cache_config=CacheConfig(...))``.
    """

    def __init__(self, cache_dir: str | None = None, timeout_seconds: int = 3600, ready_flag_name: str = ".ready",
                 train_subdir: str = "train_dataset", val_subdir: str = "val_dataset",
                 metadata_file: str = "cache_metadata.json", enable_validation: bool = True):
        self.cache_dir = cache_dir
        self.timeout_seconds = timeout_seconds
        self.ready_flag_name = ready_flag_name
        self.train_subdir = train_subdir
        self.val_subdir = val_subdir
        self.metadata_file = metadata_file
        self.enable_validation = enable_validation
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds={timeout_seconds!r} must be > 0")
        changed = [name for name, default in _LAYOUT_DEFAULTS.items() if getattr(self, name) != default]
        if changed:
            warn_once(f"CacheConfig: {', '.join(changed)} ignored; opensloth's cache layout is "
                      f"<cache_dir>/<key>/{{train,val,cache_metadata.json,READY}}", key="CacheConfig-layout")

    def dataset_cache_config(self) -> DatasetCacheConfig:
        """The equivalent :class:`DatasetCacheConfig` (global rank 0 builds; see :mod:`opensloth.cache.wrapper`)."""
        return DatasetCacheConfig(cache_dir=self.cache_dir, timeout_minutes=self.timeout_seconds / 60.0,
                                  verify="checksum" if self.enable_validation else "size")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"CacheConfig({fields})"
