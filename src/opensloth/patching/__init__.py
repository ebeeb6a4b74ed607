"""Monkey patches of transformers / TRL / Unsloth, each listed by :func:`applied_patches`.

Import the individual patch modules explicitly; this package imports nothing heavy.
"""

from opensloth.patching.registry import PatchRecord, PatchTargetError, applied_patches

__all__ = ["PatchRecord", "PatchTargetError", "applied_patches"]
