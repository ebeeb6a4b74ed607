"""Held-out accuracy: greedy answers to checkable prompts, sharded over the ranks and gathered."""

from __future__ import annotations

from opensloth.errors import UserInputError


def heldout_accuracy(model, tokenizer, prompts: list[dict], *, kind: str | None, max_new_tokens: int,
                     batch_size: int, env, backend: str = "hf") -> dict:
    """Fraction of ``prompts`` whose greedy answer the verifier accepts.

    Args:
        kind: the task kind, or ``None`` to detect it per prompt.
        prompts: ``[{"index", "id", "prompt"}]``; every rank passes the same list.

    Returns:
        ``{"n", "correct", "accuracy", "examples"}`` (identical on every rank);
        ``examples`` holds the first three prompts with their answers.
    """
    from opensloth.rollout.generate import generate_candidates
    from opensloth.rollout.judges import VerifierJudge, judge_traces
    from opensloth.rollout.run import gather_checked
    from opensloth.rollout.seeding import merge_shards, shard_indices
    from opensloth.rollout.settings import RolloutSettings

    greedy = RolloutSettings(samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    mine = [prompts[i] for i in shard_indices(len(prompts), env.rank, env.world_size)]
    judged, error = [], None
    try:
        records = generate_candidates(model, tokenizer, mine, greedy, iteration=0, backend=backend)
        judged, _ = judge_traces(records, VerifierJudge(kind))
    except UserInputError as exc:
        error = f"rank {env.rank}: held-out evaluation: {exc}"
    merged = merge_shards(gather_checked(judged, error))
    correct = sum(rec["candidates"][0]["score"] for rec in merged if rec["candidates"])
    return {
        "n": len(merged),
        "correct": int(correct),
        "accuracy": correct / len(merged) if merged else None,
        "examples": [{"prompt": rec["prompt"], "answer": rec["candidates"][0]["text"] if rec["candidates"] else None}
                     for rec in merged[:3]],
    }
