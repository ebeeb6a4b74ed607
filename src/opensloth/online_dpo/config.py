"""Settings of the OaK-DPO loop: one YAML for DPO and rollouts, CLI flags on top.

YAML layout (every key optional; unknown keys are an error)::

    # DPO round: keys of opensloth.dpo.run.DPORunSettings
    beta_mode: dynamic
    learning_rate: 5.0e-4
    num_epochs: 1
    dynamic_beta:            # opensloth.dpo.controller.DynamicBetaConfig
      warmup_steps: 4
    rollout:                 # opensloth.rollout.settings.RolloutSettings
      samples: 4
      temperature: 1.0
      max_new_tokens: 16
    lora:                    # opensloth.launch.LoraSettings of the DPO adapter
      r: 8
      target_modules: [q_proj, k_proj, v_proj, o_proj]
    oak:
      nll_weight: 1.0        # DPO + 1.0 x NLL of the chosen reply (fixed beta only); 0: plain DPO

Flags override the YAML (:mod:`opensloth.config`): ``--dpo.<key>``,
``--dynamic_beta.<key>``, ``--rollout.<key>``, ``--lora.<key>``, ``--oak.<key>``,
plus the shortcuts ``--samples``, ``--backend``, ``--beta_mode`` and
``--nll_weight``. Each iteration then trains with its own copy of the DPO
settings (``dataclasses.replace``); the base settings are never mutated.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from opensloth.config import Section, build, section_values, setting
from opensloth.dpo.controller import DynamicBetaConfig
from opensloth.dpo.run import DYNAMIC_SECTION, DPORunSettings
from opensloth.errors import UserInputError
from opensloth.launch import LoraSettings
from opensloth.rollout.settings import ROLLOUT_SECTION, RolloutSettings

DPO_PREFIX = "dpo."
LORA_SECTION = "lora"
OAK_SECTION = "oak"
# DPORunSettings fields the loop sets itself for every iteration.
LOOP_OWNED = ("model_name", "dataset", "train_split", "test_split", "train_samples", "test_samples", "output_dir",
              "experiment_name", "resume_from_checkpoint", "save_steps", "margins_log_dir", "eval_steps")


@dataclass(frozen=True)
class OakSettings:
    """The ``oak:`` section: settings of the loop itself."""

    nll_weight: float = setting(0.0, "add this weight x NLL of the chosen reply to the DPO loss (fixed beta only; "
                                     "0: plain DPO)")

    def __post_init__(self):
        if not self.nll_weight >= 0:
            raise UserInputError(f"nll_weight={self.nll_weight!r} must be a number >= 0")


# DPO keys at the top level (flags --dpo.<key>), then the sections; --backend, --beta_mode, --samples and
# --nll_weight are shortcuts for --dpo.backend, --dpo.beta_mode, --rollout.samples and --oak.nll_weight.
SECTIONS = (
    Section(None, DPORunSettings, flag_prefix=DPO_PREFIX,
            aliases={"backend": ["--backend"], "beta_mode": ["--beta_mode", "--beta-mode"]}),
    Section(DYNAMIC_SECTION, DynamicBetaConfig),
    Section(ROLLOUT_SECTION, RolloutSettings, aliases={"samples": ["--samples"]}),
    Section(LORA_SECTION, LoraSettings),
    Section(OAK_SECTION, OakSettings, aliases={"nll_weight": ["--nll_weight", "--nll-weight"]}),
)


@dataclass(frozen=True)
class OakConfig:
    dpo: DPORunSettings
    dynamic: DynamicBetaConfig
    rollout: RolloutSettings
    lora: LoraSettings = LoraSettings()
    nll_weight: float = 0.0

    def as_dict(self) -> dict:
        return {"dpo": dataclasses.asdict(self.dpo), DYNAMIC_SECTION: dataclasses.asdict(self.dynamic),
                ROLLOUT_SECTION: dataclasses.asdict(self.rollout), LORA_SECTION: dataclasses.asdict(self.lora),
                OAK_SECTION: {"nll_weight": self.nll_weight}}


def resolve_oak_config(config_path: str | None, given) -> OakConfig:
    """Defaults < YAML (``config_path``) < the flags in ``given`` (the parsed arguments or their ``vars``).

    Raises:
        UserInputError: unknown keys (listing the known ones), loop-owned keys, or invalid values.
    """
    where = config_path or "the command line"
    dpo_values, dynamic_values, rollout_values, lora_values, oak_values = section_values(config_path, given, SECTIONS)
    owned = sorted(set(dpo_values) & set(LOOP_OWNED))
    if owned:
        raise UserInputError(f"{owned} are set by the OaK loop for every iteration (model, pairs, output "
                             f"folders); remove them from {where}")
    dpo = build(DPORunSettings, dpo_values, where)
    dynamic = build(DynamicBetaConfig, dynamic_values, f"'{DYNAMIC_SECTION}:' of {where}")
    rollout = build(RolloutSettings, rollout_values, f"'{ROLLOUT_SECTION}:' of {where}")
    lora = build(LoraSettings, lora_values, f"'{LORA_SECTION}:' of {where}")
    oak = build(OakSettings, oak_values, f"'{OAK_SECTION}:' of {where}")
    if oak.nll_weight and dpo.beta_mode == "dynamic":
        raise UserInputError(
            f"nll_weight={oak.nll_weight} needs beta_mode fixed: the dynamic-beta controller supports the plain "
            "sigmoid DPO loss only; set beta_mode: fixed or nll_weight: 0"
        )
    return OakConfig(dpo=dpo, dynamic=dynamic, rollout=rollout, lora=lora, nll_weight=oak.nll_weight)


def iteration_settings(base: DPORunSettings, *, iteration: int, reference_path: str, pairs_path: str,
                       output: str) -> DPORunSettings:
    """A fresh copy of the base DPO settings for one iteration (the base is frozen and never changed)."""
    return dataclasses.replace(
        base, model_name=reference_path, dataset=pairs_path, output_dir=os.path.join(output, "dpo"),
        experiment_name=f"iter_{iteration}", save_steps=0, resume_from_checkpoint=None, test_samples=0,
        train_samples=None,
    )


def prompt_window(pool: list[dict], iteration: int, per_iteration: int | None) -> list[dict]:
    """The prompts of iteration k: the whole pool, or a window of ``per_iteration`` that moves on each iteration.

    >>> pool = [{"index": i} for i in range(5)]
    >>> [p["index"] for p in prompt_window(pool, 2, 3)]
    [3, 4, 0]
    """
    if not per_iteration or per_iteration >= len(pool):
        return list(pool)
    start = ((iteration - 1) * per_iteration) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(per_iteration)]
