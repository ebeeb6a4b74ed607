"""Judges score candidates; :func:`judge_traces` turns rollouts into judged JSONL records.

A judge is any object with a ``name`` and ``score(prompt, completions) ->
list of numbers`` (higher is better), called once per prompt with the
completions of that prompt (prompt prefix already stripped). Shipped:

- :class:`VerifierJudge` -- 1.0 when the final answer (``Answer: ...``) is
  right, else 0.0, for the tasks of :mod:`opensloth.tasks`
  (arithmetic, string and list tasks, the ProntoQA-style true/false task). The
  correct answer is recomputed from the prompt text.
- :class:`RewardModelJudge` -- any ``AutoModelForSequenceClassification``
  checkpoint; the score is one logit of ``[prompt, completion]`` rendered with
  the reward model's chat template (or ``prompt + "\\n" + completion``).
- ``module:function`` -- a callable with the ``score`` signature (see :func:`make_judge`).

Output records follow :mod:`opensloth.data.judged` (schema version 1), so the
loader that builds best-vs-worst pairs reads them unchanged. A judge that
returns something other than one finite number per completion stops the run
with a :class:`JudgeError` naming the judge, the prompt and the value.
"""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Callable, Protocol

from opensloth.data.judged import validate_judged_record
from opensloth.errors import UserInputError
from opensloth.rollout.traces import strip_prompt_prefix
from opensloth.tasks import TASK_KINDS, check_answer, solve

PROMPT_MISMATCH = "prompt_mismatch"


class JudgeError(UserInputError):
    """A judge returned unusable scores, or cannot judge a prompt."""


class Judge(Protocol):
    name: str

    def score(self, prompt: str, completions: list[str]) -> list[float]: ...


class VerifierJudge:
    """Exact-answer verifier for the synthetic tasks.

    Args:
        kind: a task kind of :data:`opensloth.tasks.TASK_KINDS`, or
            ``None`` to detect the kind of every prompt from its text.
    """

    def __init__(self, kind: str | None = None):
        if kind is not None and kind not in TASK_KINDS:
            raise UserInputError(f"verifier task kind {kind!r} is not one of {TASK_KINDS}")
        self.kind = kind
        self.name = f"verifier:{kind or 'auto'}"

    def score(self, prompt: str, completions: list[str]) -> list[float]:
        try:
            solve(self.kind, prompt)
        except ValueError as exc:
            raise JudgeError(
                f"the {self.name} judge cannot check prompt {prompt[:80]!r}: {exc}; pass the matching "
                "--dataset-type (or 'synthetic' to detect the kind per prompt), or use a reward-model judge"
            ) from None
        return [1.0 if check_answer(self.kind, prompt, text) else 0.0 for text in completions]


class RewardModelJudge:
    """Score ``[prompt, completion]`` with a sequence-classification model.

    Args:
        path: a checkpoint folder (or hub id) loadable by
            ``AutoModelForSequenceClassification``; its tokenizer is loaded from the same place.
        device: where to run it.
        label_index: which logit is the score; default 0 for a one-label
            reward head, the last label otherwise.
        batch_size: completions per forward pass.
        max_length: token budget per scored text (longer texts keep their end).
    """

    def __init__(self, path: str, device="cpu", label_index: int | None = None, batch_size: int = 16,
                 max_length: int = 1024):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"could not load reward model {path!r}: {first}") from exc
        self.model.to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            # Sequence-classification heads pool the last non-pad token; they need to know the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        num_labels = self.model.config.num_labels
        self.label_index = (0 if num_labels == 1 else num_labels - 1) if label_index is None else label_index
        if not 0 <= self.label_index < num_labels:
            raise UserInputError(f"reward model {path!r} has {num_labels} labels; label index "
                                 f"{self.label_index} is out of range")
        self.tokenizer.truncation_side = "left"
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.name = f"reward_model:{path}"

    def render(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        return f"{prompt}\n{completion}"

    def score(self, prompt: str, completions: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            texts = [self.render(prompt, c) for c in completions[start:start + self.batch_size]]
            templated = bool(getattr(self.tokenizer, "chat_template", None))  # the template holds its own tokens
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=not templated)
            with torch.no_grad():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            scores.extend(logits[:, self.label_index].float().cpu().tolist())
        return scores


class CallableJudge:
    """Wrap a function ``(prompt, completions) -> scores`` as a judge."""

    def __init__(self, fn: Callable[[str, list[str]], list[float]], name: str):
        self.fn = fn
        self.name = name

    def score(self, prompt: str, completions: list[str]) -> list[float]:
        return self.fn(prompt, completions)


def make_judge(spec: str, *, dataset_type: str = "synthetic", reward_model: str | None = None,
               device="cpu", label_index: int | None = None) -> Judge:
    """Build the judge named by ``spec``.

    Args:
        spec: ``"verifier"``, ``"reward_model"`` or ``"package.module:function"``.
        dataset_type: for the verifier: a task kind, or ``"synthetic"`` (detect per prompt).
        reward_model: the checkpoint of ``"reward_model"``.

    Raises:
        UserInputError: unknown spec, missing reward model, or an import that fails.
    """
    if spec == "verifier":
        return VerifierJudge(None if dataset_type == "synthetic" else dataset_type)
    if spec == "reward_model":
        if not reward_model:
            raise UserInputError("--judge reward_model needs --reward-model <sequence-classification checkpoint>")
        return RewardModelJudge(reward_model, device=device, label_index=label_index)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserInputError(f"--judge {spec!r}: cannot import {attr!r} from {module_name!r} ({exc})") from None
        if not callable(fn):
            raise UserInputError(f"--judge {spec!r} is not callable")
        return CallableJudge(fn, name=spec)
    raise UserInputError(f"--judge {spec!r} must be 'verifier', 'reward_model' or 'package.module:function'")


def check_scores(scores, n: int, judge_name: str, prompt_id: str) -> list[float]:
    """One finite real number per completion, as floats; otherwise a :class:`JudgeError`."""
    if not isinstance(scores, (list, tuple)) or len(scores) != n:
        got = f"{len(scores)} scores" if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise JudgeError(f"judge {judge_name!r} returned {got} for the {n} candidates of prompt {prompt_id!r}; "
                         "it must return one number per candidate")
    out = []
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(float(score)):
            raise JudgeError(f"judge {judge_name!r} returned a non-numeric score {score!r} for candidate {i} of "
                             f"prompt {prompt_id!r}; scores must be finite numbers")
        out.append(float(score))
    return out


def judge_traces(records: list[dict], judge: Judge) -> tuple[list[dict], dict]:
    """Strip each trace's prompt, score the completions, and emit judged records.

    Args:
        records: rollout records (see :mod:`opensloth.rollout.traces`).
        judge: the judge.

    Returns:
        ``(judged_records, counts)``: records in the :mod:`opensloth.data.judged`
        schema (plus ``index``), and ``{"prompts", "candidates", "scored",
        "prompt_mismatch", "mean_score"}``. A candidate whose trace does not
        start with its prompt is left out and counted; a prompt left with
        fewer than two candidates is later skipped (and counted) by the pair builder.

    Raises:
        JudgeError: the judge returned unusable scores.
    """

    judged, mismatched, scored, total = [], 0, [], 0
    for record in records:
        texts, kept = [], []
        for cand in record["candidates"]:
            total += 1
            try:
                texts.append(strip_prompt_prefix(cand["trace"], record["prompt_text"]))
            except ValueError:
                mismatched += 1
                continue
            kept.append(cand)
        scores = check_scores(judge.score(record["prompt"], texts) if texts else [], len(texts), judge.name,
                              record["id"])
        scored.extend(scores)
        out = {"id": record["id"], "index": record["index"], "prompt": record["prompt"], "candidates": [
            {"text": text, "score": score, "judge": judge.name, "sample": cand["sample"], "finish": cand["finish"]}
            for text, score, cand in zip(texts, scores, kept)
        ]}
        validate_judged_record(out)
        judged.append(out)
    counts = {"prompts": len(records), "candidates": total, "scored": len(scored), PROMPT_MISMATCH: mismatched,
              "mean_score": sum(scored) / len(scored) if scored else None}
    return judged, counts
