"""Materialising packed micro-batches (torch, imported inside the functions), and :func:`pack`.

Label rule for packed rows. A causal LM predicts ``labels[t + 1]`` at position
``t``. When sequence B follows sequence A in a row, the last position of A
would predict B's first token; in the unpacked run that token is never a
target (it is position 0 of its own row). So the label at the first token of
every packed sequence is set to ``-100``. With that rule, the number of
targets ``(labels[..., 1:] != -100).sum()`` of a packed batch equals the sum of
the per-sequence counts, and the Trainer's ``num_items_in_batch`` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from opensloth.log import warn_once
from opensloth.packing.partition import best_fit_decreasing
from opensloth.packing.planner import LAYOUTS

if TYPE_CHECKING:  # pragma: no cover
    import torch

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("error", "truncate", "split")

__all__ = [
    "IGNORE_INDEX",
    "LEGACY_ATTN_MODES",
    "LEGACY_MAX_SEQL",
    "OVERFLOW_POLICIES",
    "Segment",
    "apply_overflow",
    "build_micro_batch",
    "pack",
    "sequences_from_batch",
]


@dataclass(frozen=True)
class Segment:
    """One sequence placed in a packed batch: ``row``, ``start``, ``length``, and
    ``source`` (index of the sample it came from; a split sample gives several)."""

    row: int
    start: int
    length: int
    source: int


def _as_1d_long(x):
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(list(x), dtype=torch.long)
    return t.reshape(-1).to(torch.long)


def sequences_from_batch(batch: Mapping[str, Any]) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """Unpad a batch into its samples: a list of ``(input_ids, labels)`` 1D tensors.

    Accepts a padded batch (2D ``input_ids`` with ``attention_mask`` marking
    real tokens, any padding side), a padding-free batch (``position_ids``
    restarting at 0 for every sequence, no ``attention_mask``), or lists of
    per-sample lists. ``labels`` default to ``input_ids``.

    Raises:
        ValueError: the batch is empty, a sample has no tokens, or shapes of
            ``labels``/``attention_mask`` disagree with ``input_ids``.
    """
    import torch

    if "input_ids" not in batch:
        raise ValueError("batch has no 'input_ids'")
    ids = batch["input_ids"]
    labels = batch.get("labels")
    mask = batch.get("attention_mask")
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"empty batch or bad input_ids shape {tuple(ids.shape)}")
        labels = ids if labels is None else labels
        if labels.dim() == 1:
            labels = labels[None]
        if labels.shape != ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(ids.shape)}")
        if mask is not None and mask.dim() == 2:
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
            for r in range(ids.shape[0]):
                keep = mask[r] != 0
                if not bool(keep.any()):
                    raise ValueError(f"sample {r} has no tokens (attention_mask is all zero)")
                out.append((ids[r][keep].long(), labels[r][keep].long()))
        elif "position_ids" in batch and mask is None:
            pos = batch["position_ids"].reshape(ids.shape)
            for r in range(ids.shape[0]):
                starts = (pos[r] == 0).nonzero().flatten().tolist()
                if not starts or starts[0] != 0:
                    raise ValueError("position_ids of a padding-free batch must start every sequence at 0")
                bounds = starts + [ids.shape[1]]
                for a, b in zip(bounds[:-1], bounds[1:]):
                    out.append((ids[r, a:b].long(), labels[r, a:b].long()))
        elif mask is not None:
            raise ValueError("a 4D attention_mask is already packed; pass the unpacked samples instead")
        else:
            for r in range(ids.shape[0]):
                out.append((ids[r].long(), labels[r].long()))
    else:
        rows = list(ids)
        if not rows:
            raise ValueError("empty batch: no samples")
        label_rows = list(labels) if labels is not None else rows
        mask_rows = list(mask) if mask is not None else [None] * len(rows)
        if len(label_rows) != len(rows) or len(mask_rows) != len(rows):
            raise ValueError("input_ids, labels and attention_mask must have the same number of samples")
        for r, (x, y, m) in enumerate(zip(rows, label_rows, mask_rows)):
            x, y = _as_1d_long(x), _as_1d_long(y)
            if x.shape != y.shape:
                raise ValueError(f"sample {r}: labels length {y.numel()} != input_ids length {x.numel()}")
            if m is not None:
                keep = _as_1d_long(m) != 0
                x, y = x[keep], y[keep]
            out.append((x, y))
    for r, (x, _) in enumerate(out):
        if x.numel() == 0:
            raise ValueError(f"sample {r} has no tokens")
    if not out:
        raise ValueError("empty batch: no samples")
    return out


def apply_overflow(
    sequences: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
    max_seql: int,
    overflow: str = "error",
) -> tuple[list[tuple["torch.Tensor", "torch.Tensor"]], list[int]]:
    """Apply the over-length policy to sequences longer than ``max_seql``.

    Policies:
        ``"error"``: raise ValueError naming the first offending sample.
        ``"truncate"``: keep the first ``max_seql`` tokens (TRL's ``keep_start``).
        ``"split"``: cut into consecutive pieces of at most ``max_seql`` tokens,
            each packed as its own sequence. Each later piece loses its first
            target (its first label becomes -100) and the context before it.

    Returns:
        ``(pieces, source)``: the resulting sequences and, for each, the index
        of the input sequence it came from.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if max_seql < 1:
        raise ValueError(f"max_seql must be >= 1, got {max_seql}")
    pieces, source = [], []
    for i, (x, y) in enumerate(sequences):
        n = x.numel()
        if n <= max_seql:
            pieces.append((x, y))
            source.append(i)
        elif overflow == "error":
            shortest = min(s[0].numel() for s in sequences)
            hint = " (shorter than every sequence)" if max_seql < shortest else ""
            raise ValueError(
                f"sample {i} has {n} tokens, more than max_seql={max_seql}{hint}; "
                f"pass overflow='truncate' or overflow='split', or raise max_seql"
            )
        elif overflow == "truncate":
            pieces.append((x[:max_seql], y[:max_seql]))
            source.append(i)
        else:
            for a in range(0, n, max_seql):
                pieces.append((x[a:a + max_seql], y[a:a + max_seql]))
                source.append(i)
    return pieces, source


def build_micro_batch(
    sequences: Sequence[tuple["torch.Tensor", "torch.Tensor"]],
    rows: Sequence[Sequence[int]],
    *,
    layout: str,
    pad_token_id: int = 0,
    mask_dtype: "torch.dtype | None" = None,
    sources: Sequence[int] | None = None,
    extra_fields: Iterable[str] = (),
) -> tuple[dict[str, "torch.Tensor"], list[Segment]]:
    """Materialise one micro-batch from sequences and a row arrangement.

    Args:
        sequences: ``(input_ids, labels)`` 1D tensors.
        rows: indices into ``sequences`` per row (for ``"varlen"`` the rows are
            concatenated into a single row; for ``"padded"`` use one sequence
            per row). Empty ``rows`` (or ``[[]]``) gives a two-token all-masked
            micro-batch, so a rank without samples still runs a pass.
        layout: ``"rows4d"``: ``[R, L]`` rows with a float additive 4D
            block-causal ``attention_mask [R, 1, L, L]`` (0 where attention is
            allowed, the dtype's minimum elsewhere); padding at a row's end
            forms its own block, so no query row is fully masked.
            ``"varlen"``: one ``[1, T]`` row, ``position_ids``,
            ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (flash-attention
            varlen fields), no ``attention_mask``.
            ``"padded"``: ``[R, L]`` rows, right padding, 2D ``attention_mask``.
        pad_token_id: token used for padding.
        mask_dtype: dtype of the 4D mask (default float32).
        sources: sample index per sequence, reported in the segments.
        extra_fields: padding-free extras to rebuild for ``"varlen"``:
            ``"packed_seq_lengths"`` (int32 lengths, Unsloth) and ``"seq_idx"``
            (int32 sequence index per token).

    Returns:
        ``(batch, segments)``. In every layout the label at the first token of
        each sequence is -100 (see the module docstring) and ``position_ids``
        restart at 0 for each sequence.
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rows = [list(r) for r in rows if len(r) > 0]
    if not rows:
        dummy = torch.full((2,), pad_token_id, dtype=torch.long)
        sequences = [(dummy, torch.full((2,), IGNORE_INDEX, dtype=torch.long))]
        rows = [[0]]
        sources = [-1]
    if sources is None:
        sources = list(range(len(sequences)))
    if layout == "varlen":
        rows = [[i for row in rows for i in row]]
    if layout == "padded" and any(len(r) != 1 for r in rows):
        raise ValueError("the padded layout takes one sequence per row")

    row_lens = [sum(sequences[i][0].numel() for i in row) for row in rows]
    width = max(row_lens)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    block = torch.full((n_rows, width), -1, dtype=torch.long)  # block id per token, for the 4D mask
    segments: list[Segment] = []
    for r, row in enumerate(rows):
        at = 0
        for b, i in enumerate(row):
            x, y = sequences[i]
            n = x.numel()
            input_ids[r, at:at + n] = x
            labels[r, at:at + n] = y
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at:at + n] = torch.arange(n)
            block[r, at:at + n] = b
            segments.append(Segment(row=r, start=at, length=n, source=int(sources[i])))
            at += n
        if at < width:  # padding tail: its own block, positions from 0
            position_ids[r, at:] = torch.arange(width - at)
            block[r, at:] = len(row)

    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}
    if layout == "padded":
        attn = torch.zeros((n_rows, width), dtype=torch.long)
        for r, n in enumerate(row_lens):
            attn[r, :n] = 1
        batch["attention_mask"] = attn
        batch["position_ids"] = position_ids
    elif layout == "rows4d":
        dtype = mask_dtype or torch.float32
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (block[:, :, None] == block[:, None, :]) & causal
        mask = torch.zeros((n_rows, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        batch["attention_mask"] = mask
        batch["position_ids"] = position_ids
    else:
        lens = [s.length for s in segments]
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        batch["position_ids"] = position_ids
        batch["cu_seq_lens_q"] = cu
        batch["cu_seq_lens_k"] = cu.clone()
        batch["max_length_q"] = max(lens)
        batch["max_length_k"] = max(lens)
        extra = set(extra_fields)
        if "packed_seq_lengths" in extra:
            batch["packed_seq_lengths"] = torch.tensor(lens, dtype=torch.int32)
        if "seq_idx" in extra:
            batch["seq_idx"] = torch.repeat_interleave(
                torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens)
            )[None]
    return batch, segments


LEGACY_MAX_SEQL = 64
LEGACY_ATTN_MODES = ("tri", "dense", "diag")


def pack(
    batch: Mapping[str, Any],
    max_seql: int | None = None,
    pad_token_id: int | None = None,
    pad_label_id: int = IGNORE_INDEX,
    device: Any = None,
    return_token_mask: bool | None = None,
    attn_mode: str | None = None,
    *,
    attention: str = "4d",
    overflow: str | None = None,
    mask_dtype: "torch.dtype | None" = None,
    return_segments: bool = False,
):
    """Pack a batch of samples into rows of at most ``max_seql`` tokens.

    Rows are formed by :func:`best_fit_decreasing`. Inside a row every
    sequence gets ``position_ids`` from 0 and attends only to itself, and the
    label at each sequence's first token is -100, so the packed forward gives
    each token the same log-probability as running its sequence alone.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` (see
            :func:`sequences_from_batch` for the accepted forms).
        max_seql: row capacity in tokens.
        pad_token_id: padding token (default 0).
        attention: ``"4d"``: rows with a 4D block-causal float mask (SDPA,
            eager). ``"varlen"``: the rows concatenated into one padding-free
            row with ``cu_seq_lens_q/k`` and ``max_length_q/k`` (flash-attention
            varlen; also understood by SDPA/eager through ``position_ids`` when
            ``use_cache=False``).
        overflow: policy for sequences longer than ``max_seql``: ``"error"``
            (default), ``"truncate"`` or ``"split"`` (:func:`apply_overflow`).
        mask_dtype: dtype of the 4D mask (default float32; use the model's).
        return_segments: also return the list of :class:`Segment`.

    The original OpenSloth's call, ``pack(batch, max_seql=64, pad_token_id=None,
    pad_label_id=-100, device=None, return_token_mask=True, attn_mode="tri")``,
    works too: omitting ``max_seql`` or passing ``pad_label_id``, ``device``,
    ``return_token_mask`` or ``attn_mode`` selects its output (see
    :func:`_legacy_output`), splits over-long rows as it did, infers a missing
    ``pad_token_id`` from the padding, and warns once about what differs.

    Returns:
        The packed batch (dict of tensors), or ``(batch, segments)``.

    Raises:
        ValueError: empty batch, a sample without tokens, a sample longer than
            ``max_seql`` under ``overflow="error"`` (including a capacity below
            the shortest sequence), or no label left to train on (every label
            is -100 once the first token of each sequence is masked).
    """
    legacy = (max_seql is None or device is not None or return_token_mask is not None or attn_mode is not None
              or pad_label_id != IGNORE_INDEX)
    if attention not in ("4d", "varlen"):
        raise ValueError(f"attention must be '4d' or 'varlen', got {attention!r}")
    if legacy:
        attn_mode = "tri" if attn_mode is None else attn_mode
        if attn_mode not in LEGACY_ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {LEGACY_ATTN_MODES}, got {attn_mode!r}")
        if attention != "4d" or return_segments:
            raise ValueError("pack(): the original OpenSloth's arguments (device, return_token_mask, attn_mode, "
                             "pad_label_id, a default max_seql) give its output; drop them to use attention= or "
                             "return_segments=")
        max_seql = LEGACY_MAX_SEQL if max_seql is None else max_seql
        overflow = "split" if overflow is None else overflow
        if pad_token_id is None:
            pad_token_id = _infer_pad_token_id(batch)
        warn_once(
            "pack() called with the original OpenSloth's arguments: its output keys and bool (rows, L, L) "
            "attention_mask are kept and over-long samples are split as before, but the first label of every "
            "packed sequence (and of every split piece) is -100: the original trained the last token of one "
            "sequence to predict the first of the next. For transformers' 4D mask call "
            "pack(batch, max_seql, attention='4d').", key="pack-legacy")
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    sequences = sequences_from_batch(batch)
    pieces, source = apply_overflow(sequences, int(max_seql), overflow or "error")
    if not any(bool((y[1:] != IGNORE_INDEX).any()) for _, y in pieces):
        raise ValueError(
            "every label in the batch is masked (-100), so it would train nothing; "
            "drop fully masked samples before packing (TRL drops them during dataset preparation)"
        )
    rows = best_fit_decreasing([x.numel() for x, _ in pieces], int(max_seql))
    out, segments = build_micro_batch(
        pieces,
        rows,
        layout="rows4d" if attention == "4d" else "varlen",
        pad_token_id=pad_token_id,
        mask_dtype=mask_dtype,
        sources=source,
    )
    if legacy:
        return _legacy_output(out, segments, pad_label_id=pad_label_id, attn_mode=attn_mode, device=device,
                              return_token_mask=return_token_mask is not False)
    return (out, segments) if return_segments else out


def _infer_pad_token_id(batch: Mapping[str, Any]) -> int:
    """The original's guess: the token right after the real tokens of the first right-padded row, else 0."""
    mask = batch.get("attention_mask")
    if mask is None:
        return 0
    for ids, row_mask in zip(batch["input_ids"], mask):
        row_mask, ids = _as_1d_long(row_mask), _as_1d_long(ids)
        used = int(row_mask.sum())
        if used < row_mask.numel():
            return int(ids[used])
    return 0


def _legacy_output(out, segments, *, pad_label_id: int, attn_mode: str, device, return_token_mask: bool):
    """The original OpenSloth's ``pack`` output from a ``rows4d`` micro-batch.

    Keys: ``input_ids``, ``labels`` (``pad_label_id`` on padding),
    ``position_ids`` (0 on padding), ``attention_mask`` (bool ``(rows, L, L)``,
    True where attention is allowed: causal ``"tri"``, full ``"dense"`` or
    ``"diag"`` blocks per sequence; padding attends nowhere), ``packed_lengths``
    (tokens used per row) and, unless ``return_token_mask=False``,
    ``token_mask`` (1 on each row's used prefix).
    """
    import torch

    n_rows, width = out["input_ids"].shape
    lengths = torch.zeros(n_rows, dtype=torch.long)
    allowed = torch.zeros((n_rows, width, width), dtype=torch.bool)
    for seg in segments:
        lengths[seg.row] += seg.length
        block = slice(seg.start, seg.start + seg.length)
        if attn_mode == "tri":
            allowed[seg.row, block, block] = torch.ones((seg.length, seg.length), dtype=torch.bool).tril()
        elif attn_mode == "dense":
            allowed[seg.row, block, block] = True
        else:
            allowed[seg.row, block, block] = torch.eye(seg.length, dtype=torch.bool)
    token_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    labels = out["labels"].masked_fill(token_mask == 0, pad_label_id)
    result = {
        "input_ids": out["input_ids"],
        "labels": labels,
        "position_ids": out["position_ids"] * token_mask,
        "attention_mask": allowed,
        "packed_lengths": lengths,
    }
    if return_token_mask:
        result["token_mask"] = token_mask
    if device is not None:
        result = {k: v.to(device) for k, v in result.items()}
    return result
