"""The short summary every training run ends with: what happened, where it went, what to run next.

Pure functions over the trainer's ``log_history`` and a few numbers the
entry point knows; rank 0 prints the result. Nothing here imports torch.

The shape of it (numbers made up; README.md shows a real run)::

    == SFT finished: 125 steps in 2m 51s on 2 rank(s) ==
      throughput     11.7 samples/s, 2,150 tokens/s (2,000 samples, 367,912 tokens)
      train loss     1.821 (step 1) -> 1.402 (mean of the last 12 steps)
      held-out loss  1.799 -> 1.351 (-24.9%) on 64 conversations of data/sft (test split)
      exact match    recall 9% -> 66% (32 held-out prompts)
      adapter        outputs/sft_ws2   (LoRA, PEFT format)
      TensorBoard    outputs/sft_ws2/runs
    next:
      python -m opensloth.chat --model outputs/sft_ws2 --compare_base --prompt "..."
      python -m opensloth.export outputs/sft_ws2 outputs/sft_ws2_merged
      tensorboard --logdir outputs/sft_ws2/runs
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field


@dataclass
class RunSummary:
    """Everything the end-of-run summary shows; fields left None are skipped."""

    task: str
    run_dir: str
    world_size: int = 1
    steps: int = 0
    seconds: float = 0.0
    samples: int | None = None  # training examples seen (samples for SFT, pairs for DPO)
    unit: str = "samples"
    tokens: int | None = None
    first_loss: tuple[int, float] | None = None
    last_loss: tuple[int, float] | None = None
    last_loss_window: int = 1
    eval_before: float | None = None
    eval_after: float | None = None
    eval_what: str = ""
    lines: list[tuple[str, str]] = field(default_factory=list)  # task-specific rows: ("exact match", "...")
    saved: str | None = None  # what run_dir holds: "LoRA, PEFT format", "full model", ...
    tensorboard_dir: str | None = None
    next_commands: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1m 15s``; under a minute: ``12.3s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def train_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """``[(step, loss)]`` of the logged training losses (finite values only), in step order."""
    out = [(int(r["step"]), float(r["loss"])) for r in log_history
           if "loss" in r and "step" in r and isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"])]
    return sorted(out)


def loss_endpoints(log_history: list[dict], window_fraction: float = 0.1) -> tuple[tuple[int, float] | None,
                                                                                    tuple[int, float] | None, int]:
    """First logged loss, and the mean of the last ``window_fraction`` of logged losses (at least one).

    Returns ``(first, last, window)`` where ``last`` is ``(last step, mean over the window)``; single
    steps are noisy, so the end of a run is judged on a window.
    """
    losses = train_losses(log_history)
    if not losses:
        return None, None, 0
    window = max(1, int(len(losses) * window_fraction))
    tail = losses[-window:]
    return losses[0], (tail[-1][0], sum(v for _, v in tail) / window), window


def total_tokens(log_history: list[dict]) -> int | None:
    """Tokens trained on, from TRL's ``num_tokens`` log entries (None when not logged)."""
    values = [r["num_tokens"] for r in log_history if isinstance(r.get("num_tokens"), (int, float))]
    return int(max(values)) if values else None


def next_commands_for(run_dir: str, *, adapter: bool, has_tensorboard: bool = True, prompt: str | None = None) -> list[str]:
    """The exact commands a user runs next: chat with the result, merge/export it, open TensorBoard."""
    q = shlex.quote
    example = prompt or "What is 12 + 7?"
    out = []
    if adapter:
        out.append(f"python -m opensloth.chat --model {q(run_dir)} --compare_base --prompt {q(example)}")
        out.append(f"python -m opensloth.export {q(run_dir)} {q(run_dir.rstrip(os.sep) + '_merged')}")
    else:
        out.append(f"python -m opensloth.chat --model {q(run_dir)} --prompt {q(example)}")
    if has_tensorboard:
        out.append(f"tensorboard --logdir {q(os.path.join(run_dir, 'runs'))}")
    return out


def render(s: RunSummary) -> str:
    """The summary as text: a header line, aligned rows, then the next commands."""
    rows: list[tuple[str, str]] = []
    if s.seconds > 0:
        parts = []
        if s.samples:
            parts.append(f"{s.samples / s.seconds:,.1f} {s.unit}/s")
        if s.tokens:
            parts.append(f"{s.tokens / s.seconds:,.0f} tokens/s")
        totals = ", ".join(x for x in (f"{s.samples:,} {s.unit}" if s.samples else "",
                                       f"{s.tokens:,} tokens" if s.tokens else "") if x)
        if parts:
            rows.append(("throughput", ", ".join(parts) + (f" ({totals})" if totals else "")))
    if s.first_loss and s.last_loss:
        how = f"mean of the last {s.last_loss_window} steps" if s.last_loss_window > 1 else f"step {s.last_loss[0]}"
        rows.append(("train loss", f"{s.first_loss[1]:.4g} (step {s.first_loss[0]}) -> {s.last_loss[1]:.4g} ({how})"))
    if s.eval_before is not None and s.eval_after is not None:
        change = (s.eval_after - s.eval_before) / s.eval_before * 100 if s.eval_before else float("nan")
        rows.append(("held-out loss", f"{s.eval_before:.4g} -> {s.eval_after:.4g} ({change:+.1f}%)"
                                      + (f" on {s.eval_what}" if s.eval_what else "")))
    elif s.eval_after is not None:
        rows.append(("held-out loss", f"{s.eval_after:.4g}" + (f" on {s.eval_what}" if s.eval_what else "")))
    rows.extend(s.lines)
    if s.saved:
        rows.append(("saved", f"{s.run_dir}   ({s.saved})"))
    if s.tensorboard_dir:
        rows.append(("TensorBoard", s.tensorboard_dir))
    width = max((len(k) for k, _ in rows), default=0)
    head = f"== {s.task} finished: {s.steps} steps in {format_duration(s.seconds)} on {s.world_size} rank(s) =="
    text = [head] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    text += [f"  warning: {w}" for w in s.warnings]
    if s.next_commands:
        text.append("next:")
        text += [f"  {c}" for c in s.next_commands]
    return "\n".join(text)
