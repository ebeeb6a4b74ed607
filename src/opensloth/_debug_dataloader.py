"""Moved to :mod:`opensloth.debug.dataloader_preview`; this path keeps old imports working."""

from opensloth.debug.dataloader_preview import debug_chat_dataloader_for_training

__all__ = ["debug_chat_dataloader_for_training"]
