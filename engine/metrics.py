"""Run outputs on rank 0: the metric sinks (metrics.jsonl, TensorBoard events; the trackers,
MLflow and W&B, are engine/trackers.py's), the training-curve PNG and the closing summary
table."""
from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from .checkpoint import write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """What a sink is told of the run when it opens (at the first epoch the run trains, after
    any resume)."""

    out: Path                   # the run directory
    name: str                   # how trackers name the run: the run directory as given
    config: dict                # the resolved config
    start_step: int             # the optimizer step the run (re)starts from: 0 or its checkpoint's
    # metrics.jsonl's records up to start_step, which a tracker that missed some (a start
    # killed before its tracker thread sent them) sends first
    earlier: list = field(default_factory=list)


def read_records(path: Path, up_to: int) -> list[dict]:
    """The records of a metrics.jsonl up to step ``up_to`` (a line cut short by a kill is left
    out)."""
    if not path.is_file():
        return []
    records, unreadable = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            unreadable += line.endswith("\n")
        elif record["step"] <= up_to:
            records.append(record)
    if unreadable:
        log.warning("%s: %d line(s) that are not a record left out", path, unreadable)
    return records


class MetricSink(Protocol):
    """Where a run's figures go: ``write(kind, step, values)`` for each record ("train" at each
    check, "epoch" at each epoch's end), ``close(status, artifacts)`` at the end (status: the
    trainer's, None when the run failed; artifacts: files a tracker may keep). A resumed run
    writes each step once: a sink opened at ``start_step`` drops (or skips) what an earlier
    start wrote after it. A sink is one more class registered with ``@register_sink("name")``;
    ``requires`` names the module it imports (checked before a run starts, engine/build.py)."""

    def write(self, kind: str, step: int, values: dict) -> None: ...

    def close(self, status: str | None, artifacts: list[Path]) -> None: ...


SINKS: dict[str, Callable[[RunInfo], MetricSink]] = {}
EXTRA = "pip install 'wrn-large[tracking]'"   # the optional trackers' packages


def register_sink(name: str):
    def wrap(cls):
        SINKS[name] = cls
        return cls

    return wrap


def loggers_problem(names: list) -> str | None:
    """Why ``run.loggers`` cannot be ``names`` here (a name twice, unknown, or its package is
    missing)."""
    twice = sorted({str(n) for n in names if names.count(n) > 1})
    if twice:
        return f"{', '.join(twice)} listed twice"
    return next((p for p in map(sink_problem, names) if p), None)


def sink_problem(name: str) -> str | None:
    """Why ``run.loggers`` cannot have ``name`` here (unknown, or its package is missing)."""
    if name not in SINKS:
        close = difflib.get_close_matches(str(name), SINKS, n=1)
        return (f"unknown logger {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; valid: {', '.join(SINKS)}")
    module = getattr(SINKS[name], "requires", None)
    if module and importlib.util.find_spec(module) is None:
        return f"{name} needs the {module} package: {EXTRA}"
    return None


def record(kind: str, step: int, values: dict) -> dict:
    """A record as metrics.jsonl holds it and trackers are given it."""
    return {"type": kind, "step": step, **values}


def scalars(record: dict) -> dict:
    """A record's plain numbers as KIND/KEY (not lists, flags, its step or the epoch's index)."""
    return {f"{record['type']}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("step", "epoch")}


@register_sink("jsonl")
class JsonlSink:
    """``RUN_DIR/metrics.jsonl``: one JSON object per record, ``{"type": kind, "step": step,
    **values}``, flushed at once. Opened at step S, the records an earlier start wrote after S
    are dropped first (they are written again, by the steps that redo them)."""

    def __init__(self, run: RunInfo):
        path = run.out / "metrics.jsonl"
        if path.is_file():
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in run.earlier))
        self.file = open(path, "a")

    def write(self, kind: str, step: int, values: dict) -> None:
        self.file.write(json.dumps(record(kind, step, values)) + "\n")
        self.file.flush()

    def close(self, status, artifacts) -> None:
        self.file.close()


@register_sink("tensorboard")
class TensorBoardSink:
    """``RUN_DIR/tensorboard``: every number of a record as KIND/KEY. Opened at step S, the events
    of steps after S are purged (TensorBoard's ``purge_step``)."""

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=run.start_step + 1)

    def write(self, kind: str, step: int, values: dict) -> None:
        for tag, value in scalars(record(kind, step, values)).items():
            self.writer.add_scalar(tag, value, step)

    def close(self, status, artifacts) -> None:
        self.writer.close()


def open_sinks(names, run: RunInfo) -> list[MetricSink]:
    """The sinks of ``run.loggers`` (their packages were checked before the run started; the
    trackers register theirs when engine/trackers.py is imported, as engine/hooks does); a
    tracker that cannot be reached is a warning, never the run."""
    sinks = []
    try:
        for name in names:
            sinks.append(SINKS[name](run))
    except BaseException:
        for sink in sinks:            # the ones opened: let go of their files and threads
            sink.close(None, [])
        raise
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
