"""Dynamic-beta DPO for LoRA models on any number of ranks.

``import opensloth.dpo`` is cheap: nothing here imports torch or TRL at
import time; the trainer patch (which needs transformers) is imported on first
attribute access.

- :mod:`opensloth.dpo.controller` -- the math (warmup quantile, EMA of tau,
  risk test, beta update) and :class:`DynamicBetaController`; pure, standard library only.
- :mod:`opensloth.dpo.run` -- :class:`DPORunSettings` (flags + YAML), the
  ``DPOConfig`` and the trainer construction of ``train_scripts/train_dpo.py``.
- :mod:`opensloth.dpo.collator` -- pairs fitted to the token budget (prompt cut from the left).
- :mod:`opensloth.dpo.lora_reference` -- the LoRA reference: the policy with its adapter disabled.
- :mod:`opensloth.patches.dpo_dynamic_beta` -- :func:`patch_dpo_trainer_dynamic_beta` and
  :func:`attach_dynamic_beta` for the DPOTrainer class in use.
"""

from __future__ import annotations

from opensloth.dpo.controller import (
    RISK_RULES,
    DynamicBetaConfig,
    DynamicBetaController,
    EMAUpdate,
    WarmupQuantileAccumulator,
    empirical_over_threshold_proportion,
    quantile,
    risk_test,
    update_beta,
)

from opensloth.dpo.collator import LeftTruncatingPreferenceCollator, count_prompt_truncations
from opensloth.dpo.lora_reference import parameter_report, use_base_model_as_reference

# Names of the trainer patch; it imports transformers, so it is imported on first use.
_PATCH_NAMES = ("patch_dpo_trainer_dynamic_beta", "attach_dynamic_beta", "DynamicBetaRuntime")

__all__ = [
    "RISK_RULES",
    "DynamicBetaConfig",
    "DynamicBetaController",
    "EMAUpdate",
    "LeftTruncatingPreferenceCollator",
    "WarmupQuantileAccumulator",
    "count_prompt_truncations",
    "empirical_over_threshold_proportion",
    "parameter_report",
    "quantile",
    "risk_test",
    "update_beta",
    "use_base_model_as_reference",
    *_PATCH_NAMES,
]


def __getattr__(name: str):
    if name in _PATCH_NAMES:
        from opensloth.patches import dpo_dynamic_beta

        return getattr(dpo_dynamic_beta, name)
    raise AttributeError(f"module 'opensloth.dpo' has no attribute {name!r}")
