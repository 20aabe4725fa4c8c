"""Mirror of our registry into timm's, so ``timm.create_model("wrn_28_10")`` works after
``import wrn_large``. Our names never shadow timm's own: a clash is an error at import."""
from __future__ import annotations

import functools

from ._registry import _builders, create_model

try:
    from timm.models import _registry as timm_registry
    from timm.models import register_model as timm_register_model
except ImportError:  # timm is a dependency, but the registry itself does not need it
    timm_registry = None


def _timm_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        # timm passes pretrained=bool and its own options; ours takes a checkpoint path.
        for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(timm_only, None)
        if pretrained:
            raise ValueError(f"{name}: no downloadable weights; use "
                             f"wrn_large.create_model({name!r}, pretrained='path/to/checkpoint')")
        return create_model(name, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = _builders[name].__doc__
    return entrypoint


def register_all() -> list[str]:
    if timm_registry is None:
        return []
    done = []
    for name in _builders:
        existing = timm_registry._model_entrypoints.get(name)
        if existing is not None:
            if getattr(existing, "__module__", None) == __name__:
                continue
            raise RuntimeError(f"model name {name!r} already exists in timm's registry")
        timm_register_model(_timm_entrypoint(name))
        done.append(name)
    return done


register_all()
