"""opensloth.dpo.collator: pairs fit the token budget, the prompt gives way from the left."""

from __future__ import annotations


def test_truncate_pair_cuts_the_prompt_from_the_left():
    from opensloth.dpo.collator import truncate_pair

    p, c, r = truncate_pair([1, 2, 3, 4, 5], [6, 7], [8, 9, 10], 6)
    assert (p, c, r) == ([3, 4, 5], [6, 7], [8, 9, 10])  # budget 6 - max(2, 3) = 3 prompt tokens
    assert truncate_pair([1, 2], [3], [4], 6) == ([1, 2], [3], [4])  # fits: unchanged
    p, c, r = truncate_pair([1, 2, 3], [4, 5, 6, 7, 8], [9], 4)  # completion alone too long
    assert p == [] and c == [4, 5, 6, 7] and r == [9]
    for max_len in range(1, 12):
        p, c, r = truncate_pair(list(range(7)), [1] * 3, [2] * 5, max_len)
        assert len(p) + len(c) <= max_len and len(p) + len(r) <= max_len


def test_count_prompt_truncations_reports_what_the_collator_will_cut():
    from opensloth.dpo.collator import count_prompt_truncations

    columns = {
        "prompt_ids": [[1] * 3, [1] * 10, [1] * 2],
        "chosen_ids": [[2] * 2, [2] * 2, [2] * 9],
        "rejected_ids": [[3] * 4, [3] * 1, [3] * 1],
    }
    assert count_prompt_truncations(columns, 8) == {
        "pairs": 3, "prompt_truncated": 1, "completion_truncated": 1, "max_pair_length": 12}
    assert count_prompt_truncations(columns, None)["prompt_truncated"] == 0


def test_left_truncating_collator_keeps_the_prompt_tail():
    from opensloth.dpo.collator import LeftTruncatingPreferenceCollator

    collate = LeftTruncatingPreferenceCollator(pad_token_id=0, max_length=6)
    batch = collate([{"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [6, 7], "rejected_ids": [8, 9, 10]}])
    chosen, rejected = batch["input_ids"].tolist()
    assert chosen[:5] == [3, 4, 5, 6, 7] and rejected == [3, 4, 5, 8, 9, 10]  # same prompt tail for both
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_drop_identical_pairs_after_the_fit():
    import datasets

    from opensloth.dpo.collator import drop_identical_pairs

    ds = datasets.Dataset.from_dict({
        "prompt_ids": [[1, 2], [1, 2], [1] * 6],
        "chosen_ids": [[5, 6, 7, 8], [5, 6], [5, 9]],
        "rejected_ids": [[5, 6, 7, 9], [5, 7], [5, 8]],
    })
    # max_length 3: completions are cut to [5, 6, 7] in pair 0 (identical); pair 1 and 2 still differ.
    kept, dropped = drop_identical_pairs(ds, 3)
    assert dropped == 1 and kept["chosen_ids"] == [[5, 6], [5, 9]]
    assert drop_identical_pairs(ds, None)[1] == 0
    # TRL's keep_start cut of prompt + completion to 4: pair 0 keeps [1, 2, 5, 6] twice, pair 2 only its prompt.
    kept, dropped = drop_identical_pairs(ds, 4, left_truncate=False)
    assert dropped == 2 and kept["chosen_ids"] == [[5, 6]]
