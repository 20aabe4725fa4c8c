"""Distributed evaluation: each rank scores its own samples (every image exactly once over all
ranks, see pipelines.base), and the sums are all-reduced."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, forward=None,
             confusion: torch.Tensor | None = None) -> dict:
    """``forward(model, images)`` gives the logits (the engine's precision policy); default:
    ``model(images)``. ``confusion``, a (num_classes, num_classes) float64 tensor on ``device``,
    receives the counts of the same pass (row = true class, column = top-1 prediction),
    summed over ranks."""
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
        if confusion is not None:
            n = confusion.shape[0]
            confusion += torch.bincount(labels * n + topk[:, 0],
                                        minlength=n * n).view(n, n).double()
    all_reduce_sum(sums)
    if confusion is not None:
        all_reduce_sum(confusion)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count,
            "test_error": 100 - 100 * top1 / count, "val_samples": int(count)}


def plot_confusion(matrix: torch.Tensor, class_names: list[str], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(class_names)
    rates = (matrix / matrix.sum(1, keepdim=True).clamp(min=1)).cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4, n * 0.18 + 2), max(4, n * 0.18 + 2)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
