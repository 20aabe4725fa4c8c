"""Run outputs on rank 0: the metric sinks (metrics.jsonl, TensorBoard events), the
training-curve PNG and the closing summary table."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Protocol

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    """Where a run's figures go: ``write(kind, step, values)`` for each record ("train" at each
    check, "epoch" at each epoch's end), ``close()`` at the end. A tracker is one more class
    registered with ``@register_sink("name")``."""

    def write(self, kind: str, step: int, values: dict) -> None: ...

    def close(self) -> None: ...


SINKS: dict[str, Callable[[Path], MetricSink]] = {}


def register_sink(name: str):
    def wrap(cls):
        SINKS[name] = cls
        return cls

    return wrap


@register_sink("jsonl")
class JsonlSink:
    """``RUN_DIR/metrics.jsonl``: one JSON object per record, ``{"type": kind, "step": step,
    **values}``, flushed at once."""

    def __init__(self, out: str | Path):
        self.file = open(Path(out) / "metrics.jsonl", "a")

    def write(self, kind: str, step: int, values: dict) -> None:
        self.file.write(json.dumps({"type": kind, "step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@register_sink("tensorboard")
class TensorBoardSink:
    """``RUN_DIR/tensorboard``: every number of a record (but the epoch's index) as KIND/KEY."""

    def __init__(self, out: str | Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


def open_sinks(names, out: str | Path) -> list[MetricSink]:
    sinks = []
    for name in names:
        try:
            sinks.append(SINKS[name](out))
        except ImportError as e:   # tensorboard is a dependency; the others suffice without it
            log.warning("metrics sink %s unavailable (%s): not written", name, e)
    return sinks


def plot_curves(history: list[dict], path: str | Path, title: str) -> None:
    """Training loss (log scale, dashed, left axis) and test error (solid, right axis) per epoch,
    as in the paper's Figure 2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax_loss = plt.subplots(figsize=(7, 4.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "--", color="tab:blue",
                 label="training loss")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_err = ax_loss.twinx()
    evaluated = [h for h in history if h.get("test_error") is not None]
    ax_err.plot([h["epoch"] for h in evaluated], [h["test_error"] for h in evaluated], "-",
                color="tab:red", label="test error (%)")
    ax_err.set_ylabel("test error (%)")
    lines = ax_loss.get_lines() + ax_err.get_lines()
    ax_loss.legend(lines, [l.get_label() for l in lines], loc="upper right")
    ax_loss.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}}   {v}" for k, v in rows] + [line])


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
