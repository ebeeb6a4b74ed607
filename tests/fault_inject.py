"""Run a training script with a simulated fault (for the fault tests; never used by the package).

    python tests/fault_inject.py enospc:checkpoint-4/optimizer.pt train_scripts/train_configurable.py ARGS...

``enospc:<suffix>``: the first ``torch.save`` to a path ending in ``<suffix>``
writes a few bytes and raises ``OSError(ENOSPC)``, as a disk that fills up
while a checkpoint is written. The script then runs as ``__main__`` with ARGS.
"""

from __future__ import annotations

import errno
import os
import runpy
import sys


def _enospc_on(suffix: str) -> None:
    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(suffix):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04")  # the start of a zip archive, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
        return original(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    fault, script, *args = sys.argv[1:]
    kind, _, target = fault.partition(":")
    if kind != "enospc":
        raise SystemExit(f"unknown fault {fault!r}")
    _enospc_on(target)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
