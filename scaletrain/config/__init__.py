"""Typed config tree, TOML presets and dotted CLI overrides."""

from scaletrain.config.load import (
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    read_toml,
    write_config,
)
from scaletrain.config.schema import (
    BtxConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DomainConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "BtxConfig", "CheckpointConfig", "Config", "DataConfig", "DomainConfig", "MetricsConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "ScheduleConfig", "TokenizerConfig", "TrainConfig", "config_from_dict",
    "config_to_dict", "load_config", "parse_overrides", "read_toml", "write_config",
]
