"""An exponential moving average of the weights (``train.ema_decay``; timm's ``ModelEmaV3``),
updated after every step; its weights are saved in checkpoints under "ema"."""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Hook


class EmaHook(Hook):
    name = "ema"

    def __init__(self, model: nn.Module, decay: float):
        from timm.utils import ModelEmaV3
        # fp32 even where the engine casts the model to bf16/fp16 (DeepSpeed): tiny updates of
        # a half-precision average round away
        self.ema = ModelEmaV3(model, decay=decay, dtype=torch.float32)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def after_step(self) -> None:
        self.ema.update(self.trainer.model, step=self.trainer.state.step)

    def state_dict(self) -> dict:
        return self.ema.module.state_dict()

    def load_state_dict(self, state) -> None:
        if state is not None:
            self.ema.module.load_state_dict(state)
