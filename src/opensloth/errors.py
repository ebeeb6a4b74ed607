"""Error types that scripts turn into one clear line (no stack trace), and :func:`run_cli`.

A leaf module: it imports nothing else from opensloth, so every layer may use it.
"""

from __future__ import annotations

import sys


class UserInputError(ValueError):
    """Bad input from the user: a path, a flag, an environment variable, a data row.

    The message names the culprit and says how to fix it.
    """


class PatchTargetError(RuntimeError):
    """The object a patch replaces is missing or no longer looks as expected.

    Raised by the patches of :mod:`opensloth.patches`; fixed by installing a
    supported library version, so scripts report it like a user error.
    """


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; print user errors as one ``error:`` line and return 2.

    Library-version mismatches of opensloth patches (:class:`PatchTargetError`)
    are reported the same way: they are fixed by installing a supported version.
    """
    try:
        main(argv)
    except (UserInputError, PatchTargetError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
