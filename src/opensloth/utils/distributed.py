"""Moved to :mod:`opensloth.distributed`; this path keeps old imports working."""

from opensloth.distributed import all_gather_object_list, barrier, ensure_process_group, preferred_backend

__all__ = ["all_gather_object_list", "barrier", "ensure_process_group", "preferred_backend"]
