"""The training engine: config, distributed set-up, DDP/DeepSpeed engines, checkpoints, the loop."""
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
