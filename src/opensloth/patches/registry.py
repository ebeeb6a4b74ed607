"""Bookkeeping for every monkey patch opensloth applies.

Rules every patch follows (see STYLE.md):

1. It states the library versions it was written for (``written_for``).
2. It checks that its target exists (and, where it matters, still looks the
   way the patch expects) and raises :class:`PatchTargetError` otherwise.
3. It records itself here, so ``opensloth.patches.applied_patches()`` lists it.
4. It is idempotent: the replacement carries a marker attribute and applying
   the patch again is a no-op.
5. A CPU test proves both the swap and the changed behaviour.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from opensloth.errors import PatchTargetError

__all__ = [
    "PatchRecord",
    "PatchTargetError",
    "applied_patches",
    "is_applied",
    "is_patched",
    "qualified_name",
    "record_patch",
    "require_attr",
    "require_source_contains",
    "swap_method",
    "unpatch",
]

_MARKER = "__opensloth_patch__"


@dataclass(frozen=True)
class PatchRecord:
    name: str
    target: str
    written_for: str
    description: str

    def __str__(self) -> str:
        return f"{self.name}: {self.target} ({self.written_for}) - {self.description}"


_APPLIED: dict[str, PatchRecord] = {}


def applied_patches() -> list[PatchRecord]:
    """Every patch applied in this process, in the order it was applied."""
    return list(_APPLIED.values())


def is_applied(name: str) -> bool:
    return name in _APPLIED


def qualified_name(owner: Any, attr: str) -> str:
    mod = getattr(owner, "__module__", "")
    return f"{mod}.{getattr(owner, '__qualname__', getattr(owner, '__name__', repr(owner)))}.{attr}"


def require_attr(owner: Any, attr: str, patch_name: str, written_for: str) -> Any:
    """Return ``getattr(owner, attr)`` or raise a PatchTargetError naming the patch."""
    if not hasattr(owner, attr):
        raise PatchTargetError(
            f"opensloth patch '{patch_name}' (written for {written_for}) cannot find its target "
            f"{qualified_name(owner, attr)} in the installed version. Install a supported version "
            f"(see pyproject.toml) or report this so the patch can be updated."
        )
    return getattr(owner, attr)


def require_source_contains(func: Callable, snippets: list[str], patch_name: str, written_for: str) -> None:
    """Raise a PatchTargetError unless the source of ``func`` holds every snippet.

    Used where a patch depends on a detail inside a library function: if
    upstream rewrites that detail, the patch must be re-verified, not applied
    blindly.
    """
    original = inspect.unwrap(func)
    try:
        src = inspect.getsource(original)
    except (OSError, TypeError) as exc:
        raise PatchTargetError(
            f"opensloth patch '{patch_name}' (written for {written_for}) cannot read the source of "
            f"{getattr(original, '__qualname__', original)}: {exc}"
        ) from exc
    missing = [s for s in snippets if s not in src]
    if missing:
        raise PatchTargetError(
            f"opensloth patch '{patch_name}' (written for {written_for}): "
            f"{getattr(original, '__qualname__', original)} no longer contains {missing!r}; "
            f"the installed library changed, so the patch was not applied. Pin a supported version."
        )


def is_patched(func: Any, name: str) -> bool:
    """True when ``func`` or any opensloth layer beneath it carries the patch ``name``."""
    return _layers_above(func, name) is not None


def _layers_above(func: Any, name: str) -> list[Any] | None:
    """The opensloth layers stacked above the one named ``name`` (top first), or None if absent."""
    above: list[Any] = []
    while func is not None and getattr(func, _MARKER, None) is not None:
        if getattr(func, _MARKER) == name:
            return above
        above.append(func)
        func = getattr(func, "__wrapped__", None)
    return None


def swap_method(
    owner: Any,
    attr: str,
    make_replacement: Callable[[Callable], Callable],
    *,
    name: str,
    written_for: str,
    description: str,
) -> bool:
    """Replace ``owner.attr`` with ``make_replacement(original)``, once.

    Returns True when the swap happened now, False when it was already in
    place (idempotent). The replacement gets ``__wrapped__`` pointing at the
    original and a marker naming the patch.
    """
    original = require_attr(owner, attr, name, written_for)
    if is_patched(original, name):
        _APPLIED.setdefault(name, PatchRecord(name, qualified_name(owner, attr), written_for, description))
        return False
    replacement = _wrap(original, make_replacement, name, attr)
    setattr(owner, attr, replacement)
    record_patch(name, qualified_name(owner, attr), written_for, description)
    return True


def _wrap(original: Callable, make_replacement: Callable[[Callable], Callable], name: str, attr: str) -> Callable:
    replacement = make_replacement(original)
    setattr(replacement, _MARKER, name)
    replacement._opensloth_make = make_replacement
    replacement.__wrapped__ = original
    replacement.__name__ = getattr(original, "__name__", attr)
    replacement.__qualname__ = getattr(original, "__qualname__", attr)
    replacement.__doc__ = getattr(original, "__doc__", None)
    return replacement


def record_patch(name: str, target: str, written_for: str, description: str) -> None:
    _APPLIED[name] = PatchRecord(name, target, written_for, description)


def unpatch(owner: Any, attr: str, name: str) -> bool:
    """Restore the original of a patch applied by :func:`swap_method` (for tests)."""
    current = getattr(owner, attr, None)
    above = _layers_above(current, name) if current is not None else None
    if above is None:
        return False
    # Peel down to the named layer, drop it, then rebuild the layers that sat on top of it.
    layer = above[-1].__wrapped__ if above else current
    rebuilt = layer.__wrapped__
    for upper in reversed(above):
        rebuilt = _wrap(rebuilt, upper._opensloth_make, getattr(upper, _MARKER), attr)
    setattr(owner, attr, rebuilt)
    _APPLIED.pop(name, None)
    return True
