"""Moved to :mod:`opensloth.distributed`; this path keeps old imports working."""

from opensloth.distributed import (SHARE_DEVICE_ENV, all_gather_object_list, barrier, ensure_process_group,
                                   preferred_backend, share_device_requested)

__all__ = ["SHARE_DEVICE_ENV", "all_gather_object_list", "barrier", "ensure_process_group", "preferred_backend",
           "share_device_requested"]
