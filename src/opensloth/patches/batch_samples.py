"""Cross-rank balanced packing of every optimizer step: the ``get_batch_samples`` patch.

``patch_optimize_sft_trainer_batch_samples()`` swaps ``get_batch_samples`` on
the SFTTrainer class in use (``trl.SFTTrainer`` at call time, which Unsloth
rebinds to its own subclass). The replacement keeps the Trainer's contract:
it returns exactly ``num_batches`` micro-batches on every rank, and
``num_items_in_batch`` counted by the original method (global across ranks
with ``average_tokens_across_devices``), so the step's gradient is the same
as without the patch -- only the work is spread better.

How one step is built (every rank runs the same code on the same inputs):

1. At the first step of an epoch the train sampler's order is drawn once --
   the same call, seed and epoch as the stock loop -- and put back as a replay,
   so the loader and the planner see the very same indices. From it every rank
   derives, with accelerate's own ``BatchSamplerShard``, the index batches that
   the stock loader deals to *each* rank. One small all-gather of a checksum
   per epoch proves the ranks agree.
2. The step window is what all ranks would train on in this step without the
   patch: ``world_size x num_batches`` index batches, duplicates from
   accelerate's ``even_batches`` wrap-around included. No sample of the step
   is dropped or added; only where it is computed changes.
3. :func:`opensloth.packing.plan_step` assigns the window's samples to
   ranks and micro-batches from their token lengths alone (read once from the
   dataset every rank holds). Ranks exchange nothing else; the token count the
   original method gathers for ``num_items_in_batch`` is unchanged.
4. The Trainer's iterator is advanced by ``num_batches`` as usual (its
   batches are discarded), keeping accelerate's end-of-epoch bookkeeping.
   Each rank then fetches only its assigned samples from the loader's dataset,
   runs the loader's collator on each sample alone (so labels are exactly what
   the collator makes), and packs them into ``num_batches`` micro-batches;
   a rank with fewer samples than micro-batches gets two-token all-masked
   ones, so every rank runs the same number of forward/backward passes.

Why not ship the other ranks' collated batches? That moves token ids between
ranks every step; reading the shared dataset by index needs no traffic.

Layouts (``layout=``):

- ``"varlen"`` (default): one padding-free row per micro-batch with
  ``position_ids``, ``cu_seq_lens_q/k``, ``max_length_q/k``. Flash-attention
  uses the varlen fields; SDPA/eager models in transformers build the block
  mask from ``position_ids`` (SFTTrainer passes ``use_cache=False``); Unsloth's
  fast path infers its packed lengths from ``position_ids`` for a batch of one
  row. This is the only packed layout Unsloth's GPU path honours: it drops
  ``attention_mask`` while training.
- ``"rows4d"``: rows of at most ``max_length`` tokens with a 4D block-causal
  float mask (transformers SDPA/eager). Refused on Unsloth's fast forward.
- ``"padded"``: no packing; one sample per row, 2D mask, each rank's samples
  grouped by the OpenSloth DP. Works with any model.
- ``"auto"`` (:func:`choose_layout`): on CUDA, ``"varlen"`` only with a
  varlen attention kernel (flash-attn, xformers or torch's varlen op under
  Unsloth; ``flash_attention_*`` in transformers), else ``"padded"``. Off
  CUDA: ``"rows4d"`` for transformers' eager attention (a dense single-row
  mask would be quadratic in the micro-batch), else ``"varlen"``. The choice
  and its reason are logged once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from opensloth.distributed import all_gather_object_list, distributed_env
from opensloth.log import log_rank0
from opensloth.packing import (
    LAYOUTS,
    attention_coef_for,
    build_micro_batch,
    padded_cost,
    plan_step,
    sequences_from_batch,
)
from opensloth.patches.registry import PatchTargetError, require_attr, require_source_contains, swap_method, unpatch
from opensloth.patches.unsloth_compat import bypass_unsloth_token_balance

__all__ = [
    "PATCH_NAME",
    "WRITTEN_FOR",
    "BatchSamplesSettings",
    "PackingStats",
    "patch_optimize_sft_trainer_batch_samples",
    "settings_for",
    "unpatch_optimize_sft_trainer_batch_samples",
]

PATCH_NAME = "optimize_sft_trainer_batch_samples"
WRITTEN_FOR = "transformers 5.17.0, trl 1.15.0, unsloth 2026.10.9"

# Keys a text SFT collator may emit for one sample. Anything else (pixel values,
# token type ids, ...) is refused rather than silently dropped.
_KNOWN_KEYS = {
    "input_ids",
    "attention_mask",
    "labels",
    "position_ids",
    "seq_lengths",
    "packed_seq_lengths",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "seq_idx",
}
_REBUILT_EXTRAS = ("packed_seq_lengths", "seq_idx")


@dataclass(frozen=True)
class BatchSamplesSettings:
    """Settings of the patched ``get_batch_samples``.

    Attributes:
        enabled: False makes the patched method call the original.
        layout: "auto", "varlen", "rows4d" or "padded" (see module docstring).
        cross_rank: move samples between ranks (needs the loss normalised by
            the global token count, ``average_tokens_across_devices=True``).
            False balances only each rank's own micro-batches.
        attention_coef: quadratic attention weight of the cost model; None
            estimates it from the model config.
    """

    enabled: bool = True
    layout: str = "auto"
    cross_rank: bool = True
    attention_coef: float | None = None

    def __post_init__(self):
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {self.layout!r}")
        if self.attention_coef is not None and self.attention_coef < 0:
            raise ValueError(f"attention_coef must be >= 0, got {self.attention_coef}")


_SETTINGS = BatchSamplesSettings()


@dataclass
class PackingStats:
    """What the patch did so far on one trainer (``trainer._opensloth_packing_stats``)."""

    steps: int = 0
    real_tokens: int = 0
    slowest_rank_cost: float = 0.0  # planned, summed over steps
    drawn_slowest_rank_cost: float = 0.0  # padded batches as drawn, summed over steps
    seconds: float = 0.0  # time spent in the patched method beyond advancing the iterator
    layout: str = ""
    fallbacks: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=256))  # dataset indices of recent steps


def patch_optimize_sft_trainer_batch_samples(
    *,
    layout: str = "auto",
    cross_rank: bool = True,
    attention_coef: float | None = None,
    trainer_cls: type | None = None,
) -> type:
    """Swap ``get_batch_samples`` on the SFTTrainer class in use for the balanced packer.

    Call it after ``import unsloth`` (which rebinds ``trl.SFTTrainer``) and
    before building the trainer. Calling it again only updates the settings.

    Args:
        layout: "auto" (default), "varlen", "rows4d" or "padded".
        cross_rank: balance across ranks (default) or only within each rank.
        attention_coef: cost-model attention weight; None derives it from the
            model config.
        trainer_cls: class to patch; default ``trl.SFTTrainer`` as bound now.

    Returns:
        The patched class.

    Raises:
        PatchTargetError: the class has no ``get_batch_samples``, or the
            installed Trainer's training loop no longer calls it the way this
            patch relies on.
    """
    global _SETTINGS
    settings = BatchSamplesSettings(layout=layout, cross_rank=cross_rank, attention_coef=attention_coef)
    if trainer_cls is None:
        import trl

        trainer_cls = require_attr(trl, "SFTTrainer", PATCH_NAME, WRITTEN_FOR)
    _check_targets(trainer_cls)
    swapped = swap_method(
        trainer_cls,
        "get_batch_samples",
        lambda original: _make_replacement(trainer_cls, original),
        name=PATCH_NAME,
        written_for=WRITTEN_FOR,
        description=(
            "packs every optimizer step and balances it across ranks; same samples and "
            "num_items_in_batch per step"
        ),
    )
    _SETTINGS = settings
    log_rank0(
        f"{'patched' if swapped else 'already patched'} {trainer_cls.__module__}.{trainer_cls.__qualname__}"
        f".get_batch_samples (layout={layout}, cross_rank={cross_rank})"
    )
    return trainer_cls


def unpatch_optimize_sft_trainer_batch_samples(trainer_cls: type | None = None) -> bool:
    """Restore the original method and the default settings (tests, or to turn the patch off in-process)."""
    global _SETTINGS
    if trainer_cls is None:
        import trl

        trainer_cls = trl.SFTTrainer
    _SETTINGS = BatchSamplesSettings()
    return unpatch(trainer_cls, "get_batch_samples", PATCH_NAME)


def _check_targets(trainer_cls: type) -> None:
    from transformers import Trainer

    require_attr(trainer_cls, "get_batch_samples", PATCH_NAME, WRITTEN_FOR)
    for attr in ("_run_epoch", "_prepare_for_training"):
        require_attr(Trainer, attr, PATCH_NAME, WRITTEN_FOR)
    # The replacement reads the prepared train loader from the callback handler.
    require_source_contains(
        Trainer._prepare_for_training,
        ["self.callback_handler.train_dataloader = train_dataloader"],
        PATCH_NAME,
        WRITTEN_FOR,
    )
    # The loop must ask for `num_batches` micro-batches per step and decide the sync step by
    # counting them; that is the contract the replacement keeps.
    require_source_contains(
        Trainer._run_epoch,
        [
            "self.get_batch_samples(epoch_iterator, num_batches, self.args.device)",
            "(step + 1) % self.args.gradient_accumulation_steps == 0 or (step + 1) == steps_in_epoch",
        ],
        PATCH_NAME,
        WRITTEN_FOR,
    )
    if not issubclass(trainer_cls, Trainer):
        raise PatchTargetError(f"{trainer_cls} is not a transformers.Trainer subclass")


def _make_replacement(owner: type, original):
    own = "get_batch_samples" in owner.__dict__

    def get_batch_samples(self, epoch_iterator, num_batches, device=None, *args, **kwargs):
        # Resolve the inner implementation at call time: Unsloth may install its own on
        # transformers.Trainer after this patch was applied.
        if own:
            def inner(it, n, dev):
                return original(self, it, n, dev, *args, **kwargs)
        else:
            parent = super(owner, self).get_batch_samples

            def inner(it, n, dev):
                return parent(it, n, dev, *args, **kwargs)

        settings = getattr(self, "_opensloth_packing_settings", None) or _SETTINGS
        if not settings.enabled:
            return inner(epoch_iterator, num_batches, device)
        return _balanced_step(self, inner, epoch_iterator, num_batches, device, settings)

    return get_batch_samples


# ---------------------------------------------------------------------------
# The step window: exactly the samples the stock loader deals to all ranks
# ---------------------------------------------------------------------------


class _ReplaySampler:
    """Stands in for the train sampler for one epoch and yields the order it produced.

    The order is drawn once from the real sampler (same seed, same epoch, same
    RNG use as the stock loop) and then served to the real loader and to the
    planner alike, so both see the very same indices.
    """

    def __init__(self, original, order: list):
        self.original = original
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.original, "set_epoch"):
            self.original.set_epoch(epoch)

    def __getattr__(self, name):
        if name in ("original", "order"):
            raise AttributeError(name)
        return getattr(self.original, name)


@dataclass
class _EpochWindows:
    iterator: Any
    streams: list  # streams[rank] = the index batches the stock loader yields to that rank this epoch
    consumed: int  # micro-batches already used by every rank


def _index_source(loader):
    """(BatchSamplerShard or None, the BatchSampler whose ``sampler`` yields dataset indices)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    outer = getattr(loader, "batch_sampler", None)
    shard = outer if isinstance(outer, BatchSamplerShard) else None
    inner = shard.batch_sampler if shard is not None else outer
    if shard is not None and (shard.split_batches or not shard.even_batches):
        inner = None  # uneven or split dealing: not supported
    if type(inner) is not BatchSampler or inner.batch_size is None or not hasattr(inner, "sampler"):
        raise TypeError(
            "opensloth's batch repacking reproduces the stock step from an accelerate-prepared loader "
            "(BatchSampler over a sampler, dealt by BatchSamplerShard with even_batches); this train loader "
            f"uses {type(outer).__name__}/{type(inner).__name__} (e.g. train_sampling_strategy='batch_rebalance', "
            "split_batches or an IterableDataset). Run with --no_patches."
        )
    return shard, inner


def _epoch_windows(trainer, epoch_iterator, env) -> _EpochWindows:
    state = getattr(trainer, "_opensloth_windows", None)
    if state is not None and state.iterator is epoch_iterator:
        return state
    from torch.utils.data import BatchSampler

    loader = _train_loader(trainer)
    shard, inner = _index_source(loader)
    sampler = inner.sampler
    original = sampler.original if isinstance(sampler, _ReplaySampler) else sampler
    original = bypass_unsloth_token_balance(original)  # UNSLOTH_TOKEN_BALANCE=1 too: our plan wins, warned
    # The stock loader synchronises the sampler's generator across ranks when its iterator starts;
    # drawing the order now (before that point) needs the same synchronisation first.
    rng_types = getattr(loader, "rng_types", None)
    if rng_types:
        from accelerate.utils import synchronize_rng_states

        synchronize_rng_states(rng_types, getattr(loader, "synchronized_generator", None))
    order = list(original)
    inner.sampler = _ReplaySampler(original, order)
    _check_same_order(order, env)

    replay = BatchSampler(order, inner.batch_size, inner.drop_last)
    if shard is None:
        streams = [list(replay)]
    else:
        from accelerate.data_loader import BatchSamplerShard

        streams = [
            list(BatchSamplerShard(replay, num_processes=shard.num_processes, process_index=r,
                                   split_batches=False, even_batches=True))
            for r in range(shard.num_processes)
        ]
    # Resuming mid-epoch: the Trainer skips the micro-batches of the steps already taken.
    args = trainer.args
    consumed = 0
    per_epoch = math.ceil(len(streams[0]) / args.gradient_accumulation_steps) if streams[0] else 0
    epoch = int(math.floor(trainer.state.epoch or 0.0))
    if per_epoch:
        consumed = max(0, trainer.state.global_step - epoch * per_epoch) * args.gradient_accumulation_steps
    state = _EpochWindows(iterator=epoch_iterator, streams=streams, consumed=consumed)
    trainer._opensloth_windows = state
    return state


def _check_same_order(order: list, env) -> None:
    """Every rank must have drawn the same order; one small all-gather per epoch proves it."""
    if env.world_size <= 1:
        return
    import hashlib

    digest = hashlib.sha1(repr(order).encode()).hexdigest()
    digests = all_gather_object_list(digest)
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"rank {env.rank}: ranks drew different sample orders ({digests}); the sampler is not seeded "
            f"identically on every rank. Set data_seed, or run with --no_patches."
        )


def _train_loader(trainer):
    loader = getattr(getattr(trainer, "callback_handler", None), "train_dataloader", None)
    if loader is None:
        raise RuntimeError(
            "opensloth's batch repacking reads the train loader from trainer.callback_handler.train_dataloader, "
            "which the installed transformers did not set"
        )
    return loader


# ---------------------------------------------------------------------------
# Data access: lengths once, samples by index, collated one by one
# ---------------------------------------------------------------------------


def _train_source(trainer):
    """(dataset the loader reads, collator it uses, token lengths), cached per dataset object."""
    loader = _train_loader(trainer)
    dataset, collator = loader.dataset, loader.collate_fn
    cache = getattr(trainer, "_opensloth_source", None)
    if cache is not None and cache[0] is dataset:
        return cache
    try:
        import datasets

        is_hf = isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover
        is_hf = False
    lengths = _dataset_lengths(dataset, is_hf)
    trainer._opensloth_source = (dataset, collator, lengths)
    return trainer._opensloth_source


def _dataset_lengths(dataset, is_hf: bool) -> list[int]:
    if is_hf and "input_ids" in dataset.column_names:
        import pyarrow.compute as pc

        lengths: list[int] = []
        arrow = dataset.with_format("arrow")
        for start in range(0, len(dataset), 8192):
            table = arrow[start:start + 8192]
            lengths.extend(pc.list_value_length(table.column("input_ids")).to_pylist())
        return [int(x or 0) for x in lengths]
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def _fetch(dataset, indices: list[int]) -> list[dict]:
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None and indices:
        rows = getitems(indices)
        if isinstance(rows, list) and len(rows) == len(indices):
            return rows
    return [dataset[i] for i in indices]


def _sample_sequences(collator, row: dict, index: int):
    """Collate one sample alone and return its sequence(s) and the padding-free extras present."""
    collated = collator([row])
    unknown = set(collated) - _KNOWN_KEYS
    if unknown:
        raise ValueError(
            f"opensloth's batch repacking handles text-only SFT batches; the collator returned "
            f"{sorted(unknown)} for sample {index}. Run with --no_patches for this data."
        )
    ids = collated["input_ids"]
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise ValueError(f"the collator turned one sample into {ids.shape[0]} rows (sample {index})")
    labels = collated.get("labels", ids).reshape(ids.shape)
    mask = collated.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        parts = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    else:
        # Padding-free collators pad only at the end (pad_to_multiple_of): keep the real tokens.
        n_real = len(row["input_ids"]) if "input_ids" in row else ids.shape[1]
        parts = {"input_ids": ids[:, :n_real], "labels": labels[:, :n_real]}
        if "position_ids" in collated:
            parts["position_ids"] = collated["position_ids"].reshape(ids.shape)[:, :n_real]
    extras = {k for k in _REBUILT_EXTRAS if k in collated}
    return sequences_from_batch(parts), extras


# ---------------------------------------------------------------------------
# The replacement body
# ---------------------------------------------------------------------------


def choose_layout(requested: str, *, device_type: str, fast_forward: bool, attn_implementation: str,
                  varlen_kernel: bool | None) -> tuple[str, str]:
    """The layout ``"auto"`` stands for, and why (pure: no torch, no Unsloth).

    Args:
        requested: the configured layout; anything but ``"auto"`` is kept.
        device_type: where the model runs (``"cuda"``, ``"cpu"``, ...).
        fast_forward: the model runs Unsloth's fast forward (drops ``attention_mask``
            while training, honours packed lengths).
        attn_implementation: ``config._attn_implementation`` (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``, ...).
        varlen_kernel: for Unsloth's fast forward, whether Unsloth can run packed rows
            through a varlen kernel (flash-attn, xformers, torch varlen); None if unknown.

    Returns:
        ``(layout, reason)``.

    On CUDA a packed row is only cheap with a varlen kernel. Without one (Unsloth on an
    H200 with torch 2.11, no flash-attn, no xformers: torch SDPA) Unsloth runs a packed
    row as one SDPA call per segment length or over a dense block mask, and its varlen
    batches skip the per-block compile; plain transformers SDPA/eager builds a dense
    block mask from the reset ``position_ids``. ``"padded"`` is then picked (the GPU check,
    scripts/gpu_check.sh, times both): the patch's balanced, minimally padded rows,
    padded on the right. Right padding is exact even
    where the mask is dropped: under causal attention a real token only sees earlier
    positions, all real tokens of its own sample, and pad positions carry label -100.
    CPU keeps the measured default (varlen; rows4d for eager attention).
    """
    if requested != "auto":
        return requested, "configured"
    if device_type == "cuda":
        if fast_forward:
            if varlen_kernel:
                return "varlen", "CUDA, Unsloth fast forward with a varlen attention kernel"
            what = "no varlen attention kernel" if varlen_kernel is False else "varlen kernel not detected"
            return "padded", f"CUDA, Unsloth fast forward, {what} (flash-attn / xformers / torch varlen)"
        if attn_implementation.startswith("flash_attention"):
            return "varlen", f"CUDA, attn_implementation={attn_implementation}"
        return "padded", f"CUDA, attn_implementation={attn_implementation or 'unknown'} (no varlen kernel)"
    if attn_implementation == "eager" and not fast_forward:
        return "rows4d", "eager attention: a dense single-row mask would be quadratic in the micro-batch"
    return "varlen", f"{device_type}: packed rows"


def unsloth_varlen_kernel() -> bool | None:
    """Whether Unsloth's attention dispatch has a varlen kernel for packed rows (None: unknown).

    Reads Unsloth 2026.10.9's flags: ``unsloth.models._utils.HAS_FLASH_ATTENTION``,
    ``unsloth.utils.attention_dispatch.HAS_XFORMERS`` and its ``_TORCH_VARLEN_ATTN``
    (torch's varlen op, which Unsloth loads on torch >= 2.12 only). Never imports Unsloth.
    """
    import sys

    utils = sys.modules.get("unsloth.models._utils")
    dispatch = sys.modules.get("unsloth.utils.attention_dispatch")
    if utils is None and dispatch is None:
        return None
    flags = [bool(getattr(utils, "HAS_FLASH_ATTENTION", False)),
             bool(getattr(dispatch, "HAS_XFORMERS", False)),
             getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None]
    return any(flags)


def _runs_unsloth_fast_forward(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    forwards = [getattr(type(m), "forward", None) for m in (base, inner)]
    return any(
        (getattr(f, "__module__", "") or "").startswith("unsloth") or "fast_forward" in getattr(f, "__qualname__", "")
        for f in forwards
        if f is not None
    )


def auto_layout_for(model, requested: str = "auto") -> tuple[str, str]:
    """:func:`choose_layout` for a (PEFT-wrapped) model: ``(layout, reason)``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fast = _runs_unsloth_fast_forward(model)
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None) or ""
    try:
        device_type = next(model.parameters()).device.type
    except (StopIteration, AttributeError, TypeError):
        device_type = "cpu"
    varlen = unsloth_varlen_kernel() if fast and device_type == "cuda" else None
    return choose_layout(requested, device_type=device_type, fast_forward=fast, attn_implementation=impl,
                         varlen_kernel=varlen)


_LAYOUT_LOGGED: set = set()


def _resolve_layout(trainer, settings: BatchSamplesSettings) -> str:
    layout, reason = auto_layout_for(trainer.model, settings.layout)
    if layout == "rows4d" and _runs_unsloth_fast_forward(trainer.model):
        raise ValueError(
            "layout='rows4d' needs the model to honour a 4D attention mask, but this model runs "
            "Unsloth's fast forward, which drops attention_mask while training; use layout='varlen'"
        )
    if (settings.layout, layout, reason) not in _LAYOUT_LOGGED:  # once per process and decision
        _LAYOUT_LOGGED.add((settings.layout, layout, reason))
        log_rank0(f"batch repacking layout: {layout} (layout={settings.layout!r}: {reason})")
    return layout


def _balanced_step(trainer, inner, epoch_iterator, num_batches, device, settings):
    import torch

    t0 = time.perf_counter()
    env = distributed_env()
    args = trainer.args
    world_size, rank = env.world_size, env.rank
    if args.world_size != world_size:
        raise RuntimeError(
            f"rank {rank}: TrainingArguments.world_size={args.world_size} but WORLD_SIZE={world_size}; "
            f"launch with torchrun so both agree"
        )
    if settings.cross_rank and world_size > 1 and not args.average_tokens_across_devices:
        raise ValueError(
            "cross-rank balancing keeps the gradient exact only when the loss is normalised by the global "
            "token count: set average_tokens_across_devices=True (the default), or patch with cross_rank=False"
        )
    stats = getattr(trainer, "_opensloth_packing_stats", None)
    if stats is None:
        stats = trainer._opensloth_packing_stats = PackingStats(layout=_resolve_layout(trainer, settings))
    layout = stats.layout
    # Before advancing the loader: at an epoch's first step this installs the replayed order.
    windows = _epoch_windows(trainer, epoch_iterator, env)
    t_setup = time.perf_counter() - t0
    for _ in range(num_batches):  # advance the loader exactly as the stock method does
        try:
            next(epoch_iterator)
        except StopIteration:
            break
    t1 = time.perf_counter()
    dataset, collator, lengths_all = _train_source(trainer)

    # The stock step: rank r would train on streams[r][consumed : consumed + num_batches].
    start = windows.consumed
    windows.consumed += num_batches
    indices: list[int] = []
    drawn: list[list[list[int]]] = []
    for r in range(world_size):
        stream = windows.streams[r] if r < len(windows.streams) else []
        rank_mbs = []
        for m in range(num_batches):
            batch = stream[start + m] if start + m < len(stream) else []
            rank_mbs.append(list(range(len(indices), len(indices) + len(batch))))
            indices.extend(batch)
        drawn.append(rank_mbs)
    if not indices:
        raise RuntimeError(
            f"rank {rank}: the Trainer asked for a step after the loader's epoch was used up; "
            f"the loader length and the replayed order disagree. Run with --no_patches and report this."
        )
    lengths = [int(lengths_all[i]) for i in indices]
    if min(lengths) < 1:
        raise ValueError(f"rank {rank}: a training sample has no tokens (dataset index {indices[lengths.index(0)]})")
    batch_size = args.per_device_train_batch_size
    max_length = getattr(args, "max_length", None) or 0
    row_capacity = max(int(max_length), max(lengths))
    coef = settings.attention_coef
    if coef is None:
        coef = attention_coef_for(getattr(trainer.model, "config", None))
    plan = plan_step(
        lengths,
        world_size,
        num_batches,
        token_budget=batch_size * row_capacity,
        attention_coef=coef,
        layout=layout,
        cross_rank=settings.cross_rank,
        drawn=drawn,
        row_capacity=row_capacity,
    )
    mine = plan.micro_batches[rank]
    wanted = sorted({p for mb in mine for p in mb})
    rows = _fetch(dataset, [indices[p] for p in wanted])
    sequences_of: dict[int, list] = {}
    extras: set[str] = set()
    for p, row in zip(wanted, rows):
        seqs, found = _sample_sequences(collator, row, indices[p])
        sequences_of[p] = seqs
        extras |= found

    pad_id = getattr(collator, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(getattr(trainer, "processing_class", None), "pad_token_id", None) or 0
    mask_dtype = getattr(trainer.model, "dtype", None) if layout == "rows4d" else None
    if mask_dtype is not None and not mask_dtype.is_floating_point:
        mask_dtype = torch.float32
    micro_batches = []
    for m, mb in enumerate(mine):
        # Row order follows the plan's rows (rows4d); a pre-packed sample brings all its segments.
        ordered = [p for row in plan.rows[rank][m] for p in row] if layout == "rows4d" else list(mb)
        seqs = [s for p in ordered for s in sequences_of[p]]
        sources = [indices[p] for p in ordered for _ in sequences_of[p]]
        if layout == "rows4d":
            row_plan, at = [], 0
            for row in plan.rows[rank][m]:
                count = sum(len(sequences_of[p]) for p in row)
                row_plan.append(list(range(at, at + count)))
                at += count
        elif layout == "padded":
            row_plan = [[i] for i in range(len(seqs))]
        else:
            row_plan = [list(range(len(seqs)))]
        batch, _ = build_micro_batch(
            seqs,
            row_plan,
            layout=layout,
            pad_token_id=int(pad_id),
            mask_dtype=mask_dtype,
            sources=sources,
            extra_fields=extras,
        )
        micro_batches.append(batch)

    elapsed = t_setup + (time.perf_counter() - t1)
    batch_samples, num_items_in_batch = inner(iter(micro_batches), num_batches, device)
    if len(batch_samples) != num_batches:
        raise RuntimeError(
            f"rank {rank}: built {num_batches} micro-batches but the inner get_batch_samples kept "
            f"{len(batch_samples)}; ranks would disagree on the number of backward passes"
        )
    if num_items_in_batch is None and (world_size > 1 or num_batches > 1):
        raise RuntimeError(
            "num_items_in_batch is None (the model's forward takes no loss kwargs and there is no "
            "compute_loss_func), so each micro-batch loss would be its own mean and repacking would change "
            "the gradient. Run with --no_patches for this model."
        )

    drawn_cost = max(sum(padded_cost([lengths[p] for p in mb], coef) for mb in rank_mbs) for rank_mbs in drawn)
    stats.steps += 1
    stats.real_tokens += sum(lengths)
    stats.slowest_rank_cost += max(plan.rank_loads)
    stats.drawn_slowest_rank_cost += drawn_cost
    stats.seconds += elapsed
    stats.fallbacks += int(plan.fallback)
    stats.history.append(tuple(indices))
    if stats.steps == 1:
        limit = sum(lengths) / world_size
        log_rank0(
            f"batch repacking ({layout}, {'cross-rank' if settings.cross_rank else 'per-rank'}): first step "
            f"slowest rank {max(plan.rank_loads):.0f} vs {drawn_cost:.0f} padded as drawn; limit {limit:.0f} "
            f"tokens; planning took {elapsed * 1e3:.1f} ms"
        )
    return batch_samples, num_items_in_batch


def settings_for(trainer, **overrides) -> BatchSamplesSettings:
    """Per-trainer settings: ``trainer._opensloth_packing_settings = settings_for(trainer, layout=...)``."""
    base = getattr(trainer, "_opensloth_packing_settings", None) or _SETTINGS
    return replace(base, **overrides)
