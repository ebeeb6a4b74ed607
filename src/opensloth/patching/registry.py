"""Moved to :mod:`opensloth.patches.registry`; this path keeps old imports working."""

from opensloth.patches.registry import *  # noqa: F401,F403
from opensloth.patches.registry import __all__  # noqa: F401
