"""Moved to :mod:`opensloth.packing`; this path keeps old imports working (``opensloth.utils.packing.pack``)."""

from opensloth.packing import *  # noqa: F401,F403
from opensloth.packing import __all__  # noqa: F401
