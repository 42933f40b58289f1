from zoo.config.loading import (
    ConfigError,
    available_presets,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    load_config,
)
from zoo.config.schema import ZooConfigBody

__all__ = [
    "ConfigError",
    "ZooConfigBody",
    "available_presets",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "load_config",
]
