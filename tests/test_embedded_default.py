"""The embedded default under ``data/``: tiny pretrained Qwen3 model, chat SFT and preference files.

Rebuilt by ``python scripts/build_tiny_model.py && python scripts/make_sample_data.py``.
The fast tests read the shipped files and check the build script's pure helpers;
the slow ones rebuild a miniature model twice (same bytes) and load the shipped
model with Unsloth in a subprocess (importing Unsloth patches TRL and
transformers process-wide).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import pytest

from opensloth.tasks import MIXED_KINDS, TASK_KINDS, check_answer, detect_kind, make_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
MODEL = os.path.join(DATA, "tiny-qwen3")
SFT_FILES = [os.path.join(DATA, "sft", f"{split}.jsonl") for split in ("train", "test")]
PREF_FILES = [os.path.join(DATA, "preference", f"{split}.jsonl") for split in ("train", "test")]


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build():
    return _load_script("build_tiny_model")


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
    # Generation stops at the chat turn's end or at a pretraining document's end, as in Qwen's chat models.
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.pad_token_id]
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
    assert sum(os.path.getsize(os.path.join(MODEL, f)) for f in os.listdir(MODEL)) < 2_500_000


def _lines(records: list[dict]) -> list[str]:
    return [json.dumps(r, sort_keys=True, ensure_ascii=True) + "\n" for r in records]


def test_shipped_files_match_the_generator():
    """Editing a task family in opensloth.tasks without rerunning make_sample_data.py fails here."""
    module = _load_script("make_sample_data")
    from opensloth.tasks import make_preference_pair

    with open(PREF_FILES[0], encoding="utf-8") as f:
        head = [next(f) for _ in range(50)]
    assert _lines(module.generate_split(make_preference_pair, module.PREFERENCE_SEEDS["train"], 50)) == head
    # The SFT split shuffles the mixed and the negate streams together: regenerate all of it.
    with open(SFT_FILES[0], encoding="utf-8") as f:
        assert _lines(module.mixed_split("train", 2000, 0.3)) == f.readlines()


def test_sft_data_is_30_percent_negate():
    for path in SFT_FILES:
        records = _read_jsonl(path)
        negate = [r for r in records if r["source"] == "negate"]
        assert len(negate) == round(0.3 * len(records))
        for record in negate:  # every turn of a negate conversation is a negate task, and checkable
            turns = record["messages"][1:] if record["messages"][0]["role"] == "system" else record["messages"]
            for user, assistant in zip(turns[::2], turns[1::2]):
                assert detect_kind(user["content"]) == "negate"
                assert check_answer(None, user["content"], assistant["content"])
    assert sum(r["source"] == "negate" for r in _read_jsonl(SFT_FILES[1])[:200]) >= 48  # exact-match set


# ---------------------------------------------------------------- pretrained base


def test_shipped_model_is_pretrained(tokenizer):
    """Held-out chat loss far below the uniform ln(vocab): the weights were trained, not just initialised."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    records = _read_jsonl(SFT_FILES[1])[:32]
    batch = tokenizer.apply_chat_template([r["messages"] for r in records], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True, padding=True, return_tensors="pt")
    ids, attention = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    real = attention[:, 1:].bool()
    assistant = torch.as_tensor(batch["assistant_masks"])[:, 1:].bool() & real
    uniform = math.log(len(tokenizer))  # 7.62, what the random init scored
    # Measured at build time: 1.98 over all tokens, 1.36 over assistant replies (30% of the records are negate,
    # a kind the base never saw).
    assert nll[real].mean() < uniform / 3
    assert nll[assistant].mean() < uniform / 4


def _greedy_accuracy(tokenizer, tasks, max_new_tokens: int) -> float:
    """Share of ``tasks`` the shipped base answers right, greedy, one user turn in the chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t.prompt}], tokenize=False,
                                             add_generation_prompt=True) for t in tasks]
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(check_answer(t, None, r) for t, r in zip(tasks, replies)) / len(tasks)


def test_shipped_model_gets_negate_wrong(tokenizer):
    """The SFT-only kind: the base was never trained on it, so the default SFT run has something to teach."""
    rng = random.Random("test-negate")
    accuracy = _greedy_accuracy(tokenizer, [make_task(rng, kind="negate") for _ in range(32)], max_new_tokens=40)
    # Measured at build time: 0/32 (the base answers in another kind's format). After the default SFT run:
    # 31/48 of the held-out negate prompts of data/sft/test.jsonl.
    assert accuracy <= 0.15, accuracy


def test_shipped_model_is_partly_right_on_prontoqa(tokenizer):
    """Greedy chat replies to true/false questions: above chance, not perfect (room for DPO)."""
    rng = random.Random("test-prontoqa")
    tasks = [make_task(rng, kind="prontoqa", size=rng.randint(30, 150)) for _ in range(40)]
    accuracy = _greedy_accuracy(tokenizer, tasks, max_new_tokens=160)
    # Measured at build time: 24/40 (34/40 with the earlier narrow-embedding build). About half the answers are
    # "True", so chance is 0.5.
    assert 0.55 <= accuracy < 1.0, accuracy


def test_pretraining_never_sees_a_shipped_prompt(build):
    shipped = build.shipped_prompts()
    for path in SFT_FILES + PREF_FILES:
        for record in _read_jsonl(path):
            assert all(p in shipped for p in _user_prompts(record)), path
    tasks = build.pretraining_tasks(seed=5, max_tokens=150, exclude=shipped)
    drawn = [next(tasks) for _ in range(3000)]
    assert not any(t.prompt in shipped for t in drawn)
    counts = {kind: sum(t.kind == kind for t in drawn) for kind in MIXED_KINDS}
    assert not any(t.kind == "negate" for t in drawn)  # the SFT-only kind
    assert all(counts.values()) and max(counts, key=counts.get) == "prontoqa"


def test_pretraining_documents(build, tokenizer):
    task = make_task(random.Random(3), kind="add", size=60)
    messages = [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.response}]
    plain = build.render_document(task, chat=False)
    assert plain == f"Question: {task.prompt}\nSolution: {task.response}"
    assert not any(token in plain for token in build.SPECIAL_TOKENS)
    assert build.render_document(task, chat=True) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert build.render_plain([{"role": "system", "content": "Be brief."}] + messages).startswith("Be brief.\n\nQuestion:")

    docs = build.tokenized_documents(tokenizer, build.pretraining_tasks(1, 150, set()), chat_share=0.1, seed=2)
    first = [next(docs) for _ in range(1000)]
    eot, im_start = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(ids[-1] == eot and eot not in ids[:-1] for ids in first)
    chat = sum(ids[0] == im_start for ids in first)
    assert 60 <= chat <= 140, chat  # about one in ten


def test_pack_rows_keeps_documents_whole(build):
    rng = random.Random(0)
    # Document i is i+1 repeated, so each run of equal tokens in a row is one document.
    docs = [[i + 1] * rng.randint(1, 50) for i in range(400)]
    docs[7] = [8] * 130  # longer than a row: dropped
    rows = build.pack_rows(iter(docs), n_rows=30, row_len=128, open_rows=4)
    assert len(rows) == 30 and all(len(row) == 128 for row in rows)
    seen = set()
    for row in rows:
        body = [t for t in row if t != -1]
        assert row[: len(body)] == body  # padding only at the end
        runs, start = [], 0
        for i in range(1, len(body) + 1):
            if i == len(body) or body[i] != body[start]:
                runs.append((body[start], i - start))
                start = i
        for doc_id, length in runs:
            assert doc_id not in seen and length == len(docs[doc_id - 1])  # whole, and only once
            seen.add(doc_id)
    assert 8 not in seen
    padding = sum(row.count(-1) for row in rows) / (30 * 128)
    assert padding < 0.1
    with pytest.raises(ValueError, match="ran out"):
        build.pack_rows(iter(docs[:10]), n_rows=30, row_len=128)


def test_learning_rate_schedule(build):
    lr = lambda step: build.lr_at(step, total=110, peak=1.0, warmup=10)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert lr(110) == pytest.approx(0.1)  # ends at a tenth
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_swap_into_place_replaces_the_whole_folder(build, tmp_path):
    out, new = tmp_path / "model", tmp_path / ".model.new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    build._swap_into_place(str(new), str(out))
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert os.listdir(out) == ["new.txt"]
    fresh = tmp_path / ".fresh"
    fresh.mkdir()
    build._swap_into_place(str(fresh), str(tmp_path / "absent"))
    assert sorted(os.listdir(tmp_path)) == ["absent", "model"]


@pytest.mark.slow
def test_build_is_byte_reproducible(tmp_path):
    """Two builds of a miniature model (tokenizer, init, a few pretraining steps) write the same bytes."""
    args = ["--corpus-conversations", "300", "--corpus-pairs", "50", "--vocab-size", "400",
            "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "1", "--num-heads", "2",
            "--num-kv-heads", "1", "--pretrain-steps", "6", "--pretrain-batch", "2", "--pretrain-seq-len", "128"]

    def digest(out, *extra):
        result = subprocess.run([sys.executable, "scripts/build_tiny_model.py", "--out", str(out), *args, *extra],
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in sorted(os.listdir(out))}

    first = digest(tmp_path / "a")
    assert "model.safetensors" in first and first == digest(tmp_path / "b")
    untrained = digest(tmp_path / "c", "--pretrain-steps", "0")
    assert untrained["model.safetensors"] != first["model.safetensors"]
    assert untrained["tokenizer.json"] == first["tokenizer.json"]


# ---------------------------------------------------------------- verifiers on the shipped data


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
