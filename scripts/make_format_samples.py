"""Write the small, deterministic sample files under data/formats/.

    python scripts/make_format_samples.py            # rewrites data/formats/*.jsonl
    python scripts/make_format_samples.py --check    # exit 1 if the files are stale

Files (the same seed gives the same bytes on every machine):

- ``hh_sample.jsonl``: Anthropic HH records (``chosen``/``rejected`` full
  transcripts) built from synthetic tasks, 1-3 turns each, plus the cases the
  HH parser must handle: a reply that quotes the whole prompt, identical
  replies, a blank reply and a record with no Assistant turn.
- ``judged_rollouts.jsonl``: judged rollout records (schema in
  ``opensloth.data.judged``): several candidates per prompt scored by the
  synthetic verifier, including ties and single-candidate prompts.

Tests read these files and assert the expected counts listed in
``data/formats/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

from opensloth import tasks

SEED = 20261122
OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "formats")
N_HH = 40
N_JUDGED = 40


def _small_task(rng: random.Random) -> tasks.Task:
    return tasks.make_task(rng, size=rng.randint(30, 120))


def hh_records(rng: random.Random) -> list[dict]:
    records = []
    for _ in range(N_HH):
        transcript = ""
        for _ in range(rng.choice((0, 0, 1, 2))):  # earlier turns shared by both transcripts
            task = _small_task(rng)
            transcript += f"\n\nHuman: {task.prompt}\n\nAssistant: {task.response}"
        task = _small_task(rng)
        prompt = transcript + f"\n\nHuman: {task.prompt}\n\nAssistant:"
        records.append({
            "chosen": prompt + " " + task.response,
            "rejected": prompt + " " + tasks.make_wrong_response(rng, task),
        })
    # Edge cases, appended so their positions are stable.
    task = _small_task(rng)
    prompt = f"\n\nHuman: Repeat my question, then answer it: {task.prompt}\n\nAssistant:"
    records.append({  # the reply quotes the whole prompt, markers included: it must stay in the reply
        "chosen": prompt + f" You wrote:{prompt}\n{task.response}",
        "rejected": prompt + " " + tasks.make_wrong_response(rng, task),
    })
    task = _small_task(rng)
    same = f"\n\nHuman: {task.prompt}\n\nAssistant: {task.response}"
    records.append({"chosen": same, "rejected": same})  # identical replies
    task = _small_task(rng)
    records.append({  # blank rejected reply
        "chosen": f"\n\nHuman: {task.prompt}\n\nAssistant: {task.response}",
        "rejected": f"\n\nHuman: {task.prompt}\n\nAssistant:   ",
    })
    task = _small_task(rng)
    records.append({"chosen": f"Human: {task.prompt} Assistant: {task.response}",  # no "\n\nAssistant:" marker
                    "rejected": f"Human: {task.prompt} Assistant: nothing"})
    return records


def judged_records(rng: random.Random) -> list[dict]:
    """Every tenth prompt from the 3rd on is a tie, from the 5th on has identical best/worst texts, from the
    7th on has a single candidate; the others hold a correct and a wrong reply plus random extras, so the
    counts do not depend on the random draws."""
    records = []
    for i in range(N_JUDGED):
        task = _small_task(rng)
        wrong = tasks.make_wrong_response(rng, task)
        judge = "synthetic.check_answer"
        if i % 10 == 7:  # single candidate: skipped
            candidates = [{"text": task.response, "score": 1.0, "judge": judge}]
        elif i % 10 == 3:  # a tie: the judge gives every candidate the same score
            candidates = [{"text": task.response, "score": 0.5, "judge": judge},
                          {"text": wrong, "score": 0.5, "judge": judge}]
        elif i % 10 == 5:  # the same text sampled twice, scored differently (a noisy judge)
            candidates = [{"text": task.response, "score": 0.9, "judge": judge},
                          {"text": task.response, "score": 0.7, "judge": judge}]
        else:
            candidates = [{"text": task.response, "score": 1.0, "judge": judge},
                          {"text": wrong, "score": round(rng.uniform(0.0, 0.4), 3), "judge": judge}]
            for _ in range(rng.choice((0, 1, 2))):
                text = task.response if rng.random() < 0.5 else tasks.make_wrong_response(rng, task)
                correct = tasks.check_answer(task, None, text)
                candidates.append({"text": text, "score": 1.0 if correct else round(rng.uniform(0.0, 0.4), 3),
                                   "judge": judge})
            rng.shuffle(candidates)
        records.append({"id": f"{task.kind}-{i:04d}", "prompt": task.prompt, "candidates": candidates})
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def build() -> dict[str, str]:
    return {
        "hh_sample.jsonl": render(hh_records(random.Random(SEED))),
        "judged_rollouts.jsonl": render(judged_records(random.Random(SEED + 1))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=OUT_DIR, help="where to write the sample files")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    files = build()
    stale = []
    for name, text in files.items():
        path = os.path.join(args.out_dir, name)
        if args.check:
            current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
            if current != text:
                stale.append(path)
            continue
        os.makedirs(args.out_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {path} ({text.count(chr(10))} records)")
    if stale:
        print("stale sample files (run scripts/make_format_samples.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
