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
- ``hh_edge_cases.jsonl``: one HH record per case the dynamic-DPO
  repositories' parser meets (multi-turn, prompt text inside a reply,
  identical replies, no Assistant turn, transcripts that part early, an
  ``Assistant:`` tag inside the reply, ``\r\n`` line ends, a leading newline).
- ``judged_prompt_messages.jsonl`` / ``rollout_responses.jsonl``: the judged and
  unjudged rollouts of dynamic-dpo-v1 (``prompt_messages`` schema).

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


H, A = "\n\nHuman:", "\n\nAssistant:"


def hh_edge_records() -> list[dict]:
    """One record per parser case, in the order data/formats/README.md lists them."""
    two_turns = f"{H} What is 2 + 3?{A} 5.{H} And times 4?{A}"
    quote = f"{H} Say: the sky is green.{A}"
    return [
        {"chosen": f"{H} Name a colour.{A} Blue.", "rejected": f"{H} Name a colour.{A} Seven."},  # plain
        {"chosen": two_turns + " 20.", "rejected": two_turns + " 9."},  # multi-turn
        {"chosen": quote + " You said: Say: the sky is green. It is not.", "rejected": quote + " Green!"},  # quote
        {"chosen": f"{H} Hi.{A} Hello.", "rejected": f"{H} Hi.{A} Hello."},  # identical replies
        {"chosen": f"{H} No reply here.", "rejected": f"{H} No reply here either."},  # no Assistant turn
        {"chosen": f"{H} Pick a number.{A} 3.{H} Why?{A} Because.",  # transcripts part before the last turn
         "rejected": f"{H} Pick a number.{A} 4."},
        {"chosen": f"{H} Quote a log.{A} It read:{A} done.", "rejected": f"{H} Quote a log.{A} Nothing."},
        {"chosen": "\r\n\r\nHuman: Count to two.\r\n\r\nAssistant: 1, 2.",  # \r\n in both
         "rejected": "\r\n\r\nHuman: Count to two.\r\n\r\nAssistant: 2, 1."},
        {"chosen": f"{H} Count to three.{A} 1, 2, 3.",  # \r\n in rejected only
         "rejected": "\r\n\r\nHuman: Count to three.\r\n\r\nAssistant: 3."},
        {"chosen": f"{H} Greet me.{A}\nHello there.", "rejected": f"{H} Greet me.{A}\nGo away."},  # leading \n
        {"chosen": f"{H} Blank?{A} ", "rejected": f"{H} Blank?{A} Yes."},  # blank reply
    ]


def prompt_messages_records() -> list[dict]:
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    meta = {"source": "hh_rollout", "seed": 42, "k_candidates": 4, "judge": "rm"}
    return [
        {"prompt_messages": [user("What is 2 + 2?")], "chosen": [bot("4")], "rejected": [bot("5")], "metadata": meta},
        {"prompt_messages": [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello"),
                             user("Name a fruit.\r\n")],
         "chosen": [bot(" Apple ")], "rejected": [bot("A car")], "metadata": meta},  # system dropped, multi-turn
        {"prompt_messages": [user("Say yes.")], "chosen": [bot("Yes.")], "rejected": [bot("Yes.")],
         "metadata": meta},  # identical replies
        {"prompt_messages": [user("Q"), bot("A")], "chosen": [bot("x")], "rejected": [bot("y")],
         "metadata": meta},  # ends with an assistant turn
        {"prompt_messages": [user("Tell me a joke.")], "chosen": [bot("  ")], "rejected": [bot("No.")],
         "metadata": meta},  # blank reply
        {"prompt_messages": [user("Capital of France?")], "chosen": [bot("Paris.")], "rejected": [bot("Rome.")],
         "metadata": meta},
    ]


def rollout_responses_records() -> list[dict]:
    return [{"prompt_messages": [{"role": "user", "content": "What is 2 + 2?"}], "responses": ["4", "5", "four"],
             "reference_responses": {"chosen": "4", "rejected": "5"}}]


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def build() -> dict[str, str]:
    return {
        "hh_sample.jsonl": render(hh_records(random.Random(SEED))),
        "judged_rollouts.jsonl": render(judged_records(random.Random(SEED + 1))),
        "hh_edge_cases.jsonl": render(hh_edge_records()),
        "judged_prompt_messages.jsonl": render(prompt_messages_records()),
        "rollout_responses.jsonl": render(rollout_responses_records()),
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
