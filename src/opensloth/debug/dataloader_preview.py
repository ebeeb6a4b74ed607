"""HTML preview of training batches: what is trained, what is masked, where sequences end.

    from opensloth.debug.dataloader_preview import debug_chat_dataloader_for_training
    path = debug_chat_dataloader_for_training(trainer, tokenizer, n_example=2)

Open the written file (under ``.log/``) in a browser. Each micro-batch is a
table of rows; every token is coloured:

- green: a target (its label is not -100; it is predicted from the tokens
  before it and counts in ``num_items_in_batch``);
- grey: a real token that is not trained (prompt, system turn, or the first
  token of a packed sequence, which must not be predicted from the previous
  sequence);
- faint: padding.

A red bar marks the start of every sequence inside a packed row, with the
sequence number; position ids restart there.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from opensloth.log import log_rank0

IGNORE_INDEX = -100

_STYLE = """
body { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; margin: 1.5em; }
h2 { font-family: sans-serif; margin-top: 2em; }
.summary { font-family: sans-serif; color: #333; margin: .3em 0 .8em 0; }
.row { border: 1px solid #ddd; padding: .4em; margin: .3em 0; line-height: 1.9; word-break: break-all; }
.tok { padding: 1px 0; white-space: pre-wrap; }
.trained { background: #c8f7c5; }
.masked { background: #e4e4e4; color: #555; }
.pad { color: #c9c9c9; }
.boundary { display: inline-block; background: #d93025; color: white; font-family: sans-serif;
            font-size: 10px; padding: 0 3px; margin: 0 2px; border-radius: 2px; }
.legend span { margin-right: 1.2em; padding: 2px 6px; }
"""


def _row_segments(batch: dict, r: int, pad_token_id: int | None) -> tuple[list[tuple[int, int]], set[int]]:
    """(sequence spans [start, end) of row r, indices of padding tokens)."""
    ids = batch["input_ids"][r]
    width = ids.shape[-1]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        real = [t for t in range(width) if int(mask[r, t]) != 0]
        pad = set(range(width)) - set(real)
        return ([(real[0], real[-1] + 1)] if real else []), pad
    pos = batch.get("position_ids")
    if pos is None:
        return [(0, width)], set()
    starts = [t for t in range(width) if int(pos[r, t]) == 0] + [width]
    spans = list(zip(starts[:-1], starts[1:]))
    labels = batch.get("labels")
    # Packed rows end in a padding tail that forms its own span: only pad tokens, no targets.
    if len(spans) > 1 and pad_token_id is not None and labels is not None:
        a, b = spans[-1]
        if bool((ids[a:b] == pad_token_id).all()) and bool((labels[r, a:b] == IGNORE_INDEX).all()):
            return spans[:-1], set(range(a, b))
    return spans, set()


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
    return text.replace("\n", "\u21b5\n") if text else "\u2205"


def _render_batch(batch: dict, tokenizer, index: int, max_tokens: int | None) -> str:
    ids, labels = batch["input_ids"], batch.get("labels")
    if ids.dim() == 1:
        ids = ids[None]
    rows_html = []
    n_real = n_trained = n_pad = n_seq = 0
    for r in range(ids.shape[0]):
        spans, pad = _row_segments(batch, r, getattr(tokenizer, "pad_token_id", None))
        starts = {a: k for k, (a, _) in enumerate(spans)}
        n_seq += len(spans)
        parts = []
        width = ids.shape[1] if max_tokens is None else min(ids.shape[1], max_tokens)
        for t in range(ids.shape[1]):
            trained = labels is not None and int(labels[r, t]) != IGNORE_INDEX
            if t in pad:
                n_pad += 1
                cls = "pad"
            else:
                n_real += 1
                n_trained += int(trained)
                cls = "trained" if trained else "masked"
            if t >= width:
                continue
            if t in starts and (len(spans) > 1 or "position_ids" in batch):
                parts.append(f'<span class="boundary">seq {starts[t]}</span>')
            title = f"pos {t} id {int(ids[r, t])} label {int(labels[r, t]) if labels is not None else '-'}"
            parts.append(f'<span class="tok {cls}" title="{title}">{html.escape(_token_text(tokenizer, int(ids[r, t])))}</span>')
        if width < ids.shape[1]:
            parts.append(f" \u2026 ({ids.shape[1] - width} more tokens)")
        rows_html.append(f'<div class="row">{"".join(parts)}</div>')
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        kind = "packed rows, 4D block-causal mask"
    elif "cu_seq_lens_q" in batch or (mask is None and "position_ids" in batch):
        kind = "padding-free (varlen) row"
    else:
        kind = "padded rows"
    total = n_real + n_pad
    summary = (
        f"{kind}; shape {tuple(ids.shape)}; {n_seq} sequence(s); {n_real} real tokens "
        f"({n_trained} trained), {n_pad} padding ({100 * n_pad / max(total, 1):.1f}%)"
    )
    return f"<h2>micro-batch {index}</h2><div class='summary'>{html.escape(summary)}</div>" + "".join(rows_html)


def _batches_from(source: Any, n_example: int) -> list[dict]:
    """Batches from a Trainer (through its get_batch_samples, so patches show) or an iterable."""
    if hasattr(source, "get_train_dataloader") and hasattr(source, "get_batch_samples"):
        trainer = source
        loader = trainer.get_train_dataloader()
        trainer.callback_handler.train_dataloader = loader
        try:
            batches, _ = trainer.get_batch_samples(iter(loader), n_example, trainer.args.device)
        finally:
            # The preview must not change what train() does: forget the preview's step state.
            for attr in ("_opensloth_windows", "_opensloth_packing_stats"):
                if hasattr(trainer, attr):
                    delattr(trainer, attr)
        return list(batches)
    out = []
    for batch in source if not isinstance(source, dict) else [source]:
        out.append(batch)
        if len(out) >= n_example:
            break
    return out


def debug_chat_dataloader_for_training(
    dataloader: Any,
    tokenizer=None,
    n_example: int = 2,
    *,
    out_dir: str | Path = ".log",
    filename: str = "dataloader_preview.html",
    max_tokens_per_row: int | None = 4096,
) -> Path:
    """Write an HTML preview of the first training micro-batches and return its path.

    Args:
        dataloader: a Trainer (previewed through its ``get_batch_samples``, so
            opensloth's packing shows when patched), a DataLoader, or any
            iterable of batch dicts (``input_ids``, ``labels``, and
            ``attention_mask`` or ``position_ids``); a single dict works too.
        tokenizer: turns token ids into text; ids are shown without it.
        n_example: how many micro-batches to preview.
        out_dir: folder for the file (created).
        filename: file name inside ``out_dir``.
        max_tokens_per_row: cut long rows in the preview (None: show all).

    Returns:
        Path of the HTML file.

    Raises:
        ValueError: no batch could be read, or a batch has no ``input_ids``.
    """
    batches = _batches_from(dataloader, n_example)
    if not batches:
        raise ValueError("the dataloader yielded no batch to preview")
    for b in batches:
        if "input_ids" not in b:
            raise ValueError(f"a batch has no 'input_ids' (keys: {sorted(b)})")
    body = "".join(_render_batch(b, tokenizer, i, max_tokens_per_row) for i, b in enumerate(batches))
    legend = (
        "<div class='legend'><span class='tok trained'>trained target</span>"
        "<span class='tok masked'>masked (label -100)</span><span class='tok pad'>padding</span>"
        "<span class='boundary'>seq k</span> sequence start (position ids restart)</div>"
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>opensloth dataloader preview</title>"
        f"<style>{_STYLE}</style></head><body><h1>opensloth dataloader preview</h1>{legend}{body}</body></html>"
    )
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    path = path / filename
    path.write_text(page, encoding="utf-8")
    log_rank0(f"wrote dataloader preview of {len(batches)} micro-batch(es) to {path}")
    return path
