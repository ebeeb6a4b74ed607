"""opensloth.sft.eval: held-out loss and greedy exact-match, the numbers every SFT run prints before and after."""

from __future__ import annotations

import json

import pytest

from helpers import SFT_DATA, TINY_MODEL, write_lines
from opensloth.distributed import DistEnv
from opensloth.errors import UserInputError


def _conversation(prompt: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def _jsonl(path, records) -> str:
    return write_lines(path, [json.dumps(r) for r in records])


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval(), AutoTokenizer.from_pretrained(TINY_MODEL)


def test_bad_data_is_one_clear_error(tmp_path):
    from opensloth.sft.eval import read_heldout_records

    with pytest.raises(UserInputError, match="does not exist"):
        read_heldout_records(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_conversation("a", "b")) + "\n{not json\n")
    with pytest.raises(UserInputError, match=r"bad.jsonl:2: not valid JSON"):
        read_heldout_records(str(bad))
    bad.write_text(json.dumps({"prompt": "no messages"}) + "\n")
    with pytest.raises(UserInputError, match=r"bad.jsonl:1: expected an object with a 'messages' list"):
        read_heldout_records(str(bad))
    folder = tmp_path / "split"
    folder.mkdir()
    _jsonl(folder / "test.jsonl", [_conversation("a", "b")])
    assert len(read_heldout_records(str(folder))) == 1


def test_loss_equals_a_direct_computation_and_ignores_padding(tiny):
    """Token-weighted mean over all real tokens, whatever the batch size (padding never counts)."""
    import torch

    from opensloth.sft.eval import evaluate_heldout

    model, tokenizer = tiny
    records = [json.loads(line) for line in open(SFT_DATA / "test.jsonl")][:5]
    nll_sum = n_tokens = 0.0
    for record in records:
        ids = torch.tensor([tokenizer.apply_chat_template(record["messages"], tokenize=True,
                                                          return_dict=True)["input_ids"]])
        with torch.no_grad():
            mean = model(input_ids=ids, labels=ids).loss.item()  # transformers' own shifted mean
        nll_sum += mean * (ids.shape[1] - 1)
        n_tokens += ids.shape[1] - 1
    path = str(SFT_DATA / "test.jsonl")
    one = evaluate_heldout(model, tokenizer, path, n_loss=5, n_exact=0, batch_size=1)
    five = evaluate_heldout(model, tokenizer, path, n_loss=5, n_exact=0, batch_size=5)
    assert one["tokens"] == five["tokens"] == n_tokens and one["n"] == 5
    assert one["loss"] == pytest.approx(nll_sum / n_tokens, rel=1e-5)
    assert five["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert five["assistant_loss"] == pytest.approx(one["assistant_loss"], rel=1e-4)
    assert five["assistant_loss"] != pytest.approx(five["loss"], rel=1e-3)  # a strict subset, scored on its own
    assert one["exact_match"] is None and one["n_exact"] == 0


class _Oracle:
    """A stand-in model whose greedy reply is ``answer(prompt)``: tests the generation plumbing, not a model."""

    def __init__(self, tokenizer, answer):
        import torch

        self.tokenizer, self.answer = tokenizer, answer
        self.training = True
        self._param = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = None

    def parameters(self):
        yield self._param

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        import torch

        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()])
            prompt = text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
            reply = self.tokenizer(self.answer(prompt) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            rows.append(reply[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def _task_records():
    import random

    from opensloth.tasks import make_task

    rng = random.Random(5)
    tasks = [make_task(rng, kind=kind, size=40) for kind in ("add", "sub", "add", "reverse")]
    records = [_conversation(t.prompt, "Answer: " + t.answer) for t in tasks]
    records[2]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    return records + [_conversation("Tell me a poem.", "No.")]  # no known task: never counted


def test_exact_match_uses_the_task_verifier(tmp_path, tiny):
    from opensloth.sft.eval import evaluate_heldout
    from opensloth.tasks import detect_kind, solve

    _, tokenizer = tiny
    records = _task_records()
    assert [detect_kind(r["messages"][-2]["content"]) for r in records[:4]] == ["add", "sub", "add", "reverse"]
    with pytest.raises(ValueError):
        detect_kind(records[4]["messages"][0]["content"])
    path = _jsonl(tmp_path / "test.jsonl", records)
    right = _Oracle(tokenizer, lambda p: "Answer: " + solve(None, p))
    wrong = _Oracle(tokenizer, lambda p: "Answer: 0")

    result = evaluate_heldout(right, tokenizer, path, n_loss=0, n_exact=10, task="add", batch_size=2)
    assert (result["exact_match"], result["n_exact"], result["exact_by_kind"]) == (1.0, 2, {"add": 1.0})
    assert result["loss"] is None and result["n"] == 0
    assert right.training, "the model's mode is restored"
    result = evaluate_heldout(wrong, tokenizer, path, n_loss=0, n_exact=3, task=None)
    assert (result["exact_match"], result["n_exact"]) == (0.0, 3)
    result = evaluate_heldout(right, tokenizer, path, n_loss=0, n_exact=10, batch_size=1)
    assert result["exact_by_kind"] == {"add": 1.0, "reverse": 1.0, "sub": 1.0} and result["n_exact"] == 4
    assert result["example_prompt"] == records[0]["messages"][0]["content"]  # the summary's chat example
    with pytest.raises(UserInputError, match="not a known task kind"):
        evaluate_heldout(right, tokenizer, path, task="poetry")


def test_ranks_score_disjoint_shares_that_add_up_to_the_whole(tmp_path, tiny, monkeypatch):
    """On N ranks each scores rank::N and the gathered sums equal the 1-rank result (the gather is simulated)."""
    import opensloth.sft.eval as sft_eval
    from opensloth.tasks import solve

    model, tokenizer = tiny
    path = _jsonl(tmp_path / "test.jsonl", _task_records() + [json.loads(x) for x in open(SFT_DATA / "test.jsonl")][:7])
    whole = sft_eval.evaluate_heldout(model, tokenizer, path, n_loss=None, n_exact=0)
    shares = []  # what each of 3 ranks contributes to the gather

    def keep_share(obj):
        shares.append(obj)
        return [obj]

    monkeypatch.setattr(sft_eval, "all_gather_object_list", keep_share)
    for rank in range(3):
        env = DistEnv(rank=rank, local_rank=rank, world_size=3, local_world_size=3)
        sft_eval.evaluate_heldout(model, tokenizer, path, n_loss=None, n_exact=0, env=env)
    monkeypatch.setattr(sft_eval, "all_gather_object_list", lambda obj: shares)
    env = DistEnv(rank=0, local_rank=0, world_size=3, local_world_size=3)
    gathered = sft_eval.evaluate_heldout(model, tokenizer, path, n_loss=None, n_exact=0, env=env)
    assert sum(s[0]["tokens"] for s in shares) == whole["tokens"] and 0 not in [s[0]["tokens"] for s in shares]
    assert gathered["tokens"] == whole["tokens"] and gathered["n"] == whole["n"] == 12
    assert gathered["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    right = _Oracle(tokenizer, lambda p: "Answer: " + solve(None, p))
    monkeypatch.setattr(sft_eval, "all_gather_object_list", lambda obj: [obj, (obj[0], [("add", False)])])
    env = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2)
    result = sft_eval.evaluate_heldout(right, tokenizer, path, n_loss=0, n_exact=3, env=env)
    assert result["n_exact"] == 3 and result["exact_match"] == pytest.approx(2 / 3)  # 2 of rank 0's right, 1 wrong


def test_peft_model_generation_is_deterministic_and_sees_the_adapter(tmp_path, tiny):
    """A PEFT model on CPU: greedy results repeat exactly; a zero adapter scores like the base, a changed one not."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from opensloth.sft.eval import evaluate_heldout

    base, tokenizer = tiny
    path = _jsonl(tmp_path / "test.jsonl", [json.loads(x) for x in open(SFT_DATA / "test.jsonl")][:12])
    plain = evaluate_heldout(base, tokenizer, path, n_loss=6, n_exact=6, max_new_tokens=24)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    zero = evaluate_heldout(peft_model, tokenizer, path, n_loss=6, n_exact=6, max_new_tokens=24)
    assert peft_model.training
    assert zero["loss"] == pytest.approx(plain["loss"], rel=1e-6)  # B = 0: the adapter is a no-op
    assert zero["exact_match"] == plain["exact_match"] and zero["n_exact"] == 6
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    first = evaluate_heldout(peft_model, tokenizer, path, n_loss=6, n_exact=6, max_new_tokens=24)
    again = evaluate_heldout(peft_model, tokenizer, path, n_loss=6, n_exact=6, max_new_tokens=24)
    assert first == again
    assert first["loss"] != pytest.approx(plain["loss"], rel=1e-3)


def test_the_shipped_data_scores_its_new_skill_by_default(tmp_path, monkeypatch):
    """On data/sft exact-match counts the kind the base never learned ('negate'); elsewhere every kind counts."""
    from opensloth.sft import SFTSettings

    monkeypatch.chdir(tmp_path)  # the shipped folder is recognised from any working directory
    assert SFTSettings(dataset=str(SFT_DATA)).heldout_task == "negate"
    assert SFTSettings(dataset=str(tmp_path)).heldout_task is None
    assert SFTSettings(dataset=str(SFT_DATA), heldout_task="add").heldout_task == "add"
    with pytest.raises(UserInputError, match="--heldout_task 'poetry' is not a task kind"):
        SFTSettings(heldout_task="poetry")
    with pytest.raises(UserInputError, match="--heldout_exact -1 must be >= 0"):
        SFTSettings(heldout_exact=-1)
