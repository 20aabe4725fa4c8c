"""Input pipelines: DALI (GPU "mixed" decoding or the same graph on the CPU), torchvision, and
synthetic data, behind one small interface (``pipelines.base``)."""
from .base import (DataConfig, Loader, LoaderSpec, available_backends, build_loader,
                   register_backend, resolve_backend, train_shard_indices,
                   val_shard_indices)

from . import synthetic, torch_backend  # noqa: F401,E402  (register the backends)

try:  # register "dali" only where DALI imports; "auto" then picks it
    from . import dali  # noqa: F401,E402
except ImportError as _e:  # pragma: no cover - depends on the install
    if not (getattr(_e, "name", "") or "").startswith("nvidia"):
        raise

__all__ = ["DataConfig", "Loader", "LoaderSpec", "available_backends", "build_loader",
           "register_backend", "resolve_backend", "train_shard_indices", "val_shard_indices"]
