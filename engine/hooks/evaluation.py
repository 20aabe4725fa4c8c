"""Evaluation as a hook: after every ``every``-th epoch and the last, each model (the trained one,
its EMA) on the validation loader, every image counted once over all ranks (engine/evaluate.py);
the figures go into the epoch's record."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..distributed import BufferSync
from ..evaluate import evaluate
from .base import EVALUATION, Hook

EXTRA_MODEL_KEYS = ("top1", "top5", "val_loss")   # what the record keeps of an extra model


class EvalHook(Hook):
    """``models``: suffix -> model; "" is the trained model (every figure), another suffix (e.g.
    "_ema") keeps top-1, top-5 and loss under ``top1_ema`` and so on."""

    def __init__(self, loader, models: dict[str, nn.Module], device: torch.device, *,
                 forward: Callable | None = None, every: int = 1,
                 buffers: BufferSync | None = None):
        self.loader, self.models, self.device = loader, models, device
        self.forward, self.every, self.buffers = forward, every, buffers

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0 or epoch == self.trainer.schedule.epochs

    def after_epoch(self) -> None:
        state = self.trainer.state
        if not self.due(state.epoch):
            return
        self.trainer.phase(EVALUATION)     # its BatchNorm sync included
        if self.buffers is not None:
            self.buffers.sync(state.step)
        record = state.history[-1]
        for suffix, model in self.models.items():
            result = evaluate(model, self.ticking(), self.device, self.forward)
            record.update(result if not suffix else
                          {f"{k}{suffix}": result[k] for k in EXTRA_MODEL_KEYS})

    def ticking(self):
        """The validation batches, telling the hooks of each one (evaluation is progress too)."""
        for batch in self.loader:
            self.trainer.phase(EVALUATION)
            yield batch
