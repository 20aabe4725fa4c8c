"""The run's outcome: a summary table on rank 0 when training ends (finished, stopped by a
signal or at run.max_steps), and ``result.json`` beside its ``provenance.json`` when it
finished (reproduce.py's mark of a finished run). ``result`` holds the figures either way.

Once the checkpoint hook has resumed (or not), rank 0 writes ``provenance.json`` again with the
step this start trains from: a start from scratch drops the earlier starts, a resumed one keeps
them (``engine/provenance.py``); ``result.json`` carries the same ``starts``. Comes after the
checkpoint hook."""
from __future__ import annotations

import time
from pathlib import Path

from ..metrics import fmt, summary_table
from ..provenance import began_training, write_json
from .base import Hook
from .step_times import StepTimesHook


class SummaryHook(Hook):
    def __init__(self, out: str | Path, *, model: str, data: str, provenance: dict | None = None,
                 step_times: StepTimesHook | None = None, is_main: bool = True):
        self.out, self.model, self.data = Path(out), model, data
        self.provenance, self.step_times, self.is_main = provenance or {}, step_times, is_main
        self.result: dict | None = None

    def before_train(self) -> None:
        self.t0 = time.time()
        t = self.trainer
        # a start of a run that had finished (a requeue or restart after its last save) trains
        # nothing: it is no start of the run's, and its result stays the finished one's
        self.already_finished = t.state.epoch >= t.schedule.epochs and \
            (self.out / "result.json").is_file()
        if self.is_main and self.provenance.get("starts") and not self.already_finished:
            self.provenance = began_training(self.provenance, self.trainer.state.step)
            write_json(self.out / "provenance.json", self.provenance)

    def after_train(self) -> None:
        t = self.trainer
        if t.status is None:          # failed: the error says what happened
            return
        history = t.state.history
        last = history[-1] if history else {}
        best = max((h["top1"] for h in history if "top1" in h), default=None)
        seconds = time.time() - self.t0
        self.result = {"status": t.status, "steps": t.state.step, "epochs": t.state.epoch,
                       "final_top1": last.get("top1"), "final_top5": last.get("top5"),
                       "best_top1": best, "train_loss": last.get("train_loss"),
                       "seconds": seconds, "output_dir": str(self.out)}
        if not self.is_main:
            return
        waiting = self.step_times.waiting_share() if self.step_times else None
        rows = [("model", self.model), ("data", self.data), ("status", t.status),
                ("epochs done", f"{t.state.epoch}/{t.schedule.epochs}"),
                ("optimizer steps", str(t.state.step)),
                ("final train loss", fmt(last.get("train_loss"), 4)),
                ("final top-1 / top-5 (%)", f"{fmt(last.get('top1'))} / {fmt(last.get('top5'))}"),
                ("best top-1 (%)", fmt(best)), ("wall time (s)", fmt(seconds, 1)),
                ("waiting for input (% of train time)",
                 fmt(100 * waiting if waiting is not None else None, 1)),
                ("outputs", f"{self.out}/ (metrics.jsonl, tensorboard/, training_curves.png, "
                            "checkpoints/)")]
        print(summary_table(rows), flush=True)
        if t.status == "finished" and not self.already_finished:
            write_json(self.out / "result.json", {**self.result, **self.provenance,
                                                  "final": last})
