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

DPO_PREFIX = "dpo."
# DPORunSettings fields the loop sets itself for every iteration.
LOOP_OWNED = ("model_name", "dataset", "train_split", "test_split", "train_samples", "test_samples", "output_dir",
              "experiment_name", "resume_from_checkpoint", "save_steps", "margins_log_dir", "eval_steps")


@dataclass(frozen=True)
class OakConfig:
    dpo: DPORunSettings
    dynamic: DynamicBetaConfig
    rollout: RolloutSettings

    def as_dict(self) -> dict:
        return {"dpo": dataclasses.asdict(self.dpo), DYNAMIC_SECTION: dataclasses.asdict(self.dynamic),
                ROLLOUT_SECTION: dataclasses.asdict(self.rollout)}


def resolve_oak_config(config_path: str | None, given: dict) -> OakConfig:
    """YAML (``config_path``) overlaid with the flags in ``given`` (argparse dests that were passed).

    Raises:
        UserInputError: unknown keys (listing the known ones), loop-owned keys, or invalid values.
    """
    values = dict(load_yaml(config_path)) if config_path else {}
    rollout_values = values.pop(ROLLOUT_SECTION, None) or {}
    dynamic_values = values.pop(DYNAMIC_SECTION, None) or {}
    run_keys = {f.name for f in fields(DPORunSettings)}
    unknown = sorted(set(values) - run_keys)
    where = f"--config {config_path}" if config_path else "flags"
    if unknown:
        raise UserInputError(f"unknown keys {unknown} in {where}; known: {sorted(run_keys)} and the "
                             f"'{DYNAMIC_SECTION}:' and '{ROLLOUT_SECTION}:' sections")
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
    return OakConfig(dpo=dpo, dynamic=dynamic, rollout=rollout)


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
