"""LoRA SFT on any number of ranks: settings (flags + YAML), the SFTConfig and the trainer factory.

``train_scripts/train_configurable.py`` is the entry point; everything is in
:mod:`opensloth.sft.run` (the chat data itself: :func:`opensloth.data.chat.load_chat_splits`).
``import opensloth.sft`` is cheap.
"""

from opensloth.sft.run import SECTIONS, SFTSettings, build_sft_trainer, make_sft_config, resolve_settings

__all__ = ["SECTIONS", "SFTSettings", "build_sft_trainer", "make_sft_config", "resolve_settings"]
