"""Packing, partitioning and cross-rank step planning: pure functions, no trainer.

Three layers, each usable on its own:

1. :mod:`~opensloth.packing.partition` -- bin packing and partitioning over
   lengths (plain Python): :func:`best_fit_decreasing`,
   :func:`min_padding_partition` (the OpenSloth DP), :func:`balanced_rows`.
2. :mod:`~opensloth.packing.planner` -- step planning (plain Python):
   :func:`plan_step` spreads one optimizer step's samples over ranks and
   micro-batches so that the slowest rank does as little work as possible;
   :func:`plan_pairs` does the same with an equal pair count everywhere (DPO).
3. :mod:`~opensloth.packing.materialize` -- packed micro-batches (torch,
   imported inside the functions): :func:`pack` (best-fit rows with a 4D
   block-causal mask, or one padding-free row with flash-attention varlen
   fields) and :func:`build_micro_batch`.

``import opensloth.packing`` does not import torch.
"""

from opensloth.packing.materialize import (IGNORE_INDEX, OVERFLOW_POLICIES, Segment, apply_overflow,
                                           build_micro_batch, pack, sequences_from_batch)
from opensloth.packing.partition import (balanced_rows, best_fit_decreasing, min_padding_partition, padded_cost,
                                         sequence_cost)
from opensloth.packing.planner import LAYOUTS, StepPlan, attention_coef_for, drawn_layout, plan_pairs, plan_step

__all__ = [
    "IGNORE_INDEX",
    "LAYOUTS",
    "OVERFLOW_POLICIES",
    "Segment",
    "StepPlan",
    "apply_overflow",
    "attention_coef_for",
    "balanced_rows",
    "best_fit_decreasing",
    "build_micro_batch",
    "drawn_layout",
    "min_padding_partition",
    "pack",
    "padded_cost",
    "plan_pairs",
    "plan_step",
    "sequence_cost",
    "sequences_from_batch",
]
