"""Distributed evaluation: each rank scores its own samples (every image exactly once over all
ranks, see pipelines.base), and the sums are all-reduced."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, forward=None) -> dict:
    """``forward(model, images)`` gives the logits (the engine's precision policy); default:
    ``model(images)``."""
    forward = forward or (lambda m, x: m(x))
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for images, labels in loader:
        logits = forward(model, images).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(float(labels.numel()), dtype=torch.float64,
                                          device=device)])
    all_reduce_sum(sums)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count,
            "test_error": 100 - 100 * top1 / count, "val_samples": int(count)}
