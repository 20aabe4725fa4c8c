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


class WeightsError(ValueError):
    """A weights file that cannot be read: not a torch file, truncated, or not weights."""


def not_a_torch_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a file of torch.save (a zip archive, or a legacy pickle), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot open it ({e.strerror})"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        return "it is empty"
    try:
        text = head.decode()
    except UnicodeDecodeError:
        return "it is neither a zip archive nor a pickle (what torch.save writes)"
    kind = "a YAML or text file" if ":" in text else "a text file"
    if text.lstrip().startswith(("{", "[")):
        kind = "a JSON file"
    return (f"it is {kind} (a .pt file is meant: a step_N.pt of a run's checkpoints/, or a "
            f"torchvision state dict)")


def unreadable(path, error: Exception) -> str:
    """One line on why torch.load failed, without torch's advice to load with
    weights_only=False (which runs whatever code the file holds)."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        return (f"{path} holds Python objects other than tensors and plain containers: not a "
                f"checkpoint of ours or a torchvision state dict (not loaded, as it could run code)")
    first = text.splitlines()[0] if text else ""
    return f"cannot read checkpoint {path} (truncated or corrupt?): {type(error).__name__}: {first}"


def load_torch_file(path: str | os.PathLike, error: type[Exception] = WeightsError):
    """``torch.load(path, weights_only=True)`` on the CPU; ``error`` names the file when it is
    not a torch file or cannot be read (truncated, or a pickle of arbitrary objects)."""
    not_torch = not_a_torch_file(path)
    if not_torch:
        raise error(f"{path} is not a checkpoint: {not_torch}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(unreadable(path, e)) from e


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint file, with wrapper prefixes removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return extract_state_dict(load_torch_file(path), source=path, use_ema=use_ema)


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
