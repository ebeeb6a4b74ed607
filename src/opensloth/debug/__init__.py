"""Debugging aids: the HTML preview of training batches (``--debug_dataloader``).

- :mod:`~opensloth.debug.dataloader_preview` -- ``debug_chat_dataloader_for_training(trainer, tokenizer)``.
"""
