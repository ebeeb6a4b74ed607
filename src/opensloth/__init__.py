"""opensloth: scale Unsloth/TRL LoRA fine-tuning across ranks with plain torchrun DDP.

Importing this package is cheap: it imports neither torch, Unsloth nor TRL.
Heavy libraries are imported inside the functions that need them.

Where things are (``docs/architecture.md`` has the layer diagram):

- ``opensloth.patches.ddp.ddp_patch`` -- pin the rank's device, set the
  process-group backend and fix the trainer's cross-rank loss scaling.
- ``opensloth.patches.applied_patches`` -- list what opensloth has patched.
- ``opensloth.packing`` -- best-fit packing and cross-rank balancing (``pack``, ``plan_step``).
- ``opensloth.cache.simple_cache_dataset_wrapper`` -- tokenize once for all ranks.
- ``opensloth.data`` -- chat and preference data (one pipeline for every preference format).
- ``opensloth.dpo`` -- the dynamic-beta DPO controller, settings and trainer glue.
- ``opensloth.config`` -- settings dataclasses -> flags and YAML.

The original OpenSloth's names work too (``docs/compat.md``): ``from opensloth
import simple_cache_dataset_wrapper, cache_dataset_wrapper, CacheConfig,
OPENSLOTH_DATA_DIR`` (the first three are loaded on first use, so this import
stays cheap), ``opensloth.patching.ddp_patch``, ``opensloth.utils.packing``,
``opensloth.utils.dataset_cache``, ...
"""

import importlib
from pathlib import Path

__version__ = "0.3.0"

# The original OpenSloth's data folder constant; nothing creates or reads it.
OPENSLOTH_DATA_DIR = Path("~/.cache/opensloth").expanduser().resolve()

_LAZY = {
    "CacheConfig": "opensloth.cache",
    "cache_dataset_wrapper": "opensloth.cache",
    "simple_cache_dataset_wrapper": "opensloth.cache",
}

__all__ = ["OPENSLOTH_DATA_DIR", "CacheConfig", "__version__", "cache_dataset_wrapper",
           "simple_cache_dataset_wrapper"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'opensloth' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
