"""Moved to :mod:`opensloth.launch`; this path keeps old imports working."""

from opensloth.launch import (BACKENDS, DEFAULT_MODEL, DEFAULT_PREFERENCE_DATASET, DEFAULT_SFT_DATASET, DTYPES,
                              LoraSettings, check_model_source, import_backend, load_model_and_tokenizer,
                              read_log_history, resolve_backend, resolve_per_device_batch, run_dir_for, step_losses)

__all__ = ["BACKENDS", "DEFAULT_MODEL", "DEFAULT_PREFERENCE_DATASET", "DEFAULT_SFT_DATASET", "DTYPES", "LoraSettings",
           "check_model_source", "import_backend", "load_model_and_tokenizer", "read_log_history", "resolve_backend",
           "resolve_per_device_batch", "run_dir_for", "step_losses"]
