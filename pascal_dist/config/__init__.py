"""Run configuration: the typed schema, loading with overrides and validation, and the DeepSpeed JSON config."""

from pascal_dist.config.ds_config import load_ds_config
from pascal_dist.config.load import COMPILE_SCOPES, ConfigError, load_config, to_yaml, validate
from pascal_dist.config.schema import (
    AttentionConfig,
    BiasConfig,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "AttentionConfig",
    "BiasConfig",
    "CheckpointConfig",
    "COMPILE_SCOPES",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "load_ds_config",
    "to_yaml",
    "validate",
]
