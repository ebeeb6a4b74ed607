"""Errors that scripts turn into one clear line (no stack trace), and :func:`run_cli`.

A leaf module: it imports nothing else from opensloth, so every layer may use it.

Every entry point ends in ``sys.exit(run_cli(main))``. What a user then sees:

- a :class:`ReportedError` (bad input, an unsupported library version, a
  failed cache build, a checkpoint that could not be written) is one line
  ``error: <what, where, the fix>`` on stderr and exit code 2 (input the user
  fixes) or 1 (a run that failed); no traceback;
- under ``torchrun``, an error that every rank raised for the same reason
  (:attr:`ReportedError.every_rank`: settings, the shared pre-flight verdict)
  is printed by global rank 0 only; the other ranks print nothing and wait
  (up to a minute) for torchrun to end them once rank 0 has failed, so the
  failure torchrun observes first, and names as the root cause, is rank 0's.
  An error of one rank is printed by that rank, tagged ``error (rank N):``. The printing rank also writes the line into torchrun's
  error file (``TORCHELASTIC_ERROR_FILE``), so torchrun's own failure summary
  shows it as the root cause instead of "To enable traceback see ...";
- ``--debug`` (any position on the command line) or ``OPENSLOTH_DEBUG=1`` adds
  the Python traceback above the line, on every rank.

Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
import traceback

__all__ = [
    "DEBUG_ENV",
    "EXIT_FAILED",
    "EXIT_USER",
    "PatchTargetError",
    "ReportedError",
    "UserInputError",
    "debug_requested",
    "one_line",
    "run_cli",
    "same_on_every_rank",
]

DEBUG_ENV = "OPENSLOTH_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_USER = 2  # the input (flags, files, environment, free space) must change
EXIT_FAILED = 1  # the run failed for another reason the message names
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
QUIET_RANK_GRACE_S = 60.0  # how long a quiet rank waits for its launcher to end it


class ReportedError(Exception):
    """An error whose message is complete: what went wrong, where, and the fix.

    :func:`run_cli` prints it as one line and exits with :attr:`exit_code`.

    Attributes:
        exit_code: 2 for input the user changes, 1 for a run that failed.
        every_rank: True when every rank raised it for the same reason (set by
            :func:`same_on_every_rank` or the pre-flight verdict); rank 0 alone prints it.
    """

    exit_code = EXIT_FAILED
    every_rank = False


class UserInputError(ReportedError, ValueError):
    """Bad input from the user: a path, a flag, an environment variable, a data row, no room on disk.

    The message names the culprit and says how to fix it.
    """

    exit_code = EXIT_USER


class PatchTargetError(ReportedError, RuntimeError):
    """The object a patch replaces is missing or no longer looks as expected.

    Raised by the patches of :mod:`opensloth.patches`; fixed by installing a
    supported library version, so scripts report it like a user error.
    """

    exit_code = EXIT_USER


@contextlib.contextmanager
def same_on_every_rank():
    """Mark the :class:`ReportedError` raised inside as raised by every rank alike (rank 0 prints it)."""
    try:
        yield
    except ReportedError as exc:
        exc.every_rank = True
        raise


def debug_requested(environ=None) -> bool:
    """``OPENSLOTH_DEBUG`` is set to something other than ``""``/``0``/``false``/``no``/``off``."""
    value = (os.environ if environ is None else environ).get(DEBUG_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its type name when the message is blank)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:  # reported by opensloth.distributed; printing must not fail on it
        return default


def _torchelastic_error_file(line: str, callstack: str) -> None:
    """Hand the line to torchrun, which prints it as the root cause of the failure."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # The nested form: torchrun shows extraInfo.py_callstack and sets its error code without warnings.
    payload = {"message": {"message": line, "extraInfo": {"py_callstack": callstack,
                                                          "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh)


def _outlive_rank0() -> None:
    """Under a torchelastic launcher, wait to be ended instead of exiting first.

    torchrun sends SIGTERM to every other rank as soon as it sees one fail,
    and reports the first failure it saw as the root cause. A quiet rank that
    exited first would be that root cause (with nothing to show), and rank 0
    could be killed before it printed the line. So the quiet rank waits; rank 0
    fails within moments (every rank raised the same error), the launcher ends
    this one, and the bound (:data:`QUIET_RANK_GRACE_S`) only matters if rank 0
    never fails.
    """
    if not (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("TORCHELASTIC_ERROR_FILE")):
        return  # no launcher watches this process: nothing will end it
    deadline = time.monotonic() + QUIET_RANK_GRACE_S
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))  # not synchronisation: the launcher's SIGTERM ends the wait


def _report(exc: BaseException, message: str, exit_code: int, every_rank: bool, debug: bool) -> int:
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if every_rank and rank != 0 and not debug:
        _outlive_rank0()  # rank 0 prints the same line
        return exit_code
    stack = "".join(traceback.format_exception(exc)) if debug else ""
    if stack:
        print(stack, end="", file=sys.stderr, flush=True)
    prefix = "error" if world_size <= 1 or every_rank else f"error (rank {rank})"
    line = f"{prefix}: {message}"
    print(line, file=sys.stderr, flush=True)
    _torchelastic_error_file(line, stack + line if stack else line)
    return exit_code


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; print a :class:`ReportedError` as one ``error:`` line and return its exit code.

    ``--debug`` is taken out of ``argv`` (like ``OPENSLOTH_DEBUG=1``, it adds
    the traceback). A full disk (``OSError`` ENOSPC/EDQUOT) anywhere is
    reported the same way, with exit code 2. Returns 0 when ``main`` returns.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or debug_requested()
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        main(argv)
    except ReportedError as exc:
        return _report(exc, one_line(exc), exc.exit_code, exc.every_rank, debug)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        return _report(exc, f"no space left on the device{where}; free space (or choose another folder) and rerun",
                       EXIT_USER, False, debug)
    return 0
