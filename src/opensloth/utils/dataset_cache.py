"""Moved to :mod:`opensloth.cache` (and :mod:`opensloth.distributed`); this path keeps old imports working."""

from opensloth.cache import *  # noqa: F401,F403
from opensloth.cache.coordination import BUILDER_MODES, SYNC_MODES, builder_liveness, wait_for_prepared  # noqa: F401
from opensloth.cache.key import cache_key_parts, trainer_prepare_args  # noqa: F401
from opensloth.distributed import DistEnv, DistributedEnvError, _check_distributed_environment  # noqa: F401
from opensloth.patches.prepare_alone import PREPARE_ALONE_PATCH  # noqa: F401
