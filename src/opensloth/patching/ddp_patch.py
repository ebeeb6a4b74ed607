"""The original OpenSloth's patch module; the patches live in :mod:`opensloth.patches` now."""

from opensloth.patches.batch_samples import patch_optimize_sft_trainer_batch_samples
from opensloth.patches.ddp import *  # noqa: F401,F403
from opensloth.patches.ddp import __all__ as _ddp_all
from opensloth.patches.deterministic_sampler import patch_trainer_deterministic_sampler

__all__ = [*_ddp_all, "patch_optimize_sft_trainer_batch_samples", "patch_trainer_deterministic_sampler"]
