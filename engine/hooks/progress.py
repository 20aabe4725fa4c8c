"""A progress bar per epoch on rank 0 (``run.progress``): steps, and at each check the loss, the
lr, images/s and the share of time waiting for input."""
from __future__ import annotations

import sys

from ..metrics import fmt
from .base import Check, Hook


class ProgressBarHook(Hook):
    def __init__(self):
        self.bar = None

    def before_epoch(self) -> None:
        from tqdm import tqdm
        t = self.trainer
        spe = t.schedule.steps_per_epoch
        self.bar = tqdm(total=spe, initial=t.state.step - t.state.epoch * spe, unit="step",
                        dynamic_ncols=True, file=sys.stdout,
                        desc=f"epoch {t.state.epoch + 1}/{t.schedule.epochs}")

    def after_step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def after_check(self, check: Check) -> None:
        if self.bar is None:
            return
        m = check.metrics
        self.bar.set_postfix(loss=fmt(check.loss, 4), lr=f"{check.lr:.4g}",
                             img_s=f"{m.get('images_per_s', 0):.0f}",
                             data=f"{100 * m.get('data_wait', 0):.0f}%", refresh=False)
        if self.trainer.stop_reason or check.step % self.trainer.schedule.steps_per_epoch == 0:
            self.close()   # before what the epoch's end or the stop logs

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    after_train = close
