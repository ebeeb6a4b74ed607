"""The one preference pipeline on shipped data: every format of the registry, clamping, tokenizing."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from helpers import REPO, HH_SAMPLE, JUDGED_SAMPLE, PREF_TRAIN, write_lines
from opensloth.errors import UserInputError

ROOT = str(REPO)


# ---- Anthropic HH ----------------------------------------------------------------


def test_hh_sample_file():
    from opensloth.data import load_preference_dataset

    ds, report = load_preference_dataset(HH_SAMPLE)
    assert (report.total_in, report.total_out) == (44, 41)
    assert report.dropped == {"identical_texts": 1, "empty": 1, "no_assistant_turn": 1}
    originals = [json.loads(line) for line in open(HH_SAMPLE, encoding="utf-8")]
    kept = [r for i, r in enumerate(originals) if i not in (41, 42, 43)]
    for row, original in zip(ds, kept):
        assert row["prompt"].endswith("\n\nAssistant:")
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]


def test_hh_prompt_quoted_inside_reply_stays_intact():
    from opensloth.data import load_preference_dataset

    ds, _ = load_preference_dataset(HH_SAMPLE)
    quoting = ds[40]  # line 41 of the sample: the reply quotes the whole prompt
    assert quoting["chosen"].startswith(" You wrote:" + quoting["prompt"])
    # str.replace(prompt, "") would have removed the quote too.
    assert quoting["chosen"].count(quoting["prompt"]) == 1


def test_hh_split_cases():
    from opensloth.data.hh import split_hh_pair, transcript_to_messages

    p = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    # Replies that start alike: the shared start stays in the replies.
    assert split_hh_pair(p + " Sure, 1", p + " Sure, 2") == (p, " Sure, 1", " Sure, 2")
    # Earlier turns differ: the prompt is the part before the first difference.
    prompt, chosen, _ = split_hh_pair("\n\nHuman: x\n\nAssistant: y\n\nHuman: z", "\n\nHuman: x\n\nAssistant: q")
    assert prompt == "\n\nHuman: x\n\nAssistant:" and chosen == " y\n\nHuman: z"
    with pytest.raises(ValueError):
        split_hh_pair("Human: a", "Human: b")
    assert transcript_to_messages(p) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
    ]


def test_hh_missing_columns():
    import datasets

    from opensloth.data import MissingColumnsError
    from opensloth.data.hh import build_hh_dataset

    with pytest.raises(MissingColumnsError, match=r"found \['chosen', 'other'\]"):
        build_hh_dataset(datasets.Dataset.from_list([{"chosen": "x", "other": "y"}]))


# ---- judged rollouts -------------------------------------------------------------


def test_judged_sample_file():
    from opensloth.data import load_preference_dataset
    from opensloth.data.sources import read_jsonl

    ds, report = load_preference_dataset(JUDGED_SAMPLE)
    assert (report.total_in, report.total_out) == (40, 28)
    assert report.dropped == {"tie": 4, "single_candidate": 4, "identical_texts": 4}
    # positions are line numbers for a JSONL file
    assert report.examples["tie"] == [4, 14, 24, 34] and report.examples["single_candidate"] == [8, 18, 28, 38]
    by_id = {rec["id"]: rec for _, rec in read_jsonl(JUDGED_SAMPLE)}
    for row in ds:
        scores = [c["score"] for c in by_id[row["id"]]["candidates"]]
        assert row["chosen_score"] == max(scores) > row["rejected_score"] == min(scores)


@pytest.mark.parametrize("score", ['"high"', "null", "true", "NaN", "[1]"])
def test_judged_non_numeric_score_names_file_and_line(tmp_path, score):
    from opensloth.data import DatasetFormatError
    from opensloth.data.judged import build_judged_dataset

    good = json.dumps({"prompt": "p", "candidates": [{"text": "a", "score": 1}, {"text": "b", "score": 0.5}]})
    bad = '{"prompt": "q", "candidates": [{"text": "a", "score": 1}, {"text": "b", "score": %s}]}' % score
    path = write_lines(tmp_path / "judged.jsonl", [good, good, bad])
    with pytest.raises(DatasetFormatError) as err:
        build_judged_dataset(path)
    assert f"{path}:3:" in str(err.value) and "candidate 1" in str(err.value) and "non-numeric" in str(err.value)


def test_judged_schema_errors(tmp_path):
    from opensloth.data import DatasetFormatError
    from opensloth.data.judged import build_judged_dataset

    path = write_lines(tmp_path / "j.jsonl", ['{"prompt": "p", "responses": []}'])
    with pytest.raises(DatasetFormatError, match=r":1: judged record needs keys \['prompt', 'candidates'\]"):
        build_judged_dataset(path)
    path = write_lines(tmp_path / "k.jsonl", ['{"prompt": "p", "candidates": [{"text": "a"}]}'])
    with pytest.raises(DatasetFormatError, match="candidate 0 needs keys"):
        build_judged_dataset(path)


def test_judged_best_vs_worst_and_skips():
    from opensloth.data.judged import judged_record_to_pair

    rec = {"prompt": "p", "candidates": [{"text": "a", "score": 0.2}, {"text": "b", "score": 0.9},
                                          {"text": "c", "score": 0.9}, {"text": "d", "score": 0.1}]}
    pair, reason = judged_record_to_pair(rec)
    assert reason is None and (pair["chosen"], pair["rejected"]) == ("b", "d")
    assert judged_record_to_pair({"prompt": "p", "candidates": [{"text": "a", "score": 1}]}) == (None, "single_candidate")
    tie = {"prompt": "p", "candidates": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]}
    assert judged_record_to_pair(tie) == (None, "tie")


# ---- preference pairs and clamping ---------------------------------------------------


def test_clamp_invariants_random():
    from opensloth.data.preference import clamp_preference_record

    rng = random.Random(0)
    for _ in range(3000):
        max_length = rng.randint(2, 64)
        mpl = rng.choice([None, rng.randint(1, 64)])
        min_prompt = rng.randint(0, 20)
        p = list(range(1000, 1000 + rng.randint(0, 80)))
        c = list(range(rng.randint(0, 80)))
        r = list(range(500, 500 + rng.randint(0, 80)))
        out = clamp_preference_record(p, c, r, max_length, mpl, min_prompt)
        assert len(out.prompt_ids) + len(out.chosen_ids) <= max_length
        assert len(out.prompt_ids) + len(out.rejected_ids) <= max_length
        capped = p if mpl is None else p[-mpl:] if mpl < len(p) else p
        assert out.prompt_ids == capped[len(capped) - len(out.prompt_ids):]  # a suffix: cut from the left
        assert out.chosen_ids == c[: len(out.chosen_ids)] and out.rejected_ids == r[: len(out.rejected_ids)]
        longest = max(len(c), len(r))
        if longest + min(len(capped), min_prompt, max_length - 1) <= max_length:
            # The completions fit next to the protected part of the prompt: they stay whole
            # and the prompt keeps all the room they leave.
            assert (out.chosen_ids, out.rejected_ids) == (c, r) and not out.completion_truncated
            assert len(out.prompt_ids) == min(len(capped), max_length - longest)
        assert out.prompt_truncated == (len(out.prompt_ids) < len(p))


def test_clamp_rejects_bad_budgets():
    from opensloth.data.preference import clamp_preference_record

    with pytest.raises(ValueError, match="max_length"):
        clamp_preference_record([1], [2], [3], max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length"):
        clamp_preference_record([1], [2], [3], max_length=8, max_prompt_length=0)


def test_tokenize_preference_dataset_reports_truncation(tokenizer):
    from opensloth.data import load_preference_dataset, tokenize_preference_dataset

    pairs, _ = load_preference_dataset(PREF_TRAIN, "train[:60]")
    out, report = tokenize_preference_dataset(pairs, tokenizer, max_length=64, max_prompt_length=32)
    lengths = [(len(p) + len(c), len(p) + len(r)) for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"])]
    assert max(max(pair) for pair in lengths) <= 64
    assert 0 < report.truncated < 60
    whole, report = tokenize_preference_dataset(pairs.select(range(3)), tokenizer, max_length=4096)
    assert report.truncated == 0
    first = whole[0]
    assert tokenizer.decode(first["chosen_ids"]) == pairs[0]["chosen"] + "<|im_end|>"
    assert tokenizer.decode(first["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_preference_pairs_missing_columns_and_empty(tmp_path):
    from opensloth.data import EmptyDatasetError, MissingColumnsError, load_preference_dataset

    path = write_lines(tmp_path / "p.jsonl", ['{"question": "q", "answer": "a"}'])
    with pytest.raises(MissingColumnsError) as err:
        load_preference_dataset(path)
    assert "['prompt', 'chosen', 'rejected']" in str(err.value) and "['question', 'answer']" in str(err.value)
    path = write_lines(tmp_path / "e.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "a"}'])
    with pytest.raises(EmptyDatasetError, match="identical_texts"):
        load_preference_dataset(path)


def test_sample_files_are_current():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_format_samples.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the format registry and the pipeline train_dpo.py, precompute_dataset.py and the OaK loop share ----


def _conversation(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": c} for r, c in zip(roles, turns)]


def test_chat_message_pairs_become_prompt_chosen_rejected():
    import datasets

    from opensloth.data import load_preference_dataset
    from opensloth.data.formats import detect_preference_format

    rows = [
        {"chosen": _conversation("hi", "hello", "2+2?", "4"), "rejected": _conversation("hi", "hello", "2+2?", "5")},
        {"chosen": _conversation("q", "same"), "rejected": _conversation("q", "same")},           # identical
        {"chosen": _conversation("q", "a"), "rejected": _conversation("other", "b")},             # no shared prompt
        {"chosen": _conversation("q", " "), "rejected": _conversation("q", "b")},                 # blank reply
        {"chosen": _conversation("q", "a", "more"), "rejected": _conversation("q", "b")},         # ends on a user turn
    ]
    ds = datasets.Dataset.from_list(rows)
    assert detect_preference_format(ds.column_names, ds[0]) == "chat_pairs"
    pairs, report = load_preference_dataset(ds)
    assert (report.total_in, report.total_out) == (5, 1)
    assert report.dropped == {"identical_texts": 1, "bad_structure": 2, "empty": 1}
    assert pairs[0] == {"prompt": _conversation("hi", "hello", "2+2?"),
                        "chosen": [{"role": "assistant", "content": "4"}],
                        "rejected": [{"role": "assistant", "content": "5"}]}


def test_registry_detects_each_format_in_priority_order():
    from opensloth.data.formats import PREFERENCE_FORMATS, detect_preference_format

    assert list(PREFERENCE_FORMATS) == ["judged_messages", "unjudged", "judged", "pairs", "chat_pairs", "hh",
                                        "prepared"]
    assert detect_preference_format(["prompt", "candidates", "id"]) == "judged"
    # dynamic-dpo-v1's judged rows have chosen / rejected message lists: not HH, not chat pairs
    assert detect_preference_format(["prompt_messages", "chosen", "rejected", "metadata"],
                                    {"chosen": [], "rejected": []}) == "judged_messages"
    assert detect_preference_format(["prompt_messages", "responses"]) == "unjudged"
    assert detect_preference_format(["prompt", "chosen", "rejected"]) == "pairs"
    assert detect_preference_format(["chosen", "rejected"], {"chosen": "\n\nHuman: a", "rejected": "x"}) == "hh"
    assert detect_preference_format(["chosen", "rejected"], {"chosen": [], "rejected": []}) == "chat_pairs"


def test_train_dpo_reads_hh_and_judged_files_through_the_same_pipeline(tmp_path):
    """load_preference_splits is what train_dpo.py calls: every format, a test split, first-N subsets."""
    import shutil

    from opensloth.data import load_preference_dataset, load_preference_splits

    train, val = load_preference_splits(HH_SAMPLE, train_samples=10, test_samples=3)
    assert len(train) == 10 and len(val) == 3 and sorted(train.column_names) == ["chosen", "prompt", "rejected"]
    assert train[:] == load_preference_dataset(HH_SAMPLE)[0].select(range(10))[:]
    train, val = load_preference_splits(JUDGED_SAMPLE)
    assert len(train) == 28 and val is None and {"prompt", "chosen", "rejected"} <= set(train.column_names)
    # A folder with train.jsonl / test.jsonl of pairs (the embedded default).
    train, val = load_preference_splits(os.path.dirname(PREF_TRAIN), train_samples=5, test_samples=2)
    assert (len(train), len(val)) == (5, 2)
    # An explicit format must fit: HH transcripts are no prompt/chosen/rejected pairs.
    from opensloth.data import MissingColumnsError

    with pytest.raises(MissingColumnsError):
        load_preference_splits(HH_SAMPLE, fmt="pairs")
    # A precompute_dataset.py folder is already tokenized: one clear error naming the raw source.
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "cache_metadata.json").write_text(json.dumps({"source": {"dataset": "data/preference"}}))
    with pytest.raises(UserInputError, match="already tokenized.*data/preference"):
        load_preference_splits(str(folder))
    shutil.rmtree(folder)


def test_rollout_pairs_become_conversational_for_a_chat_model():
    from opensloth.data import pairs_to_dataset

    pairs = [{"prompt": "What is 2 + 2?", "chosen": "Answer: 4", "rejected": "Answer: 5", "chosen_score": 1.0}]
    ds = pairs_to_dataset(pairs, as_messages=True)
    assert ds[0] == {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
                     "chosen": [{"role": "assistant", "content": "Answer: 4"}],
                     "rejected": [{"role": "assistant", "content": "Answer: 5"}]}
    assert pairs_to_dataset(pairs, as_messages=False)[0] == {"prompt": "What is 2 + 2?", "chosen": "Answer: 4",
                                                             "rejected": "Answer: 5"}


# ---- the dynamic-DPO repositories' data ------------------------------------------

EDGE = os.path.join(ROOT, "data", "formats", "hh_edge_cases.jsonl")
PROMPT_MESSAGES = os.path.join(ROOT, "data", "formats", "judged_prompt_messages.jsonl")
UNJUDGED = os.path.join(ROOT, "data", "formats", "rollout_responses.jsonl")


def test_hh_edge_cases_are_handled_and_counted_by_both_parsers():
    from opensloth.data import load_preference_dataset

    ds, report = load_preference_dataset(EDGE)
    assert report.dropped == {"identical_texts": 1, "no_assistant_turn": 1, "empty": 1}
    assert report.noted == {"multi_turn": 1, "prompt_text_in_reply": 1, "replies_span_turns": 1, "crlf_normalised": 2}
    assert ds[4]["chosen"] == " It read:\n\nAssistant: done."  # an Assistant tag inside the reply stays there

    ds, report = load_preference_dataset(EDGE, hh_parser="reference")
    assert report.dropped == {"no_assistant_turn": 1, "diverging_transcripts": 2, "crlf_in_rejected": 2, "empty": 1}
    assert report.examples["diverging_transcripts"] == [5, 6] and report.examples["crlf_in_rejected"] == [7, 8]
    assert report.noted == {"multi_turn": 1, "prompt_text_in_reply": 1, "identical_texts_kept": 1}
    rows = ds[:]
    assert rows["prompt"][1].endswith("\n\nHuman: And times 4?\n\nAssistant:")  # multi-turn: last reply only
    assert rows["chosen"][2] == " You said: Say: the sky is green. It is not."  # sliced, not str.replace
    assert rows["chosen"][3] == rows["rejected"][3] == " Hello."  # identical: kept, as the reference does
    assert (rows["chosen"][4], rows["rejected"][4]) == ("Hello there.", "Go away.")  # one leading newline cut


def test_reference_parser_matches_the_published_rules_on_every_record():
    """An independent statement of the reference rules: rfind on normalised chosen, startswith on raw rejected."""
    from opensloth.data.hh import parse_hh_record

    for line in open(EDGE, encoding="utf-8"):
        record = json.loads(line)
        chosen = record["chosen"].replace("\r\n", "\n").replace("\r", "\n")
        idx = chosen.rfind("\n\nAssistant:")
        expected = None
        if idx >= 0:
            prompt = chosen[:idx + len("\n\nAssistant:")]
            if record["rejected"].startswith(prompt):
                c = chosen[len(prompt):]
                r = record["rejected"][len(prompt):]
                c, r = (c[1:] if c.startswith("\n") else c), (r[1:] if r.startswith("\n") else r)
                if prompt.strip() and c.strip() and r.strip():
                    expected = (prompt, c, r)
        assert parse_hh_record(record["chosen"], record["rejected"], "reference")[0] == expected


def test_judged_prompt_messages_schema():
    from opensloth.data import load_preference_dataset

    ds, report = load_preference_dataset(PROMPT_MESSAGES)
    assert report.format == "judged_messages"
    assert (report.total_in, report.total_out) == (6, 3)
    assert report.dropped == {"identical_texts": 1, "bad_structure": 1, "empty": 1}
    assert ds[1] == {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a fruit.\n\nAssistant:",
                     "chosen": "Apple", "rejected": "A car"}  # system turn left out, replies stripped
    ds, report = load_preference_dataset(PROMPT_MESSAGES, hh_parser="reference", as_messages=True)
    assert report.total_out == 4 and report.noted["identical_texts_kept"] == 1
    assert ds[1]["prompt"][-1] == {"role": "user", "content": "Name a fruit."}
    assert ds[1]["chosen"] == [{"role": "assistant", "content": "Apple"}]


def test_refusals_name_what_was_seen(tmp_path):
    from opensloth.data import DatasetFormatError, load_preference_dataset

    with pytest.raises(DatasetFormatError, match=r"unjudged rollouts \(columns \['prompt_messages'"):
        load_preference_dataset(UNJUDGED)
    odd = write_lines(tmp_path / "odd.jsonl", [json.dumps({"chosen": 1, "rejected": 2})])
    with pytest.raises(DatasetFormatError, match=r"odd.jsonl: saw columns \['chosen', 'rejected'\] with first-row "
                                                  r"types \{'chosen': 'int', 'rejected': 'int'\}"):
        load_preference_dataset(odd)


def test_val_ratio_split_and_stage_report(caplog):
    import logging

    from opensloth.data import load_preference_splits

    with caplog.at_level(logging.INFO, logger="opensloth"):
        train, val = load_preference_splits(HH_SAMPLE, val_ratio=0.25, split_seed=7, hh_parser="reference",
                                            train_samples=20)
    assert (len(train), len(val)) == (20, 11)  # 41 pairs -> 30 / 11, then the first 20 training pairs
    again, val_again = load_preference_splits(HH_SAMPLE, val_ratio=0.25, split_seed=7, hh_parser="reference")
    assert val_again[:] == val[:] and again.select(range(20))[:] == train[:]  # seeded: the same split
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preference data")][0]
    assert ("split train: 44 read -> format hh: 41 kept (dropped: 1 diverging_transcripts, 1 empty, "
            "1 no_assistant_turn)") in line
    assert "val_ratio 0.25 (seed 7) -> 30 train / 11 eval" in line and "train_samples 20" in line
    assert line.endswith("=> 20 train, 11 eval")


def test_raw_hh_from_a_parquet_file(tmp_path):
    """The same HH records as Parquet (what a hub snapshot of Anthropic/hh-rlhf holds): the same pairs and counts."""
    import datasets

    from opensloth.data import load_preference_dataset

    path = str(tmp_path / "hh.parquet")
    datasets.load_dataset("json", data_files=EDGE, split="train").to_parquet(path)
    from_jsonl, jsonl_report = load_preference_dataset(EDGE, hh_parser="reference")
    from_parquet, parquet_report = load_preference_dataset(path, hh_parser="reference")
    assert from_parquet[:] == from_jsonl[:]
    assert (parquet_report.dropped, parquet_report.noted) == (jsonl_report.dropped, jsonl_report.noted)
def test_pairs_identical_after_clamping_are_dropped_and_counted(tokenizer):
    """Texts that differ only past the token budget become identical ids: dropped, as train_dpo drops them."""
    import datasets

    from opensloth.data import tokenize_preference_dataset

    shared = "word " * 40
    pairs = datasets.Dataset.from_list([
        {"prompt": "q1", "chosen": shared + "yes", "rejected": shared + "no"},  # differ after 40 words
        {"prompt": "q2", "chosen": "short yes", "rejected": "short no"},
    ])
    out, report = tokenize_preference_dataset(pairs, tokenizer, max_length=24, min_prompt_tokens=4)
    assert report.dropped == {"identical_after_truncation": 1} and report.examples["identical_after_truncation"] == [0]
    assert len(out) == 1 and out[0]["chosen_ids"] != out[0]["rejected_ids"]
    assert "1 dropped (identical_after_truncation)" in report.summary()
    whole, report = tokenize_preference_dataset(pairs, tokenizer, max_length=512)
    assert len(whole) == 2 and not report.dropped
