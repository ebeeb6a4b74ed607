"""In-process stages of scripts/gpu_check.py (one ``import unsloth`` for several stages).

    python scripts/gpu_check_worker.py --events W/perf.jsonl --stages sft_throughput,four_bit,packing \
        --model W/qwen3-0.6b-random --tiny data/tiny-qwen3 --work W [--dry-run]

Run by the driver, not by hand. Each stage appends a ``start`` and an ``end``
event (status, seconds, figures, one-line error) to ``--events`` as it
finishes, so a later crash or kill still leaves the earlier figures. A stage
that overruns its ``--timeout_<stage>`` writes a ``timeout`` event and the
process exits at once (a hung CUDA call cannot be interrupted otherwise); the
driver starts a fresh worker for the stages left.

Stages:

- ``sft_throughput``: LoRA SFT on the random-init model with Unsloth's path,
  four configurations on the same samples: Unsloth alone, Unsloth with
  ``UNSLOTH_TOKEN_BALANCE=1``, opensloth's batch patch with
  ``layout="varlen"`` and with ``layout="padded"`` (what ``"auto"`` picks
  here is recorded). Each configuration is warmed up once over the same steps
  (Unsloth compiles its transformer blocks per new shape), then the
  configurations are alternated. Tokens/s = real tokens / seconds over the
  measured steps (the first of each run left out), after leaving out steps
  slower per token than 2.5x the run's median (recompiles; counted). Peak
  memory, per-step losses.
- ``four_bit``: the same SFT with ``load_in_4bit=True`` (needs bitsandbytes
  and CUDA), Unsloth alone: a warm-up run, then one measured run if time allows.
- ``packing``: opensloth's micro-batches (``build_micro_batch``, the layouts
  the batch patch feeds Unsloth: varlen, and right-padded rows with and
  without their mask) against per-sequence forwards on the tiny pretrained
  model, plus two leaking packings that must differ.

Before its measured runs ``sft_throughput`` waits (``--quiet_wait`` seconds
at most) for ``--quiet_file``, which the driver writes once the stages it
runs alongside (two_ranks, dpo) have ended, so the timed steps have the
device to themselves; the wait is recorded, and so is measuring without it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("sft_throughput", "packing", "four_bit")
CONFIGS = ("unsloth", "unsloth_token_balance", "opensloth_varlen", "opensloth_padded")
PATCH_LAYOUT = {"opensloth_varlen": "varlen", "opensloth_padded": "padded"}
OUTLIER_FACTOR = 2.5  # a step slower per token than this x the run's median is a recompile, left out
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Packed vs per-sequence log-probs in bf16: shapes change the matmul blocking, so token log-probs
# differ by rounding (max over tokens). Measured: 0.056 on CPU (tiny pretrained base, Unsloth's CPU
# backend, tests/test_packing_model.py); 0.17248 on an H200 (2026-11-28, bf16, torch SDPA, Unsloth's
# fast forward). A cross-sequence leak gives > 8 on both (8.5 naive concatenation, 12.1 one-document
# lengths on the H200). HONEST_TOL sits ~3x above the GPU figure and 16x below a leak; LEAK_MIN is
# what a leaking packing must at least reach.
HONEST_TOL = 0.5
LEAK_MIN = 1.0


class Events:
    """Append-only JSONL of stage events; every line is flushed and fsynced."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()

    def write(self, **record) -> None:
        record["t"] = time.time()
        with self.lock, open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class StageClock:
    """The running stage's deadline, which a waiting stage may extend (never past the worker's own).

    A watchdog thread calls ``on_expiry`` once the deadline passes: a hung CUDA call cannot be
    interrupted otherwise, so the callback ends the process.
    """

    def __init__(self, seconds: float, on_expiry, hard_deadline: float | None = None):
        self.hard = hard_deadline  # time.time() of the worker's end, from --deadline
        self.deadline = time.time() + seconds
        if self.hard is not None:
            self.deadline = min(self.deadline, self.hard)
        self.on_expiry = on_expiry
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(0.5):
            if time.time() > self.deadline:
                self.on_expiry()
                return

    def left(self) -> float:
        return self.deadline - time.time()

    def extend(self, seconds: float) -> None:
        self.deadline += seconds
        if self.hard is not None:
            self.deadline = min(self.deadline, self.hard)

    def stop(self) -> None:
        self.stopped.set()


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:400] if text else type(exc).__name__


def lognormal_lengths(n: int, seed: int, median: float, sigma: float, cap: int, floor: int = 16) -> list[int]:
    """Deterministic lognormal token lengths, clipped to [floor, cap]."""
    rng = random.Random(seed)
    return [int(min(cap, max(floor, round(math.exp(math.log(median) + sigma * rng.gauss(0.0, 1.0))))))
            for _ in range(n)]


def chat_token_samples(tokenizer, lengths: list[int], seed: int, vocab_size: int) -> list[list[int]]:
    """Chat-shaped token sequences of exactly the given lengths.

    Each is ``<|im_start|>user\\n`` + prompt + ``<|im_end|>\\n<|im_start|>assistant\\n`` + reply +
    ``<|im_end|>``, with prompt and reply drawn uniformly from the model's vocabulary (pad id
    excluded, so counting non-pad tokens counts real tokens). Throughput does not depend on which
    ids are drawn; the chat framing keeps the sequences shaped like the data users train on.
    """
    rng = random.Random(seed)
    user = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    mid = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1
    fixed = len(user) + len(mid) + len(end)
    out = []
    for length in lengths:
        body = max(2, length - fixed)
        prompt_len = max(1, body // 3)
        ids = []
        while len(ids) < body:
            t = rng.randrange(vocab_size)
            if t != pad:
                ids.append(t)
        out.append(user + ids[:prompt_len] + mid + ids[prompt_len:] + end)
    return out


class StepMeter:
    """Wall time and real tokens per optimizer step (TrainerCallback + forward pre-hook)."""

    def __init__(self, model, cuda: bool):
        import torch
        from transformers import TrainerCallback

        self.cuda = cuda
        self.tokens_now = 0
        self.step_ends: list[float] = []
        self.step_tokens: list[int] = []
        meter = self

        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            if not (module.training and isinstance(ids, torch.Tensor)):
                return
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                meter.tokens_now += int(mask.sum())  # padded rows
            else:
                meter.tokens_now += int(ids.numel())  # padding-free / packed rows: every token is real

        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter._sync()
                meter.step_ends = [time.perf_counter()]
                meter.tokens_now = 0

            def on_step_end(self, args, state, control, **kw):
                meter._sync()
                meter.step_ends.append(time.perf_counter())
                meter.step_tokens.append(meter.tokens_now)
                meter.tokens_now = 0

        self.callback = _Callback()

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def close(self):
        self.handle.remove()

    def summary(self, skip: int) -> dict:
        times = [b - a for a, b in zip(self.step_ends[:-1], self.step_ends[1:])]
        out = robust_rate(times[skip:], self.step_tokens[skip:])
        out.update(steps=len(times), step_seconds=[round(x, 4) for x in times], step_tokens=self.step_tokens)
        return out


def robust_rate(seconds: list[float], tokens: list[int], factor: float = OUTLIER_FACTOR) -> dict:
    """Tokens/s over measured steps, leaving out steps slower per token than ``factor`` x the median.

    A recompile (Unsloth compiles its blocks per new shape) makes one step several times slower
    than its token count explains; such steps are excluded and counted. Per token, not per step,
    because steps hold different numbers of tokens. Returns ``tokens``, ``seconds`` (kept sums),
    ``tokens_per_second``, ``measured_steps``, ``excluded_steps``, ``excluded_seconds``.
    """
    pairs = [(t, n) for t, n in zip(seconds, tokens) if n > 0 and t > 0]
    per_token = sorted(t / n for t, n in pairs)
    if per_token:
        mid = len(per_token) // 2
        median = per_token[mid] if len(per_token) % 2 else (per_token[mid - 1] + per_token[mid]) / 2
    else:
        median = 0.0
    kept = [(t, n) for t, n in pairs if t / n <= factor * median]
    dropped = [t for t, n in pairs if t / n > factor * median]
    total_t, total_n = sum(t for t, _ in kept), sum(n for _, n in kept)
    return {"tokens": total_n, "seconds": round(total_t, 4),
            "tokens_per_second": round(total_n / total_t, 1) if total_t > 0 else None,
            "measured_steps": len(kept), "excluded_steps": len(dropped),
            "excluded_seconds": round(sum(dropped), 3)}


class Context:
    def __init__(self, args):
        self.args = args
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.dry = args.dry_run
        self.backend = "unsloth"
        self.device = None
        self.clock = None  # StageClock of the running stage (main sets it)

    def setup(self):
        """Import Unsloth first (its GPU path), then ddp_patch: what every opensloth script does."""
        from opensloth.launch import import_backend, resolve_backend

        self.backend = resolve_backend("auto")
        t0 = time.perf_counter()
        import_backend(self.backend)
        self.import_seconds = time.perf_counter() - t0
        from opensloth.patches.ddp import ddp_patch

        self.device = ddp_patch()

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict:
        if not self.cuda:
            return {"peak_allocated_gib": None, "peak_reserved_gib": None}
        return {"peak_allocated_gib": round(self.torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gib": round(self.torch.cuda.max_memory_reserved() / 2**30, 3)}


# --------------------------------------------------------------------------- SFT runs


def _load_lora_model(ctx: Context, path: str, *, load_in_4bit: bool, max_seq_length: int):
    from opensloth.launch import LoraSettings, load_model_and_tokenizer

    lora = LoraSettings(r=16, alpha=16, target_modules=LORA_TARGETS)
    return load_model_and_tokenizer(path, backend=ctx.backend, max_seq_length=max_seq_length, device=ctx.device,
                                    seed=3407, dtype="bfloat16", lora=lora, gradient_checkpointing=True,
                                    load_in_4bit=load_in_4bit)


def _dataset(ctx: Context, tokenizer, vocab_size: int, n: int):
    from datasets import Dataset

    a = ctx.args
    lengths = lognormal_lengths(n, seed=1234, median=a.median_tokens, sigma=a.sigma, cap=a.max_tokens)
    samples = chat_token_samples(tokenizer, lengths, seed=4321, vocab_size=min(vocab_size, len(tokenizer)))
    ds = Dataset.from_dict({"input_ids": samples})
    real = [len(s) for s in samples]
    return ds, {"samples": n, "median_tokens": sorted(real)[n // 2], "mean_tokens": round(sum(real) / n, 1),
                "max_tokens": max(real)}


def _sft_config(ctx: Context, run_dir: str, max_steps: int, max_length: int):
    import trl

    a = ctx.args
    return trl.SFTConfig(
        output_dir=run_dir, per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.accum,
        learning_rate=2e-4, lr_scheduler_type="constant", max_steps=max_steps, logging_steps=1, seed=3407,
        data_seed=3407, max_length=max_length, packing=False, bf16=ctx.cuda or ctx.backend == "unsloth",
        report_to=[], save_strategy="no", dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0, optim="adamw_torch", weight_decay=0.0, disable_tqdm=True,
        ddp_find_unused_parameters=None, gradient_checkpointing=False,
    )


def _set_config(name: str) -> None:
    """Switch this process to one configuration: env for Unsloth's balancer, patch on/off for ours."""
    from opensloth.patches.batch_samples import (
        patch_optimize_sft_trainer_batch_samples,
        unpatch_optimize_sft_trainer_batch_samples,
    )

    if name == "unsloth_token_balance":
        os.environ["UNSLOTH_TOKEN_BALANCE"] = "1"
    else:
        os.environ.pop("UNSLOTH_TOKEN_BALANCE", None)
    if name in PATCH_LAYOUT:
        patch_optimize_sft_trainer_batch_samples(layout=PATCH_LAYOUT[name])
    else:
        unpatch_optimize_sft_trainer_batch_samples()


def _one_run(ctx: Context, model, tokenizer, data, initial: dict, config: str, steps: int, run_dir: str) -> dict:
    import trl

    from opensloth.patches.unsloth_compat import check_trainer_patched, loss_scaling_owner

    torch = ctx.torch
    with torch.no_grad():  # same LoRA start for every run: the three configs see the same numbers
        for name, p in model.named_parameters():
            if name in initial:
                p.copy_(initial[name])
    _set_config(config)
    trainer = trl.SFTTrainer(model=model, args=_sft_config(ctx, run_dir, steps, ctx.args.max_tokens),
                             train_dataset=data, processing_class=tokenizer)
    from opensloth.patches.batch_samples import PATCH_NAME

    check_trainer_patched(trainer, "get_batch_samples", PATCH_NAME)
    meter = StepMeter(model, ctx.cuda)
    trainer.add_callback(meter.callback)
    ctx.reset_peak()
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        meter.close()
    wall = time.perf_counter() - t0
    out = meter.summary(skip=ctx.args.skip_steps)
    out.update(ctx.peak())
    out["wall_seconds"] = round(wall, 2)
    out["losses"] = [round(r["loss"], 5) for r in trainer.state.log_history if "loss" in r]
    out["padding_free"] = getattr(trainer.args, "padding_free", None)
    out["token_balance_active"] = getattr(trainer, "_unsloth_token_balance_active", None)
    stats = getattr(trainer, "_opensloth_packing_stats", None)
    out["opensloth_layout"] = stats.layout if stats is not None else None
    out["trainer_class"] = f"{type(trainer).__module__}.{type(trainer).__qualname__}"
    out["loss_scaling_owner"] = loss_scaling_owner()
    del trainer
    ctx.free()
    return out


def _summarise(result: dict, runs: dict) -> None:
    """Per configuration: tokens/s pooled over its measured runs, ratios, and the same-samples check."""
    summary = {}
    for config in CONFIGS:
        measured = [r for r in runs[config] if not r["warmup"]]
        if not measured:
            continue
        tokens, seconds = sum(r["tokens"] for r in measured), sum(r["seconds"] for r in measured)
        summary[config] = {
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "runs": len(measured),
            "run_tokens_per_second": [r["tokens_per_second"] for r in measured],
            "measured_steps": sum(r["measured_steps"] for r in measured),
            "excluded_steps": sum(r["excluded_steps"] for r in measured),
            "peak_allocated_gib": max((r["peak_allocated_gib"] or 0) for r in measured)
            if measured[0]["peak_allocated_gib"] is not None else None,
            "losses": measured[-1]["losses"],
            "tokens_per_step": measured[-1]["step_tokens"],
            "layout": measured[-1]["opensloth_layout"],
            "padding_free": measured[-1]["padding_free"],
            "token_balance_active": measured[-1]["token_balance_active"],
        }
    base = summary.get("unsloth", {}).get("tokens_per_second")
    for s_ in summary.values():
        tps = s_["tokens_per_second"]
        s_["ratio_vs_unsloth"] = round(tps / base, 3) if tps and base else None
    # Same samples per step in every configuration: the real-token counts must agree.
    result["same_tokens_per_step"] = len({tuple(s_["tokens_per_step"]) for s_ in summary.values()}) <= 1
    losses = [s_["losses"] for s_ in summary.values() if s_["losses"]]
    result["max_loss_difference_between_configs"] = round(max(
        (abs(x - y) for a_ in losses for b_ in losses for x, y in zip(a_, b_)), default=0.0), 5) if losses else None
    result["summary"] = summary


def wait_for_quiet(ctx: "Context") -> dict:
    """Wait (bounded) until the driver says the stages run alongside have ended; extend the clock by it."""
    a = ctx.args
    if not a.quiet_file:
        return {"waited_s": 0.0, "device_shared_while_measuring": False}
    t0 = time.perf_counter()
    while not os.path.exists(a.quiet_file) and time.perf_counter() - t0 < a.quiet_wait:
        time.sleep(0.5)
    waited = time.perf_counter() - t0
    if ctx.clock is not None:
        ctx.clock.extend(waited)
    return {"waited_s": round(waited, 1), "device_shared_while_measuring": not os.path.exists(a.quiet_file)}


def _expected_run_seconds(previous: list[dict], steps: int) -> float:
    """Seconds a run of ``steps`` steps should take, from this configuration's earlier runs."""
    measured = [r for r in previous if not r["warmup"]]
    if measured:
        return max(r["wall_seconds"] for r in measured)
    step_times = sorted(x for r in previous for x in r["step_seconds"][1:]) or [5.0]
    return step_times[len(step_times) // 2] * steps + 4.0  # + trainer construction


def stage_sft_throughput(ctx: "Context", emit) -> dict:
    a = ctx.args
    from opensloth.patches.batch_samples import auto_layout_for

    model, tokenizer = _load_lora_model(ctx, a.model, load_in_4bit=False, max_seq_length=a.max_tokens)
    steps = a.skip_steps + a.measure_steps
    warm_steps = a.warmup_steps or steps  # default: the measured runs' own steps, so their shapes are compiled
    n = steps * a.batch * a.accum
    data, data_info = _dataset(ctx, tokenizer, model.config.vocab_size, n)
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    auto_layout, auto_reason = auto_layout_for(model)
    # Every configuration warmed up once, then the configurations alternated: A B C D A B C D.
    plan = [(True, c) for c in CONFIGS] + [(False, c) for _ in range(a.rounds) for c in CONFIGS]
    runs: dict[str, list] = {c: [] for c in CONFIGS}
    result = {"data": data_info, "global_batch": a.batch * a.accum, "steps_per_run": steps,
              "skipped_steps_per_run": a.skip_steps, "warmup_steps": warm_steps, "rounds": a.rounds,
              "order": [c for _, c in plan], "runs": runs, "outlier_factor": OUTLIER_FACTOR,
              "auto_layout": auto_layout, "auto_layout_reason": auto_reason, "cut_for_time": [],
              "attention": _attention_info(model), "quiet": None}
    for i, (warm, config) in enumerate(plan):
        if not warm and result["quiet"] is None:
            result["quiet"] = wait_for_quiet(ctx)
        if not warm and ctx.clock is not None:
            need = _expected_run_seconds(runs[config], steps) + 10.0
            if ctx.clock.left() < need:  # a cut round beats a timeout that loses the stage
                result["cut_for_time"].append(f"run {i} ({config}): {ctx.clock.left():.0f}s left, ~{need:.0f}s needed")
                continue
        rec = _one_run(ctx, model, tokenizer, data, initial, config, warm_steps if warm else steps,
                       os.path.join(a.work, f"sft_{i}"))
        rec["warmup"] = warm
        runs[config].append(rec)
        _summarise(result, runs)
        emit(result)  # partial figures survive a later timeout or kill
    _set_config("unsloth")
    del model
    ctx.free()
    result["not_measured"] = [c for c in CONFIGS if c not in result["summary"]]
    if not result["same_tokens_per_step"]:
        raise CheckFailed("the configurations trained on different tokens per step: "
                          + json.dumps({k: v["tokens_per_step"] for k, v in result["summary"].items()}), result)
    return result


def stage_four_bit(ctx: "Context", emit) -> dict:
    a = ctx.args
    if not ctx.cuda:
        raise SkipStage("4-bit needs CUDA (bitsandbytes' 4-bit LoRA path)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise SkipStage(f"bitsandbytes does not import: {one_line(exc)}")
    t0 = time.perf_counter()
    model, tokenizer = _load_lora_model(ctx, a.model, load_in_4bit=True, max_seq_length=a.max_tokens)
    steps = a.skip_steps + a.measure_steps
    data, data_info = _dataset(ctx, tokenizer, model.config.vocab_size, steps * a.batch * a.accum)
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    result = {"data": data_info, "runs": [], "bitsandbytes": bitsandbytes.__version__,
              "load_seconds": round(time.perf_counter() - t0, 1), "note": None}
    # 4-bit compiles its blocks anew (Unsloth's padding_choice.py: ~100 s in 4 bit): a short warm-up
    # run first, its figures kept, then one measured run if the clock allows it.
    warm = _one_run(ctx, model, tokenizer, data, initial, "unsloth", min(2, steps), os.path.join(a.work, "q4_0"))
    warm["warmup"] = True
    result["runs"].append(warm)
    result.update(tokens_per_second=None, peak_allocated_gib=warm["peak_allocated_gib"], losses=warm["losses"],
                  warmup_seconds=warm["wall_seconds"])
    emit(result)
    need = _expected_run_seconds([warm], steps) + 10.0
    if ctx.clock is not None and ctx.clock.left() < need:
        result["note"] = f"measured run left out: {ctx.clock.left():.0f}s left, ~{need:.0f}s needed"
    else:
        rec = _one_run(ctx, model, tokenizer, data, initial, "unsloth", steps, os.path.join(a.work, "q4_1"))
        rec["warmup"] = False
        result["runs"].append(rec)
        result.update(tokens_per_second=rec["tokens_per_second"], peak_allocated_gib=rec["peak_allocated_gib"],
                      losses=rec["losses"], measured_steps=rec["measured_steps"],
                      excluded_steps=rec["excluded_steps"])
    del model
    ctx.free()
    return result


# --------------------------------------------------------------------------- packed forward


def _attention_info(model) -> dict:
    info = {}
    cfg = getattr(model, "config", None)
    info["attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    try:
        import unsloth.models._utils as uu

        for name in ("HAS_FLASH_ATTENTION", "HAS_FLASH_ATTENTION_SOFTCAPPING", "HAS_XFORMERS"):
            if hasattr(uu, name):
                info[name] = bool(getattr(uu, name))
    except Exception as exc:  # CPU backend or moved names
        info["unsloth_flags"] = one_line(exc)
    try:
        import unsloth.utils.attention_dispatch as ad

        info["unsloth_device_backends"] = repr(getattr(ad, "_DEVICE_BACKENDS", None))
    except Exception as exc:
        info["unsloth_device_backends"] = one_line(exc)
    return info


def _token_logprobs(logits, ids):
    import torch

    return torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, ids[1:, None]).squeeze(-1)


def stage_packing(ctx: Context, emit) -> dict:
    """Per-sequence vs opensloth's varlen and padded micro-batches; two leaking packings must differ."""
    import torch
    from transformers import AutoTokenizer

    from opensloth.packing import build_micro_batch

    a = ctx.args
    if ctx.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(a.tiny, max_seq_length=1024, dtype=torch.bfloat16,
                                                       load_in_4bit=False, device_map={"": str(ctx.device)})
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=list(LORA_TARGETS[:4]),
                                                 use_gradient_checkpointing="unsloth", random_state=0)
    else:
        from transformers import AutoModelForCausalLM

        tok = AutoTokenizer.from_pretrained(a.tiny)
        model = AutoModelForCausalLM.from_pretrained(a.tiny, dtype=torch.bfloat16).to(ctx.device)
    model.train()  # Unsloth's fast path honours packed lengths in training forwards
    records = [json.loads(x) for x in open(os.path.join(REPO, "data", "sft", "train.jsonl")).read().splitlines()[:6]]
    samples = []
    for i, rec in enumerate(records):
        ids = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)[: 40 + 25 * i]
        samples.append(torch.tensor(ids))
    device = next(model.parameters()).device

    def forward(**inputs):
        with torch.no_grad():
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            return model(**inputs, use_cache=False).logits

    reference = [_token_logprobs(forward(input_ids=s[None])[0], s.to(device)) for s in samples]
    seqs = [(s, s.clone()) for s in samples]
    batch, segments = build_micro_batch(seqs, [list(range(len(seqs)))], layout="varlen",
                                        extra_fields={"packed_seq_lengths"})
    feed = {k: v for k, v in batch.items() if k != "labels"}
    # layout="padded" (what "auto" picks on CUDA without a varlen kernel): one sample per row, padded on
    # the right. Unsloth's fast forward drops attention_mask while training, so also without it.
    padded, padded_segments = build_micro_batch(seqs, [[i] for i in range(len(seqs))], layout="padded")

    def compare(logits, batch=batch, segments=segments):
        diffs = []
        for seg in segments:
            ids = batch["input_ids"][seg.row, seg.start:seg.start + seg.length].to(device)
            lp = _token_logprobs(logits[seg.row, seg.start:seg.start + seg.length], ids)
            diffs.append(float((lp - reference[seg.source]).abs().max()))
        return max(diffs)

    total = batch["input_ids"].shape[1]
    variants = {
        # What the batch patch feeds Unsloth: reset position_ids + packed_seq_lengths (+ flash varlen fields).
        "opensloth_varlen": feed,
        # Only reset position_ids (a collator without the Unsloth wrap): Unsloth infers the lengths.
        "position_ids_only": {"input_ids": feed["input_ids"], "position_ids": feed["position_ids"]},
        # Leak: positions right, but the lengths say one document, so attention crosses boundaries.
        "leak_one_document": {"input_ids": feed["input_ids"], "position_ids": feed["position_ids"],
                              "packed_seq_lengths": torch.tensor([total], dtype=torch.int32),
                              "cu_seq_lens_q": torch.tensor([0, total], dtype=torch.int32),
                              "cu_seq_lens_k": torch.tensor([0, total], dtype=torch.int32),
                              "max_length_q": total, "max_length_k": total},
        # Leak: naive concatenation, no boundaries at all.
        "leak_naive_concat": {"input_ids": feed["input_ids"]},
        # What the batch patch feeds for layout="padded", and the same rows with the mask dropped.
        "opensloth_padded": {k: v for k, v in padded.items() if k != "labels"},
        "opensloth_padded_no_mask": {"input_ids": padded["input_ids"], "position_ids": padded["position_ids"]},
    }
    diffs, errors = {}, {}
    for name, inputs in variants.items():
        try:
            layout_of = (padded, padded_segments) if name.startswith("opensloth_padded") else (batch, segments)
            diffs[name] = round(compare(forward(**inputs), *layout_of), 5)
        except Exception as exc:
            errors[name] = one_line(exc)
    result = {"max_abs_logprob_diff": diffs, "errors": errors, "honest_tolerance": HONEST_TOL,
              "leak_minimum": LEAK_MIN, "dtype": str(next(model.parameters()).dtype),
              "attention": _attention_info(model), "sequences": [int(s.numel()) for s in samples]}
    honest_names = ("opensloth_varlen", "opensloth_padded", "opensloth_padded_no_mask")
    honest_diffs = [diffs.get(n) for n in honest_names]
    honest = None if None in honest_diffs else max(honest_diffs)
    naive = diffs.get("leak_naive_concat")
    one_doc = diffs.get("leak_one_document")
    result["honest_max"] = honest
    result["honest_ok"] = honest is not None and honest < HONEST_TOL
    # The naive concatenation must be told apart from the honest packing, or the comparison proves nothing.
    varlen = diffs.get("opensloth_varlen")
    result["leaks_detected"] = naive is not None and naive > LEAK_MIN and (varlen is None or naive > 10 * varlen)
    # Informative: does the attention follow packed_seq_lengths (Unsloth's GPU path prefers it) or the
    # position_ids resets (transformers' SDPA/eager masks)? A large diff means lengths are authoritative.
    result["packed_seq_lengths_authoritative"] = None if one_doc is None else one_doc > LEAK_MIN
    del model
    ctx.free()
    if not result["honest_ok"]:
        missing = [n for n in honest_names if n not in diffs]
        raise CheckFailed(f"opensloth's micro-batches differ from per-sequence forwards by {honest} (tolerance "
                          f"{HONEST_TOL}; {dict(zip(honest_names, honest_diffs))}"
                          + (f"; failed: {[errors.get(n) for n in missing]}" if missing else "") + ")", result)
    if not result["leaks_detected"]:
        raise CheckFailed(f"the naive concatenation was not detected (diffs {diffs}): the check cannot fail", result)
    return result


# --------------------------------------------------------------------------- driver side


class SkipStage(Exception):
    """The stage cannot run here (no CUDA, no bitsandbytes); recorded as skipped."""


class CheckFailed(Exception):
    """The stage ran but its check failed; its figures are kept."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


STAGE_FUNCS = {"sft_throughput": stage_sft_throughput, "four_bit": stage_four_bit, "packing": stage_packing}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", required=True, help="JSONL file the stage events are appended to")
    p.add_argument("--stages", required=True, help=f"comma-separated subset of {STAGES}")
    p.add_argument("--model", required=True, help="random-init model folder (make_random_model.py)")
    p.add_argument("--model_ready", default=None,
                   help="file the driver writes once --model is on disk (the worker imports Unsloth meanwhile)")
    p.add_argument("--tiny", default=os.path.join(REPO, "data", "tiny-qwen3"), help="small pretrained model")
    p.add_argument("--work", required=True, help="scratch folder")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    p.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--skip_steps", type=int, default=1, help="first steps of each run left out of tokens/s")
    p.add_argument("--measure_steps", type=int, default=4, help="measured steps per run")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds of the four configurations")
    p.add_argument("--warmup_steps", type=int, default=0,
                   help="steps of each configuration's warm-up run (0: as many as a measured run, so the "
                        "measured runs meet no shape the warm-up did not compile)")
    p.add_argument("--quiet_file", default=None,
                   help="sft_throughput waits for this file (the driver writes it when the stages run "
                        "alongside have ended) before its measured runs")
    p.add_argument("--quiet_wait", type=float, default=60.0, help="longest wait for --quiet_file, seconds")
    p.add_argument("--deadline", type=float, default=None,
                   help="time.time() by which the worker must be done; stages shrink to fit, or are skipped")
    p.add_argument("--median_tokens", type=float, default=600.0, help="lognormal median sample length")
    p.add_argument("--sigma", type=float, default=0.9, help="lognormal sigma of the sample length")
    p.add_argument("--max_tokens", type=int, default=4096, help="longest sample (and max_length)")
    for stage in STAGES:
        p.add_argument(f"--timeout_{stage}", type=float, default=120.0, help=f"seconds for {stage}")
    args = p.parse_args(argv)
    events = Events(args.events)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        print(f"error: unknown stage(s) {sorted(unknown)}; choose from {STAGES}", file=sys.stderr)
        return 2
    os.makedirs(args.work, exist_ok=True)

    ctx = Context(args)
    events.write(stage="_worker", event="start", pid=os.getpid())
    try:
        ctx.setup()
    except Exception as exc:
        events.write(stage="_worker", event="end", status="failed", error=one_line(exc),
                     traceback=traceback.format_exc()[-3000:])
        return 1
    events.write(stage="_worker", event="ready", import_seconds=round(ctx.import_seconds, 2),
                 backend=ctx.backend, device=str(ctx.device))
    if args.model_ready:
        t0 = time.perf_counter()
        while not os.path.exists(args.model_ready):
            if args.deadline is not None and time.time() > args.deadline:
                events.write(stage="_worker", event="end", status="failed", error="the model was never ready")
                return 1
            time.sleep(0.2)
        events.write(stage="_worker", event="model_ready", waited_seconds=round(time.perf_counter() - t0, 2))

    for stage in stages:
        timeout = getattr(args, f"timeout_{stage}")
        if args.deadline is not None and args.deadline - time.time() < 20:
            events.write(stage=stage, event="end", status="skipped", seconds=0.0,
                         error="out of time before the stage could start")
            continue
        events.write(stage=stage, event="start", timeout=timeout)
        t0 = time.perf_counter()

        def fire(stage=stage, t0=t0):
            events.write(stage=stage, event="end", status="timeout", seconds=round(time.perf_counter() - t0, 2),
                         error=f"no result within {time.perf_counter() - t0:.0f} s; worker stopped")
            os._exit(124)

        timer = ctx.clock = StageClock(timeout, fire, args.deadline)

        def emit(partial, stage=stage):
            events.write(stage=stage, event="partial", result=partial)

        status, result, error, tb = "ok", None, None, None
        try:
            result = STAGE_FUNCS[stage](ctx, emit)
        except SkipStage as exc:
            status, error = "skipped", str(exc)
        except CheckFailed as exc:
            status, error, result = "failed", str(exc), exc.result
        except Exception as exc:
            status, error, tb = "failed", one_line(exc), traceback.format_exc()[-4000:]
        timer.stop()
        ctx.clock = None
        events.write(stage=stage, event="end", status=status, seconds=round(time.perf_counter() - t0, 2),
                     result=result, error=error, traceback=tb)
        if tb and ("CUDA error" in tb or "illegal memory access" in tb):
            return 3  # the CUDA context is poisoned: let the driver start a fresh process
        ctx.free()
    events.write(stage="_worker", event="end", status="ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
