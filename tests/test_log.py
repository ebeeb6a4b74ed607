"""opensloth.log: rank-aware messages that follow stderr redirections."""

from __future__ import annotations

import contextlib
import io

from opensloth.log import log_all_ranks, log_rank0, warn_once


def test_messages_follow_the_current_stderr(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        log_rank0("one")
    second = io.StringIO()
    with contextlib.redirect_stderr(second):  # the logger was created above, under `first`
        log_rank0("two")
        log_all_ranks("three")
    assert "one" in first.getvalue() and "two" not in first.getvalue()
    assert "INFO: two" in second.getvalue() and "[opensloth rank 0] INFO: three" in second.getvalue()


def test_rank0_only(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        log_rank0("hidden")
        log_all_ranks("shown")
    assert "hidden" not in out.getvalue() and "[opensloth rank 1] INFO: shown" in out.getvalue()


def test_warn_once(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    warn_once("an old argument was used", key="test-warn-once")
    warn_once("an old argument was used (again)", key="test-warn-once")
    warn_once("another one")
    err = capsys.readouterr().err
    assert err.count("an old argument was used") == 1 and "another one" in err
