"""Where each rank's steps go: waiting for input, and computing the model's forward passes.

Both are measured where no collective can hide in them: the data wait around the loader's
``next``, the forward between hooks on the model itself (inside DDP, whose buffer broadcast and
gradient all-reduce happen outside it; DeepSpeed wraps the same module). Step wall times are
equal on every rank of a synchronous job (the collectives wait for the slowest), so they could
not name a straggler; these do. On CUDA the forward is timed with CUDA events, read at the
loop's next check, where the host waits for the device anyway: timing adds no synchronisation
of its own.

Every rank's figures travel in the check's one all-reduce (``engine.hooks.step_times``): rank r
fills slots r of two vectors the size of the world, and the sum is everyone's figures.
"""
from __future__ import annotations

import time
from statistics import median

import torch
import torch.nn as nn


class StepTimes:
    def __init__(self, module: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.data_wait = 0.0
        self._forward_s, self._events, self._waiting_since = 0.0, [], None
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._end)

    def _start(self, module, args):
        if module.training:
            self._mark()

    def _end(self, module, args, output):
        if module.training:
            self._forward_s += self._mark()

    def _mark(self) -> float:
        """A CUDA event (timed later), or on the CPU the seconds since the last mark."""
        if self.cuda:
            self._events.append(torch.cuda.Event(enable_timing=True))
            self._events[-1].record()
            return 0.0
        now, self._t0 = time.perf_counter(), getattr(self, "_t0", 0.0)
        since, self._t0 = now - self._t0, now
        return since

    def waiting(self) -> None:
        """The loop asks the loader for the next batch."""
        self._waiting_since = time.perf_counter()

    def arrived(self) -> None:
        """... and has it."""
        if self._waiting_since is not None:
            self.data_wait += time.perf_counter() - self._waiting_since
            self._waiting_since = None

    def take(self) -> tuple[float, float]:
        """(data wait, forward) seconds since the last ``take``. On CUDA this waits for the
        last forward's events: call it where the host waits for the device anyway."""
        if self.cuda:
            events, self._events = self._events, []
            if events:
                events[-1].synchronize()
            forward = sum(a.elapsed_time(b) for a, b in zip(events[::2], events[1::2])) / 1000
        else:
            forward, self._forward_s = self._forward_s, 0.0
        data_wait, self.data_wait = self.data_wait, 0.0
        return data_wait, forward


def stragglers(forward: list[float], data_wait: list[float], factor: float
               ) -> list[tuple[int, float, str]]:
    """(rank, times the others' median, "computing" or "waiting for data") for each rank whose
    forward plus data wait is ``factor`` or more times the median of the other ranks' (of the
    others, so that in a job of two the slow rank is compared with the fast one)."""
    if factor <= 0 or len(forward) < 2:
        return []
    busy = [f + d for f, d in zip(forward, data_wait)]
    out = []
    for rank, (b, f, d) in enumerate(zip(busy, forward, data_wait)):
        others = [i for i in range(len(busy)) if i != rank]
        typical = median(busy[i] for i in others)
        if typical > 0 and b >= factor * typical:
            extra_f = f - median(forward[i] for i in others)
            extra_d = d - median(data_wait[i] for i in others)
            out.append((rank, b / typical, "waiting for data" if extra_d > extra_f else "computing"))
    return out
