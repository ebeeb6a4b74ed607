"""opensloth.data.chat on the shipped chat data: text and token modes, masks, truncation, drops."""

from __future__ import annotations

import pytest

from helpers import SFT_DIR


# ---- chat ------------------------------------------------------------------


def test_chat_text_mode_matches_chat_template(tokenizer):
    from opensloth.data import load_records, prepare_chat_dataset

    raw = load_records(SFT_DIR, "train[:40]")
    out, report = prepare_chat_dataset(raw, tokenizer, mode="text", keep_columns=["source"])
    assert report.total_in == 40 and report.total_out == 40
    assert out.column_names == ["source", "text"]
    for row, text in zip(raw, out["text"]):
        assert text == tokenizer.apply_chat_template(row["messages"], tokenize=False)


def _label_runs(labels):
    runs, current = [], []
    for tok in labels:
        if tok == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        runs.append(current)
    return runs


def test_chat_tokens_assistant_only_labels_cover_exactly_the_replies(tokenizer):
    from opensloth.data import load_records, prepare_chat_dataset

    raw = load_records(SFT_DIR, "train[:30]")
    out, report = prepare_chat_dataset(raw, tokenizer, mode="tokens", assistant_only=True)
    assert report.total_out == 30 and report.truncated == 0
    for row, ids, labels in zip(raw, out["input_ids"], out["labels"]):
        assert len(ids) == len(labels)
        assert all(lab in (-100, tok) for tok, lab in zip(ids, labels))
        replies = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in _label_runs(labels)] == replies


def test_chat_tokens_truncation_and_too_long_counts(tokenizer):
    from opensloth.data import load_records, prepare_chat_dataset
    from opensloth.data.chat import tokenize_messages

    raw = load_records(SFT_DIR, "train[:60]")
    limit = 40
    out, report = prepare_chat_dataset(raw, tokenizer, mode="tokens", assistant_only=True, max_seq_length=limit)
    # Brute force the expected counts from the untruncated tokenization.
    expect_truncated = expect_too_long = 0
    for row in raw:
        labels = tokenize_messages(row["messages"], tokenizer, assistant_only=True)["labels"]
        if len(labels) > limit:
            if all(x == -100 for x in labels[:limit]):
                expect_too_long += 1
            else:
                expect_truncated += 1
    assert expect_too_long > 0 and expect_truncated > 0  # the limit exercises both paths
    assert report.dropped.get("too_long", 0) == expect_too_long
    assert report.truncated == expect_truncated
    assert len(out) == 60 - expect_too_long
    assert max(len(ids) for ids in out["input_ids"]) <= limit


def test_chat_bad_structure_empty_and_errors(tokenizer):
    import datasets

    from opensloth.data import EmptyDatasetError, MissingColumnsError, prepare_chat_dataset

    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ds = datasets.Dataset.from_list([
        {"messages": ok},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": None, "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]},
        {"messages": []},
    ])
    out, report = prepare_chat_dataset(ds, tokenizer, mode="tokens")
    assert len(out) == 1
    assert report.dropped == {"bad_structure": 2, "empty": 3}
    assert report.examples["bad_structure"] == [1, 2]

    with pytest.raises(MissingColumnsError) as err:
        prepare_chat_dataset(ds.rename_column("messages", "turns"), tokenizer)
    assert "['messages']" in str(err.value) and "['turns']" in str(err.value)

    with pytest.raises(EmptyDatasetError, match="empty after filtering"):
        prepare_chat_dataset(ds.select([3, 4, 5]), tokenizer)


def test_chat_sharegpt_conversations(tokenizer):
    import datasets

    from opensloth.data import prepare_chat_dataset

    ds = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    out, _ = prepare_chat_dataset(ds, tokenizer, mode="text")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert out["text"] == [tokenizer.apply_chat_template(messages, tokenize=False)]


def test_assistant_only_needs_generation_markers(tokenizer):
    import copy

    import datasets

    from opensloth.data import prepare_chat_dataset

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = tokenizer.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match="generation"):
        prepare_chat_dataset(ds, plain, mode="tokens", assistant_only=True)




def test_count_truncated_reports_what_the_trainer_cuts(tokenizer):
    from opensloth.data import load_records
    from opensloth.data.chat import count_truncated, truncation_message

    raw = load_records(SFT_DIR, "train[:40]").select_columns(["messages"])
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
               for m in raw["messages"]]
    limit = sorted(lengths)[len(lengths) // 2]
    report = count_truncated(raw, tokenizer, limit, batch_size=16)
    assert report == {"records": 40, "truncated": sum(n > limit for n in lengths), "longest": max(lengths),
                      "max_seq_length": limit}
    line = truncation_message(report)
    assert f"{report['truncated']} of 40" in line and f"longest: {max(lengths)}" in line and "--max_seq_length" in line
    assert truncation_message(count_truncated(raw, tokenizer, max(lengths))) is None


def test_count_truncated_reads_prompt_completion_rows(tokenizer):
    """TRL's prompt/completion layout (the OaK warm-up's data) is counted joined; other layouts are not counted."""
    import datasets

    from opensloth.data.chat import count_truncated

    texts = datasets.Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": " Answer: 4" * n} for n in (1, 40)])
    joined = [len(tokenizer(p + c)["input_ids"]) for p, c in zip(texts["prompt"], texts["completion"])]
    assert count_truncated(texts, tokenizer, min(joined)) == {"records": 2, "truncated": 1, "longest": max(joined),
                                                              "max_seq_length": min(joined)}
    turn = [{"role": "user", "content": "Hi"}]
    chats = datasets.Dataset.from_list([{"prompt": turn, "completion": [{"role": "assistant", "content": "Hello"}]}])
    whole = len(tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": "Hello"}], tokenize=True,
                                              return_dict=True)["input_ids"])
    assert count_truncated(chats, tokenizer, whole - 1)["truncated"] == 1
    assert count_truncated(datasets.Dataset.from_list([{"question": "x"}]), tokenizer, 8) is None
