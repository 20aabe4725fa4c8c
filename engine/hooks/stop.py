"""Stopping on request: SIGTERM or SIGUSR1 (SLURM's preemption, ``scancel --signal``, torchrun
forwarding its own SIGTERM, the parent-death signal of a worker whose agent died) sets a flag;
the next check reduces it over ranks, every rank stops together after that step, and the
checkpoint hook saves. The latency is at most ``run.log_every_steps`` steps (launch/README.md).

After SIGUSR1 on any rank, rank 0 writes ``requeue_requested`` where ``$WRN_REQUEUE_MARKER``
says (else in the run directory): launch/slurm.sbatch requeues the job when it finds it
(``scancel --signal=USR1 JOBID`` signals the ranks, not the script, and USR1 means "checkpoint
and requeue" there)."""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from ..distributed import stop_with_parent
from .base import Check, Hook

log = logging.getLogger("wrn_large.train")
REQUEUE_MARKER = "requeue_requested"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopHook(Hook):
    def __init__(self, out: str | Path, is_main: bool = True):
        self.out, self.is_main = Path(out), is_main
        self.flag, self.signals, self.requeue = False, set(), False
        self.signalled_at: float | None = None     # the first signal's time
        # from here on, not at the start of training: a signal during set-up is kept too
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        if "TORCHELASTIC_RUN_ID" in os.environ:   # a torchrun worker: never outlive the agent
            stop_with_parent(signal.SIGTERM)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the next check (within "
                    "run.log_every_steps steps), then exiting", signum)
        self.flag = True
        self.signalled_at = self.signalled_at or time.time()
        self.signals.add(signum)   # srun may follow a USR1 with a TERM: USR1 still decides

    def to_reduce(self) -> dict:
        return {"stop": float(self.flag), "requeue": float(signal.SIGUSR1 in self.signals)}

    def after_check(self, check: Check) -> None:
        if check.reduced["stop"] > 0:
            self.requeue = check.reduced["requeue"] > 0
            self.trainer.request_stop("preempted")

    def after_train(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.trainer.status == "preempted" and self.requeue and self.is_main:
            marker = Path(os.environ.get("WRN_REQUEUE_MARKER") or self.out / REQUEUE_MARKER)
            marker.write_text(f"SIGUSR1 at step {self.trainer.state.step}\n")
