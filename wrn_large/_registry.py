"""The model registry: one name -> one builder function, like timm's ``@register_model``.

A builder is a plain function returning an ``nn.Module``. Presets (the paper's networks) are
builders whose defaults are the preset's values; any keyword can still be overridden.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

_builders: dict[str, Callable[..., nn.Module]] = {}
# what every builder takes besides its model's arguments: timm's standard model arguments
# (what timm's train.py passes to create_model; _model_api.py) and build_model_with_cfg's
TIMM_OPTIONS = ("drop_rate", "drop_path_rate", "global_pool", "bn_momentum", "bn_eps",
                "features_only", "out_indices", "feature_cls", "device", "dtype",
                "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_model_info: dict[str, "ModelInfo"] = {}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a name, beyond its builder."""

    name: str
    family: str                      # "cifar" or "imagenet"
    paper_params_m: str | None = None  # the count printed in the paper, in millions
    paper_table: str | None = None   # where it is printed, e.g. "Table 4"
    description: str = ""
    defaults: dict = field(default_factory=dict)
    pretrained_cfg: dict = field(default_factory=dict)  # what timm reads: input size, mean/std


def register_model(fn: Callable | None = None, *, family: str, paper_params_m: str | None = None,
                   paper_table: str | None = None, description: str = "",
                   pretrained_cfg: dict | None = None):
    """Decorator registering a builder under its function name."""

    def wrap(builder):
        name = builder.__name__
        if name in _builders:
            raise ValueError(f"model {name!r} is registered twice")
        _builders[name] = builder
        defaults = {k: p.default for k, p in inspect.signature(builder).parameters.items()
                    if p.default is not inspect.Parameter.empty and k != "pretrained"}
        _model_info[name] = ModelInfo(name, family, paper_params_m, paper_table,
                                      description or (builder.__doc__ or "").strip().split("\n")[0],
                                      defaults, dict(pretrained_cfg or {}))
        return builder

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered names matching a shell-style pattern (e.g. ``"wrn_28*"``), sorted."""
    return sorted(n for n, info in _model_info.items()
                  if fnmatch.fnmatch(n, pattern) and (family is None or info.family == family))


def is_model(name: str) -> bool:
    return name in _builders


def model_info(name: str) -> ModelInfo:
    _check_name(name)
    return _model_info[name]


def _check_name(name: str) -> None:
    if name not in _builders:
        close = difflib.get_close_matches(name, _builders, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid models: {', '.join(list_models())}")


def argument_problem(name: str, kwargs: dict) -> str | None:
    """What is wrong with ``kwargs`` for the model ``name`` (arguments its builder does not
    take), or None."""
    _check_name(name)
    params = [p for p, v in inspect.signature(_builders[name]).parameters.items()
              if v.kind is not inspect.Parameter.VAR_KEYWORD and p != "pretrained"]
    valid = params + list(TIMM_OPTIONS)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        return (f"{name}() got unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"valid arguments: {', '.join(valid)}")
    return None


def create_model(name: str, pretrained: str | None = None, use_ema: bool = False,
                 **kwargs) -> nn.Module:
    """Build a registered model; ``pretrained`` is a path to one of our checkpoints (its EMA
    weights with ``use_ema``) or a torchvision state dict (see ``wrn_large.weights``)."""
    problem = argument_problem(name, kwargs)
    if problem:
        raise TypeError(problem)
    model = _builders[name](**kwargs)
    if pretrained:
        from .weights import load_pretrained
        load_pretrained(model, pretrained, use_ema=use_ema)
    return model
