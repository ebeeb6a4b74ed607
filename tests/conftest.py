"""pytest setup: subprocesses find this interpreter's ``python`` and ``torchrun``.

Shared helpers live in ``tests/helpers.py`` and are imported normally
(``from helpers import REPO, run``); nothing is imported from this file.
"""

from __future__ import annotations

import os
import sys

# Subprocesses that call `python` or `torchrun` must get this interpreter's environment
# (CI runs `.venv/bin/python -m pytest` without activating the venv).
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

from helpers import tokenizer  # noqa: E402,F401  (the shared fixture, for every test module)
