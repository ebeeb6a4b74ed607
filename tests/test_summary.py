"""opensloth.summary: the end-of-run summary from a trainer's log_history."""

from __future__ import annotations

from opensloth.summary import RunSummary, format_duration, loss_endpoints, next_commands_for, render, total_tokens

HISTORY = [
    {"loss": 2.0, "step": 1, "num_tokens": 100.0},
    {"loss": 1.5, "step": 2, "num_tokens": 210.0},
    {"eval_loss": 1.7, "step": 2},
    {"loss": 1.25, "step": 3, "num_tokens": 300.0},
    {"loss": 1.0, "step": 4, "num_tokens": 420.0},
    {"train_runtime": 3.0, "step": 4},
]


def test_loss_endpoints_use_a_window_at_the_end():
    first, last, window = loss_endpoints(HISTORY, window_fraction=0.5)
    assert first == (1, 2.0) and window == 2 and last == (4, (1.25 + 1.0) / 2)
    assert loss_endpoints(HISTORY)[1:] == ((4, 1.0), 1)  # 10% of 4 losses rounds down to one step
    assert loss_endpoints([{"eval_loss": 1.0, "step": 1}]) == (None, None, 0)
    assert loss_endpoints([{"loss": float("nan"), "step": 1}, {"loss": 3.0, "step": 2}])[0] == (2, 3.0)


def test_total_tokens_and_duration():
    assert total_tokens(HISTORY) == 420 and total_tokens([{"loss": 1.0}]) is None
    assert format_duration(12.34) == "12.3s" and format_duration(75.2) == "1m 15s"
    assert format_duration(3 * 3600 + 125) == "3h 02m"


def test_render_shows_every_part_and_the_next_commands():
    first, last, window = loss_endpoints(HISTORY, window_fraction=0.5)
    text = render(RunSummary(
        task="SFT", run_dir="outputs/my run_ws2", world_size=2, steps=4, seconds=20.0, samples=64, tokens=420,
        first_loss=first, last_loss=last, last_loss_window=window, eval_before=2.0, eval_after=1.5,
        eval_what="64 conversations", lines=[("exact match", "10% -> 60% (32 prompts)")],
        saved="LoRA adapter, PEFT format", tensorboard_dir="outputs/my run_ws2/runs",
        next_commands=next_commands_for("outputs/my run_ws2", adapter=True), warnings=["3 conversations truncated"]))
    lines = text.splitlines()
    assert lines[0] == "== SFT finished: 4 steps in 20.0s on 2 rank(s) =="
    assert "3.2 samples/s, 21 tokens/s (64 samples, 420 tokens)" in text
    assert "2 (step 1) -> 1.125 (mean of the last 2 steps)" in text
    assert "2 -> 1.5 (-25.0%) on 64 conversations" in text
    assert "exact match" in text and "warning: 3 conversations truncated" in text
    nxt = lines[lines.index("next:") + 1:]
    assert nxt[0] == "  python -m opensloth.chat --model 'outputs/my run_ws2' --compare_base --prompt 'What is 12 + 7?'"
    assert nxt[1] == "  python -m opensloth.export 'outputs/my run_ws2' 'outputs/my run_ws2_merged'"
    assert nxt[2] == "  tensorboard --logdir 'outputs/my run_ws2/runs'"


def test_render_skips_what_is_unknown():
    text = render(RunSummary(task="DPO", run_dir="r", steps=0, seconds=0.0))
    assert text == "== DPO finished: 0 steps in 0.0s on 1 rank(s) =="
    full = next_commands_for("r", adapter=False, has_tensorboard=False)
    assert full == ["python -m opensloth.chat --model r --prompt 'What is 12 + 7?'"]
