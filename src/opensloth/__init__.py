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

The old paths (``opensloth.patching.ddp_patch``, ``opensloth.utils.packing``,
``opensloth.utils.simple_cache_dataset_wrapper``, ...) still work.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
