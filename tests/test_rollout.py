"""Rollouts and judges: seeds, shards, prefix stripping, per-row sampling, verifier and reward-model judges.

In process, on the embedded tiny model (random weights are fine: these tests
check plumbing and invariants, not answers). The world-size invariance of
the candidates is shown without processes: a rank's generation only sees its
shard, so generating the shards of 2 ranks separately (other batch sizes,
other batch-mates) must give the traces of one rank generating everything.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from helpers import SFT_DATA, TINY_MODEL

from opensloth.config import build
from opensloth.errors import UserInputError
from opensloth.rollout.seeding import derive_seed, merge_shards, shard_indices
from opensloth.rollout.settings import RolloutSettings
from opensloth.rollout.traces import strip_prompt_prefix

# --------------------------------------------------------------------------- pure logic


def test_derive_seed_is_pinned_and_separates_every_coordinate():
    assert derive_seed(1234, 1, 0, 0) == derive_seed(1234, 1, 0, 0)
    # Pinned: a change of the derivation would silently change every published rollout.
    assert derive_seed(1234, 1, 0, 0) == 9123694394693654150
    seeds = {derive_seed(s, it, p, k) for s in (0, 1) for it in range(3) for p in range(40) for k in range(4)}
    assert len(seeds) == 2 * 3 * 40 * 4
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_partition_the_prompts(world_size):
    for n in range(0, 23):
        shards = [shard_indices(n, r, world_size) for r in range(world_size)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


def test_merge_shards_orders_by_index_and_refuses_overlap():
    merged = merge_shards([[{"index": 2}, {"index": 0}], [{"index": 1}]])
    assert [m["index"] for m in merged] == [0, 1, 2]
    with pytest.raises(ValueError, match="overlapping"):
        merge_shards([[{"index": 0}], [{"index": 0}]])


def test_prompt_prefix_is_removed_once_and_prompt_text_in_the_reasoning_stays():
    prompt = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    completion = f"The question was:\n{prompt}so 2 + 2 = 4.\nAnswer: 4"  # the model restates the rendered prompt
    trace = prompt + completion
    assert strip_prompt_prefix(trace, prompt) == completion
    # str.replace would delete the restatement inside the completion as well.
    assert trace.replace(prompt, "") != completion
    assert prompt + strip_prompt_prefix(trace, prompt) == trace
    with pytest.raises(ValueError, match="does not start with its prompt"):
        strip_prompt_prefix("something else" + completion, prompt)


def test_rollout_settings_validate():
    with pytest.raises(UserInputError, match="identical candidates"):
        RolloutSettings(samples=2, temperature=0.0)
    with pytest.raises(UserInputError, match="top_p"):
        RolloutSettings(top_p=0.0)
    with pytest.raises(UserInputError, match="unknown keys"):
        build(RolloutSettings, {"temprature": 0.5}, "rollout")
    assert build(RolloutSettings, {"samples": 3}, "rollout").samples == 3


def test_filter_logits_matches_brute_force():
    import torch

    from opensloth.rollout.sampling import filter_logits

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 12, generator=gen)
    for top_k in (0, 1, 3, 12):
        for top_p in (1.0, 0.9, 0.5, 0.05):
            out = filter_logits(logits, top_k=top_k, top_p=top_p)
            for row, kept_row in zip(logits, out):
                allowed = torch.argsort(row, descending=True).tolist()[: top_k or None]
                probs = torch.softmax(row[allowed], dim=-1).tolist()  # top-p sees the top-k renormalised
                keep, mass = [], 0.0
                for token, p in zip(allowed, probs):
                    if mass >= top_p:
                        break
                    keep.append(token)
                    mass += p
                got = torch.nonzero(torch.isfinite(kept_row)).flatten().tolist()
                assert sorted(got) == sorted(keep), (top_k, top_p)
                assert torch.equal(kept_row[got], row[got])


def test_inverse_cdf_sampling_closed_form_and_zero_probability_tokens():
    import torch

    from opensloth.rollout.sampling import sample_rows

    probs = torch.tensor([[0.2, 0.0, 0.3, 0.5]] * 6)
    u = torch.tensor([0.0, 0.19, 0.21, 0.49, 0.51, 0.999])
    assert sample_rows(probs, u).tolist() == [0, 0, 2, 2, 3, 3]
    grid = torch.linspace(0, 0.9999, 2000)
    chosen = sample_rows(probs[:1].expand(len(grid), 4), grid)
    assert 1 not in chosen.tolist()
    freq = torch.bincount(chosen, minlength=4).double() / len(grid)
    assert torch.allclose(freq, probs[0].double(), atol=1e-3)


# --------------------------------------------------------------------------- generation on the tiny model


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL))
    return model, tok


PROMPTS = [{"index": i, "id": f"p{i}", "prompt": p} for i, p in enumerate(
    ["What is 2 + 3?", "Reverse the string \"abc\".", "What is 7 * 8?", "Compute 12 + 30.", "What is 9 - 4?"])]


def _traces(records):
    return {(r["index"], c["sample"]): c["trace"] for r in records for c in r["candidates"]}


def test_candidates_do_not_depend_on_world_size_or_batch_size(tiny):
    from opensloth.rollout.generate import generate_candidates

    model, tok = tiny
    settings = RolloutSettings(samples=3, temperature=1.0, max_new_tokens=12, batch_size=64, seed=7)
    one_rank = generate_candidates(model, tok, PROMPTS, settings, iteration=1)
    small_batches = settings.replace(batch_size=2)
    two_ranks = [generate_candidates(model, tok, [PROMPTS[i] for i in shard_indices(len(PROMPTS), r, 2)],
                                     small_batches, iteration=1) for r in range(2)]
    assert _traces(one_rank) == _traces(merge_shards(two_ranks))
    # Sampling is real: candidates of one prompt differ, and another seed or iteration gives others.
    assert len({c["trace"] for c in one_rank[0]["candidates"]}) > 1
    other = generate_candidates(model, tok, PROMPTS, settings, iteration=2)
    assert _traces(other) != _traces(one_rank)
    for record in one_rank:
        for cand in record["candidates"]:
            assert cand["trace"].startswith(record["prompt_text"])
            assert cand["finish"] in ("eos", "length") and 0 <= cand["new_tokens"] <= 12


def test_greedy_decoding_is_the_argmax_chain(tiny):
    import torch

    from opensloth.rollout.generate import encode_prompt, generate_candidates

    model, tok = tiny
    settings = RolloutSettings(samples=1, temperature=0.0, max_new_tokens=5)
    record = generate_candidates(model, tok, PROMPTS[:1], settings, iteration=0)[0]
    ids = encode_prompt(tok, PROMPTS[0]["prompt"])
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tok.eos_token_id:
                ids.pop()
                break
    assert record["candidates"][0]["trace"] == tok.decode(ids, skip_special_tokens=False,
                                                           clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- judges


def test_verifier_scores_the_synthetic_tasks_including_prontoqa():
    from opensloth.tasks import TASK_KINDS, make_task, make_wrong_response
    from opensloth.rollout.judges import JudgeError, VerifierJudge

    rng = random.Random(3)
    for kind in TASK_KINDS:
        task = make_task(rng, kind, 60)
        wrong = make_wrong_response(rng, task)
        assert VerifierJudge(kind).score(task.prompt, [task.response, wrong, ""]) == [1.0, 0.0, 0.0]
        assert VerifierJudge(None).score(task.prompt, [task.response, wrong]) == [1.0, 0.0]
    with pytest.raises(JudgeError, match="cannot check"):
        VerifierJudge("prontoqa").score("What is 2 + 2?", ["Answer: 4"])


def _records(texts_per_prompt):
    out = []
    for i, texts in enumerate(texts_per_prompt):
        prompt_text = f"<user>Q{i}</user>"
        out.append({"index": i, "id": f"q{i}", "prompt": f"What is {i} + 1?", "prompt_text": prompt_text,
                    "candidates": [{"sample": k, "seed": k, "trace": prompt_text + t, "finish": "eos",
                                    "new_tokens": len(t)} for k, t in enumerate(texts)]})
    return out


def test_judged_records_feed_the_data_loader_with_ties_and_empties_counted(tmp_path):
    from opensloth.data.judged import build_judged_dataset
    from opensloth.rollout.judges import VerifierJudge, judge_traces
    from opensloth.rollout.run import build_pairs
    from opensloth.atomic import write_jsonl_atomic

    records = _records([
        ["Answer: 1", "Answer: 9 (0 + 1 = 1?)", "Answer: 5"],  # right vs wrong -> a pair
        ["Answer: 3", "Answer: 3"],                             # both right -> tie
        ["", "  "],                                              # nothing usable -> empty
        ["Answer: 4"],                                          # one candidate
    ])
    records[0]["candidates"].append({"sample": 3, "seed": 3, "trace": "garbled" + "Answer: 1", "finish": "eos",
                                     "new_tokens": 3})
    judged, counts = judge_traces(records, VerifierJudge("add"))
    assert counts["prompt_mismatch"] == 1 and counts["scored"] == 8
    assert [c["score"] for c in judged[0]["candidates"]] == [1.0, 0.0, 0.0]
    pairs, report = build_pairs(judged)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Answer: 1", "Answer: 9 (0 + 1 = 1?)")]
    assert report.dropped == {"tie": 1, "empty": 1, "single_candidate": 1}
    path = str(tmp_path / "judged.jsonl")
    write_jsonl_atomic(path, judged)
    ds, loaded = build_judged_dataset(path)
    assert ds["chosen"] == [p["chosen"] for p in pairs] and loaded.dropped == report.dropped


@pytest.mark.parametrize("bad", [["high", 1.0], [float("nan"), 0.0], [True, 0.0], [1.0], None])
def test_a_judge_returning_garbage_is_an_error_naming_it(bad):
    from opensloth.rollout.judges import CallableJudge, JudgeError, judge_traces

    judge = CallableJudge(lambda prompt, texts: bad, name="my.judge:fn")
    with pytest.raises(JudgeError, match="my.judge:fn") as info:
        judge_traces(_records([["a", "b"]]), judge)
    assert "q0" in str(info.value)


def test_make_judge_specs():
    from opensloth.rollout.judges import CallableJudge, VerifierJudge, make_judge

    assert isinstance(make_judge("verifier", dataset_type="prontoqa"), VerifierJudge)
    assert make_judge("verifier").kind is None
    assert isinstance(make_judge("math:fsum"), CallableJudge)
    for spec, message in [("oracle", "must be"), ("reward_model", "--reward-model"), ("nope.mod:fn", "cannot import")]:
        with pytest.raises(UserInputError, match=message):
            make_judge(spec)


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A randomly initialised Qwen3ForSequenceClassification with the tiny tokenizer (one reward logit)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_rm")
    tok = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_labels=1,
                         pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    Qwen3ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reward_model_judge_scores_are_deterministic_and_padding_free(tiny_reward_model):
    from opensloth.rollout.judges import RewardModelJudge, judge_traces

    judge = RewardModelJudge(tiny_reward_model, batch_size=4)
    texts = ["Answer: 5", "a much longer candidate answer with many more tokens. Answer: 6", "x"]
    batched = judge.score("What is 2 + 3?", texts)
    alone = [judge.score("What is 2 + 3?", [t])[0] for t in texts]
    assert all(isinstance(s, float) and math.isfinite(s) for s in batched)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == 3
    judged, counts = judge_traces(_records([texts]), judge)
    assert counts["scored"] == 3 and judged[0]["candidates"][0]["judge"].startswith("reward_model:")


def test_load_prompts_from_chat_data_and_errors(tmp_path):
    from opensloth.rollout.traces import load_prompts

    prompts = load_prompts(str(SFT_DATA), "test", limit=3)
    assert [p["index"] for p in prompts] == [0, 1, 2] and all(p["prompt"].strip() for p in prompts)
    first = json.loads((SFT_DATA / "test.jsonl").read_text().splitlines()[0])
    assert prompts[0]["prompt"] == next(m["content"] for m in first["messages"] if m["role"] == "user")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserInputError, match="empty rollout"):
        load_prompts(str(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(UserInputError, match="blank"):
        load_prompts(str(blank))
