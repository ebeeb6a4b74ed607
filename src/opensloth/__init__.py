"""opensloth: scale Unsloth/TRL LoRA fine-tuning across ranks with plain torchrun DDP.

Importing this package is cheap: it imports neither torch, Unsloth nor TRL.
Heavy libraries are imported inside the functions that need them.

Public entry points (each imported lazily on first attribute access):

- ``opensloth.patching.ddp_patch.ddp_patch`` -- pin the rank's device, set the
  process-group backend and fix the trainer's cross-rank loss scaling.
- ``opensloth.patching.applied_patches`` -- list what opensloth has patched.
- ``opensloth.utils.packing`` -- best-fit packing and cross-rank balancing.
- ``opensloth.utils.simple_cache_dataset_wrapper`` -- tokenize once for all ranks.
- ``opensloth.dpo`` -- the dynamic-beta DPO controller and trainer patch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
