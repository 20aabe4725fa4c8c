"""Where the steps go, per logging interval: images/s, the share of wall time spent waiting for
input (mean over ranks), every rank's mean data wait and forward per step (engine/step_times.py
measures them), and the stragglers: rank 0 names each rank whose forward + data wait per step is
``factor`` times the other ranks' median in ``WINDOWS`` intervals in a row (a warm-up or a
passing hiccup is not a straggler), and again every ``REPEAT`` intervals while it stays so."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..step_times import StepTimes, stragglers
from .base import COMPUTE, DATA, Check, Hook, PerRank

log = logging.getLogger("wrn_large.train")
WINDOWS, REPEAT = 3, 30   # logging intervals: to name a straggler, to name it again


class StepTimesHook(Hook):
    name = "step_times"

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int, *,
                 hosts: list[str], factor: float = 1.5, is_main: bool = True):
        self.times = StepTimes(model, device)
        self.batch_size, self.hosts, self.factor, self.is_main = batch_size, hosts, factor, is_main
        self.slow_windows: dict[int, int] = {}     # rank -> intervals slow in a row
        self.data_wait_s = self.seconds = 0.0      # the run's totals, for its summary

    def on_phase(self, phase: str) -> None:
        if phase == DATA:
            self.times.waiting()
        elif phase == COMPUTE:
            self.times.arrived()

    def to_reduce(self) -> dict:
        data_wait, forward = self.times.take()
        return {"data_wait": PerRank(data_wait), "forward": PerRank(forward)}

    def after_check(self, check: Check) -> None:
        waits, forwards = check.reduced["data_wait"], check.reduced["forward"]
        seconds, steps = max(check.seconds, 1e-9), max(check.steps, 1)
        wait = sum(waits) / len(waits)
        self.data_wait_s += wait
        self.seconds += seconds
        check.metrics.update(images_per_s=self.batch_size * check.steps / seconds,
                             data_wait=min(wait / seconds, 1.0))
        if len(waits) > 1:
            check.metrics.update(rank_data_wait_s=[round(w / steps, 5) for w in waits],
                                 rank_forward_s=[round(f / steps, 5) for f in forwards])
            self.name_stragglers(check.metrics)

    def name_stragglers(self, figures: dict) -> None:
        slow = stragglers(figures["rank_forward_s"], figures["rank_data_wait_s"], self.factor)
        self.slow_windows = {rank: self.slow_windows.get(rank, 0) + 1 for rank, _, _ in slow}
        if not self.is_main:
            return
        for rank, times, why in slow:
            count = self.slow_windows[rank]
            if count < WINDOWS or (count - WINDOWS) % REPEAT:
                continue
            log.warning("straggler: rank %d on %s is %.1fx the other ranks' median (forward %.3f s "
                        "+ data wait %.3f s per step) for %d logging intervals, mostly %s; every "
                        "step waits for it", rank, self.hosts[rank], times,
                        figures["rank_forward_s"][rank], figures["rank_data_wait_s"][rank],
                        count, why)

    def waiting_share(self) -> float | None:
        """The run's share of training time spent waiting for input (None before any check)."""
        return self.data_wait_s / self.seconds if self.seconds else None

    def state_dict(self) -> dict:
        return {"slow_windows": dict(self.slow_windows), "data_wait_s": self.data_wait_s,
                "seconds": self.seconds}

    def load_state_dict(self, state) -> None:
        if state is not None:
            self.slow_windows = {int(k): v for k, v in state["slow_windows"].items()}
            self.data_wait_s, self.seconds = state["data_wait_s"], state["seconds"]
