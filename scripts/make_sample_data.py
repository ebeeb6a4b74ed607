"""Write the embedded default data: chat SFT and preference JSONL files under ``data/``.

    python scripts/make_sample_data.py            # after scripts/build_tiny_model.py

Files (one JSON object per line, keys sorted, ASCII only):

- ``data/sft/{train,test}.jsonl``: ``{"messages": [{"role", "content"}, ...],
  "source": <task kind>}``, the format of trl-lib/Capybara; some records carry
  a system message, some are multi-turn. Most records mix the pretraining
  kinds; a share (``--sft-negate-share``, 30%) are ``negate`` conversations, a
  kind the embedded base was never trained on, so that the default SFT run
  teaches something a user can check (data/README.md). The two streams have
  their own seeds and are shuffled together with a fixed seed.
- ``data/preference/{train,test}.jsonl``: ``{"prompt", "chosen", "rejected"}``
  strings; ``chosen`` is the correct worked answer, ``rejected`` the same shape
  with one slip and a wrong final answer.

All text comes from ``opensloth.tasks`` with fixed seeds, so reruns
write byte-identical files. Test records with any user prompt that also
occurs in the train split are skipped, and so are records whose first prompt
repeats one of the same split (tiny prompts such as "What is 3 + 4?" recur). Generation does not need the model; the length
summary printed at the end counts tokens with the tokenizer of
``data/tiny-qwen3`` (built by ``scripts/build_tiny_model.py``) and is skipped
with a note when that folder is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

SFT_SEEDS = {"train": 1001, "test": 1002}
NEGATE_SEEDS = {"train": 1003, "test": 1004}
SHUFFLE_SEEDS = {"train": 1005, "test": 1006}
PREFERENCE_SEEDS = {"train": 2001, "test": 2002}


def make_negate_conversation(rng: random.Random) -> dict:
    """A chat record whose every turn is a ``negate`` task."""
    from opensloth.tasks import make_conversation

    return make_conversation(rng, kind="negate")


def record_streams() -> list[tuple]:
    """``(make, seeds)`` of every shipped stream, so that other scripts can regenerate their prompts."""
    from opensloth.tasks import make_conversation, make_preference_pair

    return [(make_conversation, SFT_SEEDS), (make_negate_conversation, NEGATE_SEEDS),
            (make_preference_pair, PREFERENCE_SEEDS)]


def user_prompts(record: dict) -> list[str]:
    """The user messages of a record (the ``prompt`` of a preference pair)."""
    if "prompt" in record:
        return [record["prompt"]]
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def generate_split(make, seed: int, n: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` records from ``make(rng)`` seeded with ``seed``.

    Skips a record whose first prompt repeats an earlier record's, or any of
    whose prompts is in ``exclude`` (the train prompts, for a test split).
    """
    rng = random.Random(seed)
    records, seen, exclude = [], set(), exclude or set()
    while len(records) < n:
        record = make(rng)
        prompts = user_prompts(record)
        if prompts[0] in seen or any(p in exclude for p in prompts):
            continue
        seen.add(prompts[0])
        records.append(record)
    return records


def mixed_split(split: str, n: int, negate_share: float, exclude: set[str] | None = None) -> list[dict]:
    """``n`` SFT records: ``round(n * negate_share)`` negate conversations, the rest mixed, shuffled together.

    Each stream is a prefix of its seed's stream, so a smaller ``n`` or share
    keeps the same records.
    """
    from opensloth.tasks import make_conversation

    n_negate = round(n * negate_share)
    records = generate_split(make_conversation, SFT_SEEDS[split], n - n_negate, exclude)
    records += generate_split(make_negate_conversation, NEGATE_SEEDS[split], n_negate, exclude)
    random.Random(SHUFFLE_SEEDS[split]).shuffle(records)
    return records


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write ``records`` one per line, deterministically (sorted keys, ``\\n`` endings)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n")


def _quantiles(values: list[int]) -> dict:
    v = sorted(values)
    pick = lambda q: v[min(int(q * len(v)), len(v) - 1)]  # noqa: E731
    return {"n": len(v), "min": v[0], "median": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": v[-1]}


def token_lengths(tokenizer, sft: list[dict], preference: list[dict]) -> tuple[list[int], list[int]]:
    """Token counts: chat-templated SFT conversations, and preference ``prompt + chosen``
    rendered as one user/assistant exchange."""
    sft_text = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in sft]
    pref_text = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}], tokenize=False
        )
        for r in preference
    ]
    encode = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    return encode(sft_text), encode(pref_text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="data folder")
    parser.add_argument("--sft-train", type=int, default=2000, help="SFT train records")
    parser.add_argument("--sft-test", type=int, default=200, help="SFT test records")
    parser.add_argument("--sft-negate-share", type=float, default=0.3,
                        help="share of SFT records (train and test) that are negate conversations")
    parser.add_argument("--pref-train", type=int, default=1000, help="preference train records")
    parser.add_argument("--pref-test", type=int, default=100, help="preference test records")
    parser.add_argument("--tokenizer", default="data/tiny-qwen3", help="tokenizer for the length summary")
    args = parser.parse_args()

    from opensloth.tasks import make_preference_pair

    sft_train = mixed_split("train", args.sft_train, args.sft_negate_share)
    sft_test = mixed_split("test", args.sft_test, args.sft_negate_share,
                           exclude={p for r in sft_train for p in user_prompts(r)})
    pref_train = generate_split(make_preference_pair, PREFERENCE_SEEDS["train"], args.pref_train)
    pref_test = generate_split(make_preference_pair, PREFERENCE_SEEDS["test"], args.pref_test,
                               exclude={r["prompt"] for r in pref_train})

    outputs = {
        "sft/train.jsonl": sft_train,
        "sft/test.jsonl": sft_test,
        "preference/train.jsonl": pref_train,
        "preference/test.jsonl": pref_test,
    }
    for rel, records in outputs.items():
        path = os.path.join(args.out, rel)
        write_jsonl(path, records)
        print(f"wrote {path}: {len(records)} records, {os.path.getsize(path) / 1e6:.2f} MB")

    if not os.path.isdir(args.tokenizer):
        print(f"no tokenizer at {args.tokenizer}; run scripts/build_tiny_model.py for a token length summary")
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sft_lengths, pref_lengths = token_lengths(tokenizer, sft_train + sft_test, pref_train + pref_test)
    print("token lengths (chat template applied):")
    print(f"  sft        {_quantiles(sft_lengths)}")
    print(f"  preference {_quantiles(pref_lengths)}  (prompt + chosen)")


if __name__ == "__main__":
    sys.exit(main())
