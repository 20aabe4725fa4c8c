"""Run outputs on rank 0: metrics.jsonl, TensorBoard events, the training-curve PNG and the
closing summary table."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; the jsonl suffices without it
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"type": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch",):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


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
