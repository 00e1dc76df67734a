"""This process's place in a job: rank, local rank and world size, from the environment torchrun
(and `scaletrain launch`) sets for every worker. The one place that reads RANK, LOCAL_RANK,
WORLD_SIZE and LOCAL_WORLD_SIZE; a plain `python -m scaletrain` run is rank 0 of a world of 1.

Standard library only, so the CLI's warning and error printers can ask "am I rank 0?" before
(or while) torch is imported. parallel/dims.py adds the device and the process group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from scaletrain.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int | None = None  # processes on this node; None when not launched by torchrun


def _env_int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer.") from None


def env_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """Ranks from `environ` (default: this process's environment); ConfigError for a
    non-integer value."""
    env = os.environ if environ is None else environ
    return Ranks(_env_int(env, "RANK", 0), _env_int(env, "LOCAL_RANK", 0), _env_int(env, "WORLD_SIZE", 1),
                 _env_int(env, "LOCAL_WORLD_SIZE", None))
