"""Every monkey patch opensloth applies to transformers / TRL / accelerate, and the registry listing them.

Each patch states the versions it was written for, checks its target,
is idempotent, records itself (``applied_patches()``) and has a CPU test; see
:mod:`opensloth.patches.registry` for the rules. Import the patch modules
explicitly; this package imports nothing heavy.

- :mod:`~opensloth.patches.ddp` -- ``ddp_patch()``: device, process group, loss scaling, CPU DDP.
- :mod:`~opensloth.patches.trl_cpu_logprobs` -- TRL's fused log-probs on CPU.
- :mod:`~opensloth.patches.resume_map_location` -- resume on ``cpu:<N>`` ranks (optimizer state to ``cpu``).
- :mod:`~opensloth.patches.batch_samples` -- cross-rank balanced packing of every SFT step.
- :mod:`~opensloth.patches.prepare_alone` -- accelerate's main-process-first, scoped to the cache builder.
- :mod:`~opensloth.patches.dpo_dynamic_beta` -- dynamic beta inside TRL's DPOTrainer.
- :mod:`~opensloth.patches.deterministic_sampler` -- sequential samplers, no shuffling (a debugging aid).
"""

from opensloth.patches.registry import PatchRecord, PatchTargetError, applied_patches

__all__ = ["PatchRecord", "PatchTargetError", "applied_patches"]
