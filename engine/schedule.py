"""Learning-rate schedules as a pure function of the optimizer step (nothing to checkpoint), and
the ``Schedule`` the loop steps through."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import ScheduleConfig


def scaled_lr(lr: float, lr_batch: int, global_batch: int) -> float:
    """Linear scaling rule: the recipe's lr is for ``lr_batch`` images per step."""
    return lr * global_batch / lr_batch


def lr_at(step: int, base_lr: float, steps_per_epoch: int, epochs: int,
          cfg: ScheduleConfig) -> float:
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return base_lr * (cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / cfg.warmup_epochs)
    if cfg.name == "step":
        return base_lr * cfg.gamma ** drops_before(step, steps_per_epoch, cfg)
    # cosine from the end of warmup to the last step
    t = (epoch - cfg.warmup_epochs) / max(epochs - cfg.warmup_epochs, 1e-8)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def drops_before(step: int, steps_per_epoch: int, cfg: ScheduleConfig) -> int:
    """How many milestones of the step schedule have taken effect at ``step`` (0-based)."""
    epoch = step // steps_per_epoch            # 0-based epoch; its 1-based number is epoch + 1
    if cfg.milestone_rule == "start_of_epoch":
        epoch += 1
    return sum(1 for m in cfg.milestones if epoch >= m)


def is_lr_drop(step: int, steps_per_epoch: int, cfg: ScheduleConfig) -> bool:
    """Whether ``step`` is the first step at a new lr of the step schedule."""
    return (cfg.name == "step" and step > 0 and
            drops_before(step, steps_per_epoch, cfg) > drops_before(step - 1, steps_per_epoch, cfg))


@dataclass(frozen=True)
class Schedule:
    """What the loop steps through: ``epochs`` of ``steps_per_epoch`` optimizer steps of
    ``grad_accum`` micro-batches, the learning rate of each step, where the optimizer state is
    cleared (``optim.fresh_at_lr_drops``) and where the run stops early (``max_steps``, 0: never)."""

    epochs: int
    steps_per_epoch: int
    base_lr: float
    cfg: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_accum: int = 1
    max_steps: int = 0
    fresh_at_lr_drops: bool = False

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.steps_per_epoch, self.epochs, self.cfg)

    def clears_optimizer(self, step: int) -> bool:
        return self.fresh_at_lr_drops and is_lr_drop(step, self.steps_per_epoch, self.cfg)
