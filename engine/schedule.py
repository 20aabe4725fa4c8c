"""Learning-rate schedules as a pure function of the optimizer step (nothing to checkpoint)."""
from __future__ import annotations

import math

from .config import ScheduleConfig


def scaled_lr(lr: float, lr_batch: int, global_batch: int) -> float:
    """Linear scaling rule: the recipe's lr is for ``lr_batch`` images per step."""
    return lr * global_batch / lr_batch


def lr_at(step: int, base_lr: float, steps_per_epoch: int, epochs: int,
          cfg: ScheduleConfig) -> float:
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return base_lr * (cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / cfg.warmup_epochs)
    if cfg.name == "step":  # drops at epoch boundaries, as fb.resnet.torch and the paper
        drops = sum(1 for m in cfg.milestones if step // steps_per_epoch >= m)
        return base_lr * cfg.gamma ** drops
    # cosine from the end of warmup to the last step
    t = (epoch - cfg.warmup_epochs) / max(epochs - cfg.warmup_epochs, 1e-8)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
