"""opensloth.distributed: the torchrun environment is read and validated in one place."""

from __future__ import annotations

import pytest

from opensloth.distributed import DistributedEnvError, _check_distributed_environment, distributed_env


def test_missing_env_means_one_process():
    env = distributed_env({})
    assert (env.rank, env.local_rank, env.world_size, env.is_distributed) == (0, 0, 1, False)


def test_torchrun_env_is_read():
    env = distributed_env(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert env.is_distributed and not env.is_main and not env.is_local_main


@pytest.mark.parametrize(
    "env, culprit",
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1.5"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "1"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "-2", "RANK": "0"}, "WORLD_SIZE"),
    ],
)
def test_bad_env_names_the_variable(env, culprit):
    with pytest.raises(DistributedEnvError, match=culprit):
        distributed_env(env)



def test_old_name_is_the_same_reader():
    assert _check_distributed_environment is distributed_env


def test_env_unpacks_as_the_original_tuple_and_keeps_its_attributes(monkeypatch):
    """The original returned ``(local_rank, world_size, global_rank)``; scripts unpack it."""
    for name, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    env = _check_distributed_environment()
    local_rank, world_size, global_rank = env
    assert (local_rank, world_size, global_rank) == (1, 4, 3)
    assert tuple(env) == (env[0], env[1], env[2]) == (1, 4, 3) and len(env) == 3 and env[-1] == 3
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)


def test_env_errors_are_also_runtime_errors():
    """The original raised RuntimeError; ``except RuntimeError`` keeps catching ours."""
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        distributed_env({"WORLD_SIZE": "two", "RANK": "0"})
