"""Rank-aware logging: the one helper every opensloth module uses.

Rank 0 prints summaries (:func:`log_rank0`); any rank may print its own
messages with its rank in the prefix (:func:`log_all_ranks`). The rank is read
from the environment so that this works before a process group exists.
"""

from __future__ import annotations

import logging
import os
import sys

_LOGGER_NAME = "opensloth"


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:  # validated elsewhere; logging must never crash
        return 0


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the object current when the logger was made),
    so redirections after the first log line (pytest's capture, a caller's ``contextlib.redirect_stderr``)
    still receive opensloth's messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def get_logger() -> logging.Logger:
    """Return the package logger, configured once to print to stderr."""
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[opensloth%(rank_tag)s] %(levelname)s: %(message)s"))
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("OPENSLOTH_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "rank_tag"):
            record.rank_tag = ""
        return True


def log_rank0(msg: str, level: int = logging.INFO) -> None:
    """Log ``msg`` from global rank 0 only."""
    if _env_rank() == 0:
        get_logger().log(level, msg)


def log_all_ranks(msg: str, level: int = logging.INFO) -> None:
    """Log ``msg`` from every rank, prefixed with the rank."""
    get_logger().log(level, msg, extra={"rank_tag": f" rank {_env_rank()}"})


def warn_rank0(msg: str) -> None:
    log_rank0(msg, logging.WARNING)


_WARNED: set[str] = set()


def warn_once(msg: str, key: str | None = None) -> None:
    """:func:`warn_rank0` the first time ``key`` (default: the message itself) comes up in this process."""
    key = msg if key is None else key
    if key not in _WARNED:
        _WARNED.add(key)
        warn_rank0(msg)
