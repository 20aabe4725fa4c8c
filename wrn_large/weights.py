"""Loading weights: our trainer's checkpoints and torchvision state dicts.

Our ImageNet models use torchvision's module names, so a torchvision ``resnet18``/``resnet34``/
``wide_resnet50_2`` state dict loads as it is. Our checkpoints store the model under ``"model"``
(possibly with DDP's ``module.`` or torch.compile's ``_orig_mod.`` prefixes) and an EMA copy
under ``"ema"`` (``"model_ema"`` in timm's training scripts; both are read).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch
import torch.nn as nn

log = logging.getLogger(__name__)
_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint file, with wrapper prefixes removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle of arbitrary objects, not a torch file
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    return extract_state_dict(obj, source=path, use_ema=use_ema)


def extract_state_dict(obj: Mapping, source: str = "<state dict>",
                       use_ema: bool = False) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if use_ema:  # our trainer saves the EMA weights under "ema" ("model_ema": timm's scripts)
        found = next((k for k in ("ema", "model_ema") if isinstance(obj.get(k), Mapping)), None)
        if found is None:
            raise ValueError(f"{source}: no EMA weights in this checkpoint (keys: "
                             f"{', '.join(map(str, list(obj)[:8]))}); was it trained with "
                             f"train.ema_decay > 0?")
        obj = obj[found]
    for container in ("state_dict", "model"):
        if container in obj and isinstance(obj[container], Mapping):
            obj = obj[container]
            break
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                             "is this a model checkpoint?")
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def load_pretrained(model: nn.Module, source, use_ema: bool = False, strict: bool = True) -> None:
    """Load a checkpoint path or a state dict into ``model``.

    A classifier of another size (e.g. ImageNet weights into a 10-class model) is left at its
    initialisation with a log line; every other mismatch is an error naming the keys."""
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
    state = (read_state_dict(source, use_ema) if isinstance(source, (str, os.PathLike))
             else extract_state_dict(source, name, use_ema))
    own = model.state_dict()
    skipped = [k for k in _CLASSIFIER_KEYS
               if k in state and k in own and state[k].shape != own[k].shape]
    for k in skipped:
        del state[k]
    if skipped:
        log.info("%s: classifier shape differs from the model's; not loaded: %s", name, skipped)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{name}: shapes do not match this model (is it the same depth and "
                         f"width?): " + "; ".join(mismatched[:5]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if strict and (missing or unexpected):
        raise ValueError(f"{name}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
