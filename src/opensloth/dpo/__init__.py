"""Dynamic-beta DPO for LoRA models on any number of ranks.

``import opensloth.dpo`` is cheap: the controller is standard-library only and
the trainer glue (which needs TRL) is imported on first attribute access.

- :mod:`opensloth.dpo.controller` -- the math (warmup quantile, EMA of tau,
  risk test, beta update) and :class:`DynamicBetaController`.
- :mod:`opensloth.dpo.trainer` -- :func:`patch_dpo_trainer_dynamic_beta` and
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

_LAZY = {
    "patch_dpo_trainer_dynamic_beta": "opensloth.dpo.trainer",
    "attach_dynamic_beta": "opensloth.dpo.trainer",
    "use_base_model_as_reference": "opensloth.dpo.reference",
    "parameter_report": "opensloth.dpo.reference",
    "DynamicBetaRuntime": "opensloth.dpo.trainer",
    "LeftTruncatingPreferenceCollator": "opensloth.dpo.data",
    "count_prompt_truncations": "opensloth.dpo.data",
}

__all__ = [
    "RISK_RULES",
    "DynamicBetaConfig",
    "DynamicBetaController",
    "EMAUpdate",
    "WarmupQuantileAccumulator",
    "empirical_over_threshold_proportion",
    "quantile",
    "risk_test",
    "update_beta",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opensloth.dpo' has no attribute {name!r}")
