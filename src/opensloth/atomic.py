"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one.

A leaf module (standard library only). Every cache marker, checkpoint side file
and manifest in opensloth goes through these helpers (temporary file in the
same folder, fsync, os.replace).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterable


def write_text_atomic(path: str, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (creates the parent folder)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, payload: Any, *, indent: int | None = 1, sort_keys: bool = True,
                      fsync: bool = True) -> None:
    """``json.dumps(payload)`` written atomically; non-JSON values are written with ``repr``."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, default=repr, ensure_ascii=False)
    write_text_atomic(path, text + "\n", fsync=fsync)


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> int:
    """One JSON object per line, written atomically. Returns the number of lines."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)
