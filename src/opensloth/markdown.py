"""Rewrite the block of a markdown file between two marker lines: the one helper every report uses.

Benchmarks and experiment drivers keep their tables in ``docs/*.md`` between
HTML comments such as ``<!-- bench_cache:start -->`` and
``<!-- bench_cache:end -->``; everything outside the block stays byte for byte.
It writes through :mod:`opensloth.atomic` (a reader never sees a torn file), so
it sits one layer above the leaves.
"""

from __future__ import annotations

import os

from opensloth.atomic import write_text_atomic

__all__ = ["markers", "replace_block", "update_markdown_block"]


def markers(name: str, start: str = "start", end: str = "end") -> tuple[str, str]:
    """``("<!-- name:start -->", "<!-- name:end -->")``."""
    return f"<!-- {name}:{start} -->", f"<!-- {name}:{end} -->"


def replace_block(text: str, begin: str, end: str, body: str, *, missing: str = "append") -> str:
    """``text`` with the lines between ``begin`` and ``end`` replaced by ``body``.

    Args:
        text: the whole document.
        begin, end: the marker strings (kept in the output).
        body: the new content; surrounding blank lines are trimmed.
        missing: what to do when the markers are absent (or out of order):
            ``"append"`` adds the block at the end after a blank line,
            ``"error"`` raises.

    Returns:
        The new document.

    Raises:
        ValueError: the markers are missing and ``missing="error"``.

    >>> replace_block("a\\n<!-- x:start -->\\nold\\n<!-- x:end -->\\nb\\n", *markers("x"), "new")
    'a\\n<!-- x:start -->\\nnew\\n<!-- x:end -->\\nb\\n'
    >>> replace_block("# T\\n", *markers("x"), "new")
    '# T\\n\\n<!-- x:start -->\\nnew\\n<!-- x:end -->\\n'
    """
    if missing not in ("append", "error"):
        raise ValueError(f"missing={missing!r} must be 'append' or 'error'")
    block = f"{begin}\n{body.strip(chr(10))}\n{end}"
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        return text[:i] + block + text[j + len(end):]
    if missing == "error":
        raise ValueError(f"no '{begin}' ... '{end}' block to update")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_markdown_block(path: str, name_or_markers, body: str, *, missing: str = "append",
                          new_file: str = "# Benchmarks\n") -> str:
    """Replace a marked block of the file at ``path`` (atomically). Returns the new text.

    Args:
        path: the markdown file; created from ``new_file`` when absent
            (unless ``missing="error"``, which then raises FileNotFoundError).
        name_or_markers: a block name (markers ``<!-- name:start/end -->``) or
            a ``(begin, end)`` pair of marker strings.
        body: the new content of the block.
        missing: see :func:`replace_block`.
    """
    begin, end = markers(name_or_markers) if isinstance(name_or_markers, str) else name_or_markers
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    elif missing == "error":
        raise FileNotFoundError(f"{path} does not exist; it must hold a '{begin}' ... '{end}' block")
    else:
        text = new_file
    text = replace_block(text, begin, end, body, missing=missing)
    write_text_atomic(path, text)
    return text
