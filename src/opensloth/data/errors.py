"""Errors raised while reading and formatting datasets.

All of them subclass ``UserInputError`` (a ``ValueError``) so callers that only care about "bad data"
can catch one type. Messages name the file, the line or row, and the fix.
"""

from __future__ import annotations

from typing import Iterable

from opensloth.errors import UserInputError


class DatasetSourceError(UserInputError):
    """A dataset source could not be found or read."""


class DatasetFormatError(UserInputError):
    """A record does not have the structure its format requires.

    ``path`` and ``line`` (1-based) are set when the record came from a file.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class MissingColumnsError(DatasetFormatError):
    """A dataset lacks the columns a format needs."""

    def __init__(self, what: str, expected: Iterable[str], found: Iterable[str], source: str | None = None):
        expected = list(expected)
        found = list(found)
        missing = [c for c in expected if c not in found]
        origin = f" in {source}" if source else ""
        super().__init__(
            f"{what}{origin} needs columns {expected}; found {found} (missing {missing}). "
            f"Rename the columns or pick the matching format."
        )
        self.expected = expected
        self.found = found
        self.missing = missing


class EmptyDatasetError(UserInputError):
    """No record survived loading and filtering (scripts print it as one line)."""


def require_columns(column_names: Iterable[str], expected: Iterable[str], what: str, source: str | None = None) -> None:
    """Raise :class:`MissingColumnsError` unless every expected column is present."""
    found = list(column_names)
    if any(c not in found for c in expected):
        raise MissingColumnsError(what, expected, found, source)
