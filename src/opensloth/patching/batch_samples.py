"""Moved to :mod:`opensloth.patches.batch_samples`; this path keeps old imports working."""

from opensloth.patches.batch_samples import *  # noqa: F401,F403
from opensloth.patches.batch_samples import __all__  # noqa: F401
