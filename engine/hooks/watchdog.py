"""The hang watchdog (engine/watchdog.py) told where the loop is: its thread runs from the start
of training to its end, and every phase change and step is progress."""
from __future__ import annotations

from ..watchdog import Watchdog
from .base import Hook


class WatchdogHook(Hook):
    def __init__(self, watchdog: Watchdog):
        self.watchdog = watchdog

    def before_train(self) -> None:
        # started here and stopped after training: no watchdog outlives the run (a run that
        # failed to build, in a process that goes on, must not exit it 15 minutes later)
        self.watchdog.start()

    def on_phase(self, phase: str) -> None:
        self.watchdog.progress(phase=phase)

    def after_step(self) -> None:
        self.watchdog.progress(step=self.trainer.state.step)

    def after_train(self) -> None:
        self.watchdog.stop()
