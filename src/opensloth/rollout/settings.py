"""Sampling settings of a rollout: one frozen dataclass, the ``rollout:`` section of a YAML config.

The same YAML file drives ``train_scripts/run_oak_dpo.py``: DPO keys at the
top level and under ``dynamic_beta:`` (see :mod:`opensloth.dpo.run`), rollout
keys under ``rollout:``. ``train_scripts/rollout.py`` reads only the
``rollout:`` section (see :data:`SECTIONS`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from opensloth.config import Section, setting
from opensloth.errors import UserInputError

ROLLOUT_SECTION = "rollout"


@dataclass(frozen=True)
class RolloutSettings:
    """How candidates are sampled."""

    samples: int = setting(4, "candidates generated per prompt (k)")
    temperature: float = setting(1.0, "sampling temperature; 0 means greedy decoding (then samples must be 1)")
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability (1: off)")
    top_k: int = setting(0, "keep only the k most likely tokens (0: off)")
    max_new_tokens: int = setting(64, "tokens generated per candidate at most")
    batch_size: int = setting(32, "sequences (prompt x sample) per generate call on each rank")
    seed: int = setting(1234, "global seed; each candidate's seed is derived from it, the iteration and the prompt index")

    def __post_init__(self):
        if self.samples < 1:
            raise UserInputError(f"rollout samples={self.samples} must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserInputError(f"rollout temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.temperature == 0 and self.samples > 1:
            raise UserInputError(
                f"rollout temperature=0 (greedy) gives {self.samples} identical candidates; "
                "set temperature > 0 or samples=1"
            )
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"rollout top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise UserInputError(f"rollout top_k={self.top_k} must be >= 0 (0: off)")
        if self.max_new_tokens < 1:
            raise UserInputError(f"rollout max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            raise UserInputError(f"rollout batch_size={self.batch_size} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "RolloutSettings":
        return dataclasses.replace(self, **changes)


# ``rollout:`` of a YAML file; its flags have no prefix (--samples, --temperature, ...).
SECTIONS = (Section(ROLLOUT_SECTION, RolloutSettings, flag_prefix=""),)
