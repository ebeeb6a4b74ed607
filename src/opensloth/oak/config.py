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
    lora:                    # opensloth.training.LoraSettings of the DPO adapter
      r: 8
      target_modules: [q_proj, k_proj, v_proj, o_proj]
    oak:
      nll_weight: 1.0        # DPO + 1.0 x NLL of the chosen reply (fixed beta only); 0: plain DPO

Flags override the YAML: ``--dpo.<key>``, ``--dynamic_beta.<key>``,
``--rollout.<key>``, plus the shortcuts ``--samples``, ``--backend`` and
``--beta_mode``. Each iteration then trains with its own copy of the DPO
settings (``dataclasses.replace``); the base settings are never mutated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from opensloth.dpo.controller import DynamicBetaConfig
from opensloth.dpo.run import DYNAMIC_SECTION, DPORunSettings, load_yaml
from opensloth.errors import UserInputError
from opensloth.rollout.settings import ROLLOUT_SECTION, RolloutSettings
from opensloth.training import LoraSettings

DPO_PREFIX = "dpo."
LORA_SECTION = "lora"
OAK_SECTION = "oak"
OAK_KEYS = ("nll_weight",)
# DPORunSettings fields the loop sets itself for every iteration.
LOOP_OWNED = ("model_name", "dataset", "train_split", "test_split", "train_samples", "test_samples", "output_dir",
              "experiment_name", "resume_from_checkpoint", "save_steps", "margins_log_dir", "eval_steps")


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


def lora_settings(values: dict, where: str) -> LoraSettings:
    """:class:`opensloth.training.LoraSettings` from the ``lora:`` section (unknown keys are an error)."""
    if not isinstance(values, dict):
        raise UserInputError(f"'{LORA_SECTION}:' of {where} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(LoraSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"unknown keys {unknown} in '{LORA_SECTION}:' of {where}; known: {sorted(known)}")
    if "target_modules" in values:
        targets = values["target_modules"]
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets or []) or not targets:
            raise UserInputError(f"'{LORA_SECTION}.target_modules' of {where} must be a non-empty list of names")
        values = {**values, "target_modules": tuple(targets)}
    for key in ("r", "alpha"):
        if key in values and (not isinstance(values[key], int) or values[key] < 1):
            raise UserInputError(f"'{LORA_SECTION}.{key}' of {where} must be an integer >= 1, got {values[key]!r}")
    return LoraSettings(**values)


def resolve_oak_config(config_path: str | None, given: dict) -> OakConfig:
    """YAML (``config_path``) overlaid with the flags in ``given`` (argparse dests that were passed).

    Raises:
        UserInputError: unknown keys (listing the known ones), loop-owned keys, or invalid values.
    """
    values = dict(load_yaml(config_path)) if config_path else {}
    rollout_values = values.pop(ROLLOUT_SECTION, None) or {}
    lora_values = values.pop(LORA_SECTION, None) or {}
    oak_values = values.pop(OAK_SECTION, None) or {}
    dynamic_values = values.pop(DYNAMIC_SECTION, None) or {}
    run_keys = {f.name for f in fields(DPORunSettings)}
    unknown = sorted(set(values) - run_keys)
    where = f"--config {config_path}" if config_path else "flags"
    if unknown:
        raise UserInputError(f"unknown keys {unknown} in {where}; known: {sorted(run_keys)} and the "
                             f"'{DYNAMIC_SECTION}:', '{ROLLOUT_SECTION}:', '{LORA_SECTION}:' and '{OAK_SECTION}:' sections")
    dpo_prefix = DPO_PREFIX.replace(".", "__")
    values.update({k[len(dpo_prefix):]: v for k, v in given.items() if k.startswith(dpo_prefix)})
    for shortcut in ("backend", "beta_mode"):
        if given.get(shortcut) is not None:
            values[shortcut] = given[shortcut]
    owned = sorted(set(values) & set(LOOP_OWNED))
    if owned:
        raise UserInputError(f"{owned} are set by the OaK loop for every iteration (model, pairs, output "
                             f"folders); remove them from {where}")
    dyn_prefix = DYNAMIC_SECTION + "__"
    dynamic_values = {**dynamic_values, **{k[len(dyn_prefix):]: v for k, v in given.items()
                                           if k.startswith(dyn_prefix)}}
    roll_prefix = ROLLOUT_SECTION + "__"
    rollout_values = {**rollout_values, **{k[len(roll_prefix):]: v for k, v in given.items()
                                           if k.startswith(roll_prefix)}}
    if given.get("samples") is not None:
        rollout_values["samples"] = given["samples"]
    try:
        dynamic = DynamicBetaConfig.from_dict(dynamic_values)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{DYNAMIC_SECTION} settings in {where}: {exc}") from exc
    try:
        dpo = DPORunSettings(**values)
    except TypeError as exc:
        raise UserInputError(f"DPO settings in {where}: {exc}") from exc
    rollout = RolloutSettings.from_mapping(rollout_values, where=f"'{ROLLOUT_SECTION}:' of {where}")
    lora_prefix = LORA_SECTION + "__"
    lora_values = {**lora_values, **{k[len(lora_prefix):]: v for k, v in given.items() if k.startswith(lora_prefix)}}
    nll_weight = oak_nll_weight(oak_values, given.get("nll_weight"), dpo, where)
    return OakConfig(dpo=dpo, dynamic=dynamic, rollout=rollout, lora=lora_settings(lora_values, where),
                     nll_weight=nll_weight)


def oak_nll_weight(section: dict, flag, dpo: DPORunSettings, where: str) -> float:
    """The ``oak.nll_weight`` (flag ``--nll_weight`` wins); checked against the beta mode."""
    if not isinstance(section, dict):
        raise UserInputError(f"'{OAK_SECTION}:' of {where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(OAK_KEYS))
    if unknown:
        raise UserInputError(f"unknown keys {unknown} in '{OAK_SECTION}:' of {where}; known: {list(OAK_KEYS)}")
    value = flag if flag is not None else section.get("nll_weight", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserInputError(f"nll_weight={value!r} must be a number >= 0")
    if value and dpo.beta_mode == "dynamic":
        raise UserInputError(
            f"nll_weight={value} needs beta_mode fixed: the dynamic-beta controller supports the plain sigmoid "
            "DPO loss only; set beta_mode: fixed or nll_weight: 0"
        )
    return float(value)


def iteration_settings(base: DPORunSettings, *, iteration: int, reference_path: str, pairs_path: str,
                       output: str) -> DPORunSettings:
    """A fresh copy of the base DPO settings for one iteration (the base is frozen and never changed)."""
    import os

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
