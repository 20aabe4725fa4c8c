"""Metric writing on rank 0: each check's figures and each epoch's record to the sinks
(engine/metrics.py: metrics.jsonl, TensorBoard), the epoch's line in the log, and the training
curves (``training_curves.png``) redrawn after every epoch."""
from __future__ import annotations

import logging
from pathlib import Path

from ..metrics import MetricSink, fmt, plot_curves
from .base import Check, Hook

log = logging.getLogger("wrn_large.train")
LOGGED = ("top1", "top5", "top1_ema")   # of an epoch's record, beside its training loss


class MetricsHook(Hook):
    """``sinks`` and the plot: rank 0's (the other ranks give none and draw nothing)."""

    def __init__(self, sinks: list[MetricSink], out: str | Path, title: str,
                 is_main: bool = True):
        self.sinks, self.out, self.title, self.is_main = sinks, Path(out), title, is_main

    def write(self, kind: str, step: int, values: dict) -> None:
        for sink in self.sinks:
            sink.write(kind, step, values)

    def after_check(self, check: Check) -> None:
        self.write("train", check.step, check.metrics)

    def after_epoch(self) -> None:
        t = self.trainer
        record = t.state.history[-1]
        self.write("epoch", t.state.step, record)
        if not self.is_main:
            return
        log.info("epoch %d/%d: train loss %.4f, %s", record["epoch"], t.schedule.epochs,
                 record["train_loss"], ", ".join(f"{k} {fmt(v)}" for k, v in record.items()
                                                 if k in LOGGED))
        plot_curves(t.state.history, self.out / "training_curves.png", self.title)

    def after_train(self) -> None:
        for sink in self.sinks:
            sink.close()
