"""The training engine: config, distributed set-up, DDP/DeepSpeed engines, checkpoints, the loop."""
import gc
import sys

from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "exit_frozen", "load_config"]


def exit_frozen(code: int | None = None):
    """``sys.exit(code)`` for a command's ``__main__``, with every object made so far frozen:
    the interpreter's last garbage collections would walk each object torch & co. made (~1.5 s
    of CPU per process, each rank's), all of which the exit frees anyway."""
    gc.freeze()
    sys.exit(code)
