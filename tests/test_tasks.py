"""opensloth.tasks: every task family of the registry generates, recognises, solves and gets wrong its tasks."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest

from helpers import REPO
from opensloth.errors import UserInputError
from opensloth.tasks import (
    FAMILIES,
    MIXED_KINDS,
    TASK_KINDS,
    Task,
    check_answer,
    detect_kind,
    extract_answer,
    make_task,
    make_wrong_response,
    solve,
)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registry_holds_one_spec_per_family_in_the_data_order():
    # make_task draws a kind uniformly from the mixed kinds in this order: changing it changes every generated
    # dataset. negate is made only when asked for by name (the SFT data), so the mixed streams stay as they were.
    assert TASK_KINDS == ("add", "sub", "mul", "reverse", "sort", "count", "sum_list", "copy", "prontoqa", "negate")
    assert MIXED_KINDS == TASK_KINDS[:-1]
    assert all(FAMILIES[k].kind == k for k in TASK_KINDS)
    priorities = [FAMILIES[k].detect_priority for k in TASK_KINDS]
    assert len(set(priorities)) == len(priorities), "detection order must be total"


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_verifier_accepts_correct_and_rejects_wrong(kind):
    rng = random.Random(kind)
    for size in (20, 60, 150, 400, 900):
        for _ in range(10):
            task = make_task(rng, kind=kind, size=size)
            assert task.kind == kind
            assert detect_kind(task.prompt) == kind
            assert solve(None, task.prompt) == task.answer
            assert check_answer(task, None, task.response)
            assert check_answer(kind, task.prompt, task.response)
            assert check_answer(None, task.prompt, task.response)
            wrong = make_wrong_response(rng, task)
            assert not check_answer(None, task.prompt, wrong)
            assert not check_answer(task, None, wrong)


def test_extract_answer_is_robust():
    assert extract_answer("12 + 7 = 19.\nAnswer: 19") == "19"
    assert extract_answer("answer: 3\nwait, no.\nANSWER: 4.") == "4."
    assert extract_answer("I think the result is 42") == "42"
    assert extract_answer("") is None
    task = Task("add", "What is 12 + 7?", "19")
    assert check_answer(task, None, "the sum is 19.")
    assert check_answer(task, None, "Answer:  19 .")
    assert not check_answer(task, None, "Answer: 190")
    assert check_answer("sort", "Sort these numbers in ascending order: [3, 1, 2]", "Answer: [1,2,3]")
    assert check_answer("prontoqa", "Every impus is a lorpus. Max is an impus. True or false: Max is a lorpus.",
                        "So Max is a lorpus.\nAnswer: true")


def test_prontoqa_solver_follows_chains_and_negations():
    prompt = ("Every dumpus is not a rompus. Every wumpus is a yumpus. Every yumpus is a dumpus. "
              "Every yumpus is a felpus. Sam is a wumpus. True or false: Sam is a rompus.")
    assert solve(None, prompt) == "False"
    assert solve(None, prompt.replace("Sam is a rompus.", "Sam is not a rompus.")) == "True"
    with pytest.raises(ValueError, match="does not decide"):
        solve(None, prompt.replace("Sam is a rompus.", "Sam is a gorpus."))


def test_make_task_never_draws_negate():
    rng = random.Random(0)
    drawn = {make_task(rng, size=size).kind for size in (16, 20, 30) * 300}
    assert "negate" not in drawn and {"prontoqa", "add"} <= drawn


def test_negate_says_the_opposite():
    assert solve(None, "Negate this statement: Max is a wumpus.") == "Max is not a wumpus."
    assert solve(None, "Say the opposite: Every impus is not an orpus.") == "Every impus is an orpus."
    assert solve(None, "Good. Write the opposite of this statement: Ivy is a lorpus.") == "Ivy is not a lorpus."
    assert check_answer(None, "Negate this statement: Max is a wumpus.", "Answer: Max is not a wumpus.")
    assert not check_answer(None, "Negate this statement: Max is a wumpus.", "Answer: Max is a wumpus.")
    assert not check_answer(None, "Negate this statement: Max is a wumpus.", "Answer: Sam is not a wumpus.")
    with pytest.raises(ValueError, match="no '<instruction>"):
        solve("negate", "Negate this statement: nothing here")


def test_negate_conversations_are_negate_only_and_mixed_ones_unchanged():
    from opensloth.tasks import make_conversation

    rng = random.Random(1)
    for _ in range(50):
        record = make_conversation(rng, kind="negate")
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert record["source"] == "negate" and all(detect_kind(u) == "negate" for u in users)
    # kind=None draws exactly what it drew before the kind argument (and negate) existed.
    a, b = random.Random(5), random.Random(5)
    assert [make_conversation(a) for _ in range(20)] == [make_conversation(b, kind=None) for _ in range(20)]
    assert all(r["source"] != "negate" for r in (make_conversation(a) for _ in range(500)))


def test_unknown_inputs_raise():
    with pytest.raises(ValueError, match="unknown task kind"):
        make_task(random.Random(0), kind="poetry")
    with pytest.raises(ValueError, match="cannot tell the task kind"):
        detect_kind("Tell me a joke.")


def test_generation_is_deterministic():
    def tasks(seed):
        rng = random.Random(seed)
        return [make_task(rng) for _ in range(200)]

    assert tasks(7) == tasks(7)
    assert tasks(7) != tasks(8)



def test_task_data_keeps_heldout_prompts_unseen(tmp_path):
    make_data = _load_script("make_task_data").main
    out = str(tmp_path / "data")
    make_data(["--kind", "prontoqa", "--n-sft", "300", "--n-prompts", "50", "--n-heldout", "40", "--out", out])
    sft = [json.loads(line) for line in open(os.path.join(out, "sft", "train.jsonl"))]
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(out, "prompts.jsonl"))]
    heldout = [json.loads(line) for line in open(os.path.join(out, "heldout.jsonl"))]
    seen = {r["messages"][0]["content"] for r in sft} | set(prompts)
    assert len(heldout) == 40 and not seen & {h["prompt"] for h in heldout}
    assert all(r["messages"][1]["content"] in ("Answer: True", "Answer: False") for r in sft)
    with pytest.raises(UserInputError, match="relax"):  # 100 one-digit sums cannot give 40 unseen prompts
        make_data(["--kind", "add", "--max-operand-digits", "1", "--n-sft", "2000", "--n-prompts", "10",
                   "--n-heldout", "40", "--out", out])
