"""Rollouts: k sampled candidates per prompt on 1 or N ranks, judged, written as JSONL.

``train_scripts/rollout.py`` (or ``python -m opensloth.rollout``) is the command line.
``import opensloth.rollout`` is cheap: torch and transformers are imported by
the functions that generate or score.

Pieces, from pure to glue:

- :mod:`opensloth.rollout.settings` -- :class:`RolloutSettings` (sampling
  knobs; the ``rollout:`` section of a YAML config).
- :mod:`opensloth.rollout.seeding` -- per-candidate seeds derived from the
  global seed, the iteration and the prompt index, and the strided shard of
  each rank. Both are independent of the world size.
- :mod:`opensloth.rollout.traces` -- prompt loading, the prefix strip of a
  trace (prefix check + slice, exactly once), records, manifest, atomic writes.
- :mod:`opensloth.rollout.sampling` -- a logits processor that samples every
  row with its own ``torch.Generator``, so a candidate does not depend on what
  else is in its batch.
- :mod:`opensloth.rollout.generate` -- chat rendering and batched generation.
- :mod:`opensloth.rollout.policy` -- load the policy: a model or LoRA adapter
  folder, built like the trainers build it.
- :mod:`opensloth.rollout.judges` -- the verifier judge (synthetic tasks), the
  reward-model judge (any sequence-classification model), custom callables,
  and the conversion of traces into the judged JSONL of
  :mod:`opensloth.data.judged`.
- :mod:`opensloth.rollout.run` -- shard, generate, judge, gather and write one
  iteration.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RolloutSettings": "opensloth.rollout.settings",
    "derive_seed": "opensloth.rollout.seeding",
    "shard_indices": "opensloth.rollout.seeding",
    "strip_prompt_prefix": "opensloth.rollout.traces",
    "load_prompts": "opensloth.rollout.traces",
    "generate_candidates": "opensloth.rollout.generate",
    "VerifierJudge": "opensloth.rollout.judges",
    "RewardModelJudge": "opensloth.rollout.judges",
    "make_judge": "opensloth.rollout.judges",
    "judge_traces": "opensloth.rollout.judges",
    "run_rollout": "opensloth.rollout.run",
    "load_policy": "opensloth.rollout.policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'opensloth.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
