"""Moved to :mod:`opensloth.patches`; this path keeps old imports working."""

from opensloth.patches import PatchRecord, PatchTargetError, applied_patches

__all__ = ["PatchRecord", "PatchTargetError", "applied_patches"]
