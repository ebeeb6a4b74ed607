"""Error types that scripts turn into one clear line (no stack trace)."""

from __future__ import annotations

import sys


class UserInputError(ValueError):
    """Bad input from the user: a path, a flag, an environment variable, a data row.

    The message names the culprit and says how to fix it.
    """


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; print user errors as one ``error:`` line and return 2.

    Library-version mismatches of opensloth patches (PatchTargetError) are
    reported the same way: they are fixed by installing a supported version.
    """
    from opensloth.patching.registry import PatchTargetError

    try:
        main(argv)
    except (UserInputError, PatchTargetError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
