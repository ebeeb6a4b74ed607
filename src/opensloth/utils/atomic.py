"""Moved to :mod:`opensloth.atomic`; this path keeps old imports working."""

from opensloth.atomic import write_json_atomic, write_jsonl_atomic, write_text_atomic

__all__ = ["write_json_atomic", "write_jsonl_atomic", "write_text_atomic"]
