"""Configuration: what to train (``schema``: typed, frozen sections with their checks), how it is read
(``loader``: YAML, ``--set``, every problem with its file:line) and where it runs (``cluster``).

Imports nothing of distsft but ``errors``; every other package may import this one.
"""

from distsft.config.loader import (
    build_config,
    dump_config,
    flatten,
    load_config,
    load_typed,
    parse_override,
    save_config,
)
from distsft.config.schema import (
    DEMO_CONFIG,
    DEMO_DIR,
    BatchPlan,
    CheckpointConfig,
    Config,
    DataConfig,
    DataSource,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    cache_home,
)

__all__ = [
    "DEMO_CONFIG", "DEMO_DIR", "BatchPlan", "CheckpointConfig", "Config", "DataConfig", "DataSource",
    "LoggingConfig", "LoraConfig", "ModelConfig", "TrainConfig", "build_config", "cache_home", "dump_config",
    "flatten", "load_config", "load_typed", "parse_override", "save_config",
]  # fmt: skip
