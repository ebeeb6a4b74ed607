"""accelerate's main-process-first, made non-blocking while the dataset cache builds on one rank.

While one rank runs a trainer factory alone (the dataset-cache builder; the
other ranks poll for its files), accelerate's ``main_process_first`` -- which
TRL wraps around its dataset maps -- would wait in a barrier for ranks that
are not there. :func:`prepare_alone` swaps ``PartialState._goes_first`` for a
no-wait version for the duration of the call only (a scoped patch), and
leaves it listed in :func:`opensloth.patches.applied_patches`.
"""

from __future__ import annotations

import contextlib

from opensloth.patches.registry import record_patch, require_attr, require_source_contains, swap_method, unpatch

__all__ = ["PREPARE_ALONE_PATCH", "prepare_alone"]

PREPARE_ALONE_PATCH = "dataset_cache_prepare_alone"
PREPARE_ALONE_WRITTEN_FOR = "accelerate 1.x (PartialState._goes_first behind main_process_first)"
_PREPARE_ALONE_DESCRIPTION = (
    "scoped: only while the dataset cache runs the trainer factory on one rank, main_process_first / "
    "local_main_process_first run their block without waiting for the other ranks"
)


def _no_wait_goes_first_factory(original):
    def _goes_first(self, is_main: bool):
        # The other ranks are not inside this block now (they poll for the cache),
        # so there is nobody to go first of; waiting would deadlock.
        yield

    return _goes_first


@contextlib.contextmanager
def prepare_alone(active: bool):
    """Make accelerate's main-process-first blocks non-blocking while ``active``.

    Raises:
        PatchTargetError: accelerate no longer implements ``main_process_first``
            through ``PartialState._goes_first`` and ``wait_for_everyone``.
    """
    if not active:
        yield
        return
    from accelerate.state import PartialState

    goes_first = require_attr(PartialState, "_goes_first", PREPARE_ALONE_PATCH, PREPARE_ALONE_WRITTEN_FOR)
    require_source_contains(goes_first, ["wait_for_everyone"], PREPARE_ALONE_PATCH, PREPARE_ALONE_WRITTEN_FOR)
    for method in ("main_process_first", "local_main_process_first"):
        require_source_contains(
            require_attr(PartialState, method, PREPARE_ALONE_PATCH, PREPARE_ALONE_WRITTEN_FOR),
            ["_goes_first"],
            PREPARE_ALONE_PATCH,
            PREPARE_ALONE_WRITTEN_FOR,
        )
    swapped = swap_method(
        PartialState,
        "_goes_first",
        _no_wait_goes_first_factory,
        name=PREPARE_ALONE_PATCH,
        written_for=PREPARE_ALONE_WRITTEN_FOR,
        description=_PREPARE_ALONE_DESCRIPTION,
    )
    try:
        yield
    finally:
        if swapped:
            unpatch(PartialState, "_goes_first", PREPARE_ALONE_PATCH)
            # Keep it listed in applied_patches(): it was applied in this process.
            record_patch(PREPARE_ALONE_PATCH, "accelerate.state.PartialState._goes_first",
                         PREPARE_ALONE_WRITTEN_FOR, _PREPARE_ALONE_DESCRIPTION)
