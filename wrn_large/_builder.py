"""The one builder behind every registry name, for ``wrn_large.create_model`` and
``timm.create_model`` alike: timm's ``build_model_with_cfg``, which attaches the model's
``pretrained_cfg``, wraps it for ``features_only=True`` (``out_indices``, ``feature_cls``) and
loads local weights given as ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)``."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg


def build_model(model_cls, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    levels = len(model_cls.stage_names)
    return build_model_with_cfg(
        _on_device(model_cls), variant, pretrained,
        pretrained_filter_fn=_checkpoint_to_state_dict,
        feature_cfg=dict(out_indices=tuple(range(levels))),  # timm's default asks for 5
        **kwargs)


def _on_device(model_cls):
    """``model_cls`` taking timm's factory arguments: parameters created on ``device`` (no
    allocation elsewhere first; "meta" for a model without memory), then cast to ``dtype``."""
    def construct(device=None, dtype=None, **kwargs) -> nn.Module:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = model_cls(**kwargs)
        return model if dtype is None else model.to(dtype=dtype)

    construct.__name__ = model_cls.__name__
    return construct


def _checkpoint_to_state_dict(state_dict: dict, model: nn.Module) -> dict:
    """timm's loader has taken the ``model``/``state_dict`` entry out of the file: strip the
    DDP / torch.compile prefixes as ``wrn_large.create_model(pretrained=PATH)`` does."""
    from .weights import extract_state_dict
    return extract_state_dict(state_dict)
