"""Moved to :mod:`opensloth.patches.ddp`; this path keeps old imports working."""

from opensloth.patches.ddp import *  # noqa: F401,F403
from opensloth.patches.ddp import __all__  # noqa: F401
