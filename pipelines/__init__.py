"""Input pipelines: DALI (GPU "mixed" decoding or the same graph on the CPU), torchvision, and
synthetic data, behind one small interface (``pipelines.base``).

Importing the package imports no torch: ``DataConfig`` is plain data (``pipelines.config``),
and the rest comes from ``pipelines.base`` on first use, a backend when it is first asked for
(``build_loader``/``resolve_backend``). Reading a config stays a fraction of a second."""
from .config import DataConfig

_FROM_BASE = ("Loader", "LoaderSpec", "available_backends", "build_loader", "register_backend",
              "resolve_backend", "train_shard_indices", "val_shard_indices")


def __getattr__(name: str):
    if name in _FROM_BASE:
        from . import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataConfig", *_FROM_BASE]
