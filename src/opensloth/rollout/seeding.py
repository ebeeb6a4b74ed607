"""Which rank generates which prompt, and with which seed. Pure functions, no torch.

A candidate's seed depends only on ``(global seed, iteration, prompt index,
sample index)``, never on the rank or the world size, and each candidate is
sampled with its own generator (:mod:`opensloth.rollout.sampling`). So 1 rank
and N ranks produce the same candidates for the same prompts; only the
floating-point noise of different batch paddings can differ.
"""

from __future__ import annotations

import hashlib


def derive_seed(global_seed: int, iteration: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one candidate, stable across machines and Python versions.

    >>> derive_seed(1234, 1, 0, 0) == derive_seed(1234, 1, 0, 0)
    True
    >>> derive_seed(1234, 1, 0, 0) != derive_seed(1234, 1, 0, 1)
    True
    """
    key = f"opensloth-rollout:{global_seed}:{iteration}:{prompt_index}:{sample_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def shard_indices(n_items: int, rank: int, world_size: int) -> list[int]:
    """The items rank ``rank`` handles: a stride over ``range(n_items)``.

    Every index belongs to exactly one rank; ranks differ in load by at most one item.

    >>> shard_indices(5, 0, 2), shard_indices(5, 1, 2)
    ([0, 2, 4], [1, 3])
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return list(range(rank, n_items, world_size))


def merge_shards(shards: list[list[dict]], key: str = "index") -> list[dict]:
    """Concatenate the per-rank lists and order them by ``key``; duplicates are an error.

    Raises:
        ValueError: two ranks returned the same index (the sharding is broken).
    """
    merged = sorted((item for shard in shards for item in shard), key=lambda item: item[key])
    seen = [item[key] for item in merged]
    if len(seen) != len(set(seen)):
        raise ValueError(f"ranks returned overlapping items (duplicate {key} values); the shards must be disjoint")
    return merged
