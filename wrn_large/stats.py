"""Parameter and multiply-add counts, computed on the meta device (no memory, no weights)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ._registry import create_model, model_info


def build_on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def count_params(model: nn.Module | str, **kwargs) -> int:
    """Trainable parameters (BN running statistics are buffers and not counted, as in the paper)."""
    if isinstance(model, str):
        model = build_on_meta(model, **kwargs)
    return sum(p.numel() for p in model.parameters())


def default_input_size(model: nn.Module | str) -> int:
    family = model_info(model).family if isinstance(model, str) else (
        "imagenet" if hasattr(model, "maxpool") else "cifar")
    return 224 if family == "imagenet" else 32


def count_macs(model: nn.Module | str, image_size: int | None = None, **kwargs) -> int:
    """Multiply-adds of one forward pass on one image (the 'FLOPs' of torchvision/timm tables)."""
    if isinstance(model, str):
        model = build_on_meta(model, **kwargs)
    size = image_size or default_input_size(model)
    device = next(model.parameters()).device
    x = torch.empty(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2
