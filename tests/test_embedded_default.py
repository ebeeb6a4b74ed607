"""The embedded default under ``data/``: tiny Qwen3 model, chat SFT and preference files.

Rebuilt by ``python scripts/build_tiny_model.py && python scripts/make_sample_data.py``.
The fast tests read the shipped files; the slow one loads the model with Unsloth
in a subprocess (importing Unsloth patches TRL and transformers process-wide).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from opensloth.data.synthetic import (
    TASK_KINDS,
    Task,
    check_answer,
    detect_kind,
    extract_answer,
    make_task,
    make_wrong_response,
    solve,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
MODEL = os.path.join(DATA, "tiny-qwen3")
SFT_FILES = [os.path.join(DATA, "sft", f"{split}.jsonl") for split in ("train", "test")]
PREF_FILES = [os.path.join(DATA, "preference", f"{split}.jsonl") for split in ("train", "test")]


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


# ---------------------------------------------------------------- model and tokenizer


def test_model_loads_and_runs(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    assert model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tokenizer("What is 12 + 7?")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "text",
    ["What is 482 + 37?", "Reverse \"abc\".\n  indented\tand tabs", "Every wumpus is a yumpus.", "naïve café ✓ 日本"],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    # Digits are split one by one, as in Qwen's pre-tokenizer.
    assert tokenizer.tokenize("12345") == list("12345")


def _mask_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def test_chat_template_assistant_mask_covers_exactly_assistant_content(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "12 + 7 = 19.\nAnswer: 19"},
        {"role": "user", "content": 'Reverse the string "abc".'},
        {"role": "assistant", "content": "Answer: cba"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
        "<|im_start|>assistant\n12 + 7 = 19.\nAnswer: 19<|im_end|>\n"
        '<|im_start|>user\nReverse the string "abc".<|im_end|>\n'
        "<|im_start|>assistant\nAnswer: cba<|im_end|>\n"
    )
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    spans = [tokenizer.decode(span) for span in _mask_spans(ids, mask)]
    # Each assistant turn, with the <|im_end|> the model must learn to emit, and nothing else.
    assert spans == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def test_chat_template_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert "{% generation %}" in tokenizer.chat_template.replace("{%- generation %}", "{% generation %}")


# ---------------------------------------------------------------- data files


def test_sft_files_parse_and_have_messages_format():
    counts = []
    for path in SFT_FILES:
        records = _read_jsonl(path)
        counts.append(len(records))
        for record in records:
            assert set(record) == {"messages", "source"}
            assert record["source"] in TASK_KINDS
            roles = [m["role"] for m in record["messages"]]
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in record["messages"])
            turns = roles[1:] if roles[0] == "system" else roles
            assert turns and turns == ["user", "assistant"] * (len(turns) // 2)
    assert counts[0] >= 1500 and counts[1] >= 150
    train = _read_jsonl(SFT_FILES[0])
    assert any(r["messages"][0]["role"] == "system" for r in train)
    assert any(len(r["messages"]) >= 5 for r in train)
    assert {r["source"] for r in train} == set(TASK_KINDS)


def test_preference_files_parse_and_have_string_columns():
    counts = []
    for path in PREF_FILES:
        records = _read_jsonl(path)
        counts.append(len(records))
        for record in records:
            assert set(record) == {"prompt", "chosen", "rejected"}
            assert all(isinstance(v, str) and v for v in record.values())
            assert record["chosen"] != record["rejected"]
    assert counts[0] >= 800 and counts[1] >= 80


def test_test_prompts_do_not_occur_in_train():
    for train_path, test_path in [(SFT_FILES[0], SFT_FILES[1]), (PREF_FILES[0], PREF_FILES[1])]:
        train = {p for r in _read_jsonl(train_path) for p in _user_prompts(r)}
        assert not any(p in train for r in _read_jsonl(test_path) for p in _user_prompts(r))


def _user_prompts(record: dict) -> list[str]:
    if "prompt" in record:
        return [record["prompt"]]
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def test_token_lengths_vary_widely(tokenizer):
    records = _read_jsonl(SFT_FILES[0])
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    lengths = sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    median, p90 = lengths[len(lengths) // 2], lengths[int(0.9 * len(lengths))]
    assert lengths[0] < 60
    assert 80 <= median <= 200
    assert p90 / median > 2
    assert lengths[-1] > 500


def test_data_folder_is_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DATA) for f in files)
    assert total < 5_000_000
    jsonl = sum(os.path.getsize(p) for p in SFT_FILES + PREF_FILES)
    assert jsonl < 3_000_000


def test_shipped_files_match_the_generator():
    """Editing synthetic.py without rerunning make_sample_data.py fails here."""
    spec = importlib.util.spec_from_file_location("make_sample_data", os.path.join(ROOT, "scripts", "make_sample_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from opensloth.data.synthetic import make_conversation, make_preference_pair

    for make, seed, path in [
        (make_conversation, module.SFT_SEEDS["train"], SFT_FILES[0]),
        (make_preference_pair, module.PREFERENCE_SEEDS["train"], PREF_FILES[0]),
    ]:
        with open(path, encoding="utf-8") as f:
            head = [next(f) for _ in range(50)]
        regenerated = module.generate_split(make, seed, 50)
        assert [json.dumps(r, sort_keys=True, ensure_ascii=True) + "\n" for r in regenerated] == head


# ---------------------------------------------------------------- verifiers


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


def test_verifier_on_shipped_data():
    for path in SFT_FILES:
        for record in _read_jsonl(path):
            turns = [m for m in record["messages"] if m["role"] != "system"]
            for user, assistant in zip(turns[::2], turns[1::2]):
                assert check_answer(None, user["content"], assistant["content"])
            assert detect_kind(turns[0]["content"]) == record["source"]
    for path in PREF_FILES:
        for record in _read_jsonl(path):
            assert check_answer(None, record["prompt"], record["chosen"])
            assert not check_answer(None, record["prompt"], record["rejected"])


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


# ---------------------------------------------------------------- Unsloth (slow)

_UNSLOTH_CHECK = textwrap.dedent(
    """
    import unsloth  # noqa: F401  (first: it patches transformers and TRL)
    import torch
    from unsloth import FastLanguageModel
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    model, tokenizer = FastLanguageModel.from_pretrained(
        {path!r}, max_seq_length=512, load_in_4bit=False, device_map={{"": "cpu"}})
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_gradient_checkpointing="unsloth", random_state=0)
    model.train()
    messages = [{{"role": "user", "content": "What is 12 + 7?"}},
                {{"role": "assistant", "content": "12 + 7 = 19.\\nAnswer: 19"}}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    batch = torch.tensor([ids, ids])
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora_grads and all(g is not None for g in lora_grads), "LoRA parameters got no gradient"
    assert any(float(g.abs().sum()) > 0 for g in lora_grads), "all LoRA gradients are zero"
    assert torch.isfinite(loss)
    print("UNSLOTH_OK", float(loss))
    """
)


@pytest.mark.slow
@pytest.mark.unsloth
def test_unsloth_loads_tiny_model_and_trains_lora():
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed (bash scripts/setup_env.sh installs it)")
    result = subprocess.run(
        [sys.executable, "-c", _UNSLOTH_CHECK.format(path=MODEL)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0 and "UNSLOTH_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
