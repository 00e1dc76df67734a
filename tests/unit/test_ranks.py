"""Rank and world size come from one reader of torchrun's environment (scaletrain/ranks.py)."""

from __future__ import annotations

import pytest

from scaletrain.errors import ConfigError
from scaletrain.ranks import Ranks, env_ranks


def test_env_ranks_reads_torchrun_variables_and_defaults_to_one_process():
    assert env_ranks({}) == Ranks(rank=0, local_rank=0, world_size=1, local_world_size=None)
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert env_ranks(env) == Ranks(rank=5, local_rank=1, world_size=8, local_world_size=4)


def test_env_ranks_names_a_variable_that_is_not_an_integer():
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        env_ranks({"WORLD_SIZE": "two"})
