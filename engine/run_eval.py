"""``train_imagenet.py --eval-only``: a model's weights evaluated on its config's validation split,
one process or under torchrun (every image counted once), with per-class accuracy and a
confusion matrix on request."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines import LoaderSpec, build_loader, resolve_backend
from pipelines.class_names import class_names

from .build import build_model, resolve
from .distributed import cleanup, init_distributed
from .engines import autocast, resolve_amp, set_determinism
from .evaluate import evaluate, plot_confusion
from .membership import plan_batching
from .metrics import fmt, summary_table


def run_evaluation(cfg, per_class: bool = False) -> dict:
    """``train_imagenet.py --eval-only``: the config's model with ``model.pretrained`` weights
    (``model.pretrained_ema`` for a checkpoint's EMA) on its validation split, one process or
    under torchrun (every image counted once); writes ``eval.json`` (and with ``per_class``
    the per-class accuracy, plus ``confusion.png`` up to 100 classes) to run.output_dir."""
    dist = init_distributed(cfg.engine.dist_backend)
    cfg = resolve(cfg, dist)
    set_determinism(cfg.train.deterministic)
    micro_batch = plan_batching(cfg.train, dist.world_size).micro_batch
    loader = build_loader(cfg.data, LoaderSpec("val", batch_size=micro_batch,
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
