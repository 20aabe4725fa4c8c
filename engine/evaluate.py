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


def run_evaluation(cfg, per_class: bool = False) -> dict:
    """``train_imagenet.py --eval-only``: the config's model with ``model.pretrained`` weights
    (``model.pretrained_ema`` for a checkpoint's EMA) on its validation split, one process or
    under torchrun (every image counted once); writes ``eval.json`` (and with ``per_class``
    the per-class accuracy, plus ``confusion.png`` up to 100 classes) to run.output_dir."""
    import json
    from pathlib import Path

    from pipelines import LoaderSpec, build_loader, resolve_backend
    from pipelines.class_names import class_names

    from .distributed import cleanup, init_distributed
    from .engines import autocast, resolve_amp
    from .metrics import fmt, summary_table
    from .trainer import build_model, micro_batch_size, resolve_auto

    dist = init_distributed(cfg.engine.dist_backend)
    resolve_auto(cfg, dist)
    loader = build_loader(cfg.data, LoaderSpec("val", batch_size=micro_batch_size(cfg, dist),
                                               rank=dist.rank, world_size=dist.world_size,
                                               seed=cfg.train.seed, device=dist.device))
    model = build_model(cfg, loader.num_classes, dist)
    amp = resolve_amp(cfg.train.amp, dist.device)

    def forward(m, x):
        with autocast(dist.device, amp):
            return m(x)

    n = loader.num_classes
    matrix = torch.zeros(n, n, dtype=torch.float64, device=dist.device) if per_class else None
    result = {"model": cfg.model.name, "weights": cfg.model.pretrained,
              "ema": cfg.model.pretrained_ema, "data": f"{cfg.data.dataset} ({cfg.data.root})",
              "backend": resolve_backend(cfg.data.backend), "processes": dist.world_size,
              **evaluate(model, loader, dist.device, forward, confusion=matrix)}
    classes = class_names(cfg.data, loader)[1]
    out = Path(cfg.run.output_dir)
    plot = per_class and n <= 100
    if per_class:
        totals = matrix.sum(1)
        result["per_class_top1"] = {name: (100 * matrix[i, i] / totals[i]).item()
                                    if totals[i] else None for i, name in enumerate(classes)}
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        if plot:
            plot_confusion(matrix, classes, out / "confusion.png")
        rows = [("model", f"{cfg.model.name} <- {cfg.model.pretrained or 'random init'}"
                          + (" (EMA)" if cfg.model.pretrained_ema else "")),
                ("data", f"{result['data']}, {result['val_samples']} images, "
                         f"{dist.world_size} process(es)"),
                ("top-1 / top-5 (%)", f"{fmt(result['top1'])} / {fmt(result['top5'])}"),
                ("loss", fmt(result["val_loss"], 4)),
                ("written", f"{out / 'eval.json'}" + (", confusion.png" if plot else ""))]
        print(summary_table(rows), flush=True)
    cleanup()
    return result
