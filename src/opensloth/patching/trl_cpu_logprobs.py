"""Moved to :mod:`opensloth.patches.trl_cpu_logprobs`; this path keeps old imports working."""

from opensloth.patches.trl_cpu_logprobs import *  # noqa: F401,F403
from opensloth.patches.trl_cpu_logprobs import __all__  # noqa: F401
