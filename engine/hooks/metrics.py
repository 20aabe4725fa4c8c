"""Metric writing on rank 0: each check's figures and each epoch's record to the sinks of
``run.loggers`` (engine/metrics.py: metrics.jsonl, TensorBoard; engine/trackers.py: MLflow, W&B),
the epoch's line in the log, and the training curves (``training_curves.png``) redrawn after
every epoch. The sinks open when the first epoch starts, once a resume has set the step they
continue from."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import checkpoint as ckpt
from .. import trackers  # registers the trackers' sinks (mlflow, wandb)
from ..metrics import MetricSink, RunInfo, fmt, open_sinks, plot_curves, read_records
from .base import Check, Hook

log = logging.getLogger("wrn_large.train")
LOGGED = ("top1", "top5", "top1_ema")   # of an epoch's record, beside its training loss


class MetricsHook(Hook):
    """``loggers``' sinks and the plot: rank 0's (``is_main``; the others give no loggers and
    draw nothing). ``config``: the resolved config, which trackers record."""

    def __init__(self, loggers, out: str | Path, title: str, config: dict | None = None,
                 is_main: bool = True):
        self.loggers, self.out, self.title, self.is_main = list(loggers), Path(out), title, is_main
        self.config = config or {}
        self.sinks: list[MetricSink] | None = None

    def open(self) -> None:
        if self.sinks is None and self.loggers:
            step = self.trainer.state.step
            # metrics.jsonl is what trackers catch up from, where this run writes it
            earlier = read_records(self.out / "metrics.jsonl", step) \
                if "jsonl" in self.loggers else []
            self.sinks = open_sinks(self.loggers, RunInfo(self.out, str(self.out), self.config,
                                                          step, earlier))

    def before_epoch(self) -> None:
        self.open()

    def write(self, kind: str, step: int, values: dict) -> None:
        for sink in self.sinks or []:
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

    def artifacts(self) -> list[Path]:
        """What trackers keep of the run: the curves, the config, the final checkpoint's
        checksum."""
        files = [self.out / "training_curves.png", self.out / "config.yaml"]
        from .checkpoint import CheckpointHook
        checkpoints = self.trainer.hooks.of_type(CheckpointHook)
        folder = checkpoints.folder if checkpoints is not None else ckpt.checkpoint_dir(self.out)
        newest = None if ckpt.is_remote(folder) else ckpt.newest_complete(folder)
        if newest is not None:                    # local files only (S3: nothing to attach)
            files.append(ckpt.checksums_of(newest))
        return [p for p in files if p.is_file()]

    def after_train(self) -> None:
        status = self.trainer.status
        if status is not None and self.loggers:
            self.open()       # a run resumed after its last epoch still closes its trackers
        artifacts = self.artifacts() if status is not None else []
        for sink in self.sinks or []:
            sink.close(status, artifacts)
        trackers.wait_closed(self.sinks or [])    # one deadline for them all
