"""opensloth.markdown: the one "rewrite the block between markers" helper of every report."""

from __future__ import annotations

import pytest

from opensloth.markdown import markers, replace_block, update_markdown_block


def test_block_is_replaced_and_the_rest_kept_byte_for_byte():
    text = "# B\n\n<!-- a:start -->\nold a\n<!-- a:end -->\nmiddle \t\n<!-- b:start -->\nold b\n<!-- b:end -->\ntail"
    out = replace_block(text, *markers("a"), "\nnew a\n\n")
    assert out == text.replace("old a", "new a")
    assert replace_block(out, *markers("b"), "new b") == out.replace("old b", "new b")


def test_missing_block_is_appended_or_refused():
    assert replace_block("# B\n\n\n", *markers("x"), "body") == "# B\n\n<!-- x:start -->\nbody\n<!-- x:end -->\n"
    with pytest.raises(ValueError, match="no '<!-- x:start -->'"):
        replace_block("# B\n", *markers("x"), "body", missing="error")
    # An end marker before the start marker is not a block.
    swapped = "<!-- x:end -->\n<!-- x:start -->\n"
    with pytest.raises(ValueError):
        replace_block(swapped, *markers("x"), "body", missing="error")


def test_file_update_twice_keeps_one_block(tmp_path):
    bench = tmp_path / "benchmarks.md"
    bench.write_text("# Benchmarks\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    update_markdown_block(str(bench), "oak_dpo", "first")
    update_markdown_block(str(bench), "oak_dpo", "second")
    text = bench.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count("<!-- oak_dpo:start -->") == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written atomically


def test_custom_markers_and_a_missing_file(tmp_path):
    doc = tmp_path / "doc.md"
    with pytest.raises(FileNotFoundError):
        update_markdown_block(str(doc), ("<!-- results:begin -->", "<!-- results:end -->"), "x", missing="error")
    update_markdown_block(str(doc), ("<!-- results:begin -->", "<!-- results:end -->"), "x", new_file="# R\n")
    assert doc.read_text() == "# R\n\n<!-- results:begin -->\nx\n<!-- results:end -->\n"
