"""Membership changes of an elastic job (engine/membership.py): the processes and hosts of the
start that saved a checkpoint are kept in it; a start that resumes with others logs the change
and writes one ``membership`` record to metrics.jsonl at its first optimizer step, with how long
recovery took and how many steps were done again. A start that ends by an error or a stop signal
leaves a note for the next one to measure that from."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..distributed import all_gather_object, broadcast_object
from ..membership import Batching, membership_record, read_notes, remove_notes, write_note
from .base import Hook
from .metrics import MetricsHook
from .stop import StopHook

log = logging.getLogger("wrn_large.train")


class MembershipHook(Hook):
    name = "membership"

    def __init__(self, out: str | Path, batching: Batching, hosts: list[str],
                 is_main: bool = True):
        self.out, self.batching, self.hosts, self.is_main = Path(out), batching, hosts, is_main
        self.saved: dict | None = None       # the checkpoint's membership
        self.pending: dict | None = None     # the change, until its record is written
        self.started_at: float | None = None  # when this start began training (rank 0's clock)
        self.read: dict = {}                   # the notes this rank read, to remove

    def state_dict(self) -> dict:
        return {"world_size": self.batching.world_size, "hosts": self.hosts,
                "micro_batch": self.batching.micro_batch,
                "accumulation": self.batching.accumulation, "started_at": self.started_at}

    def load_state_dict(self, state: dict | None) -> None:
        self.saved = state

    def before_train(self) -> None:
        """Every rank reads the notes its host's folder holds (a run directory may be
        node-local) and all of them are gathered. Those written since the start that saved the
        checkpoint began count: how it (and any start after it) ended. The notes are removed
        once the change's record is written (at once where there is none): a start that dies
        before its first step leaves them to the next."""
        self.started_at = broadcast_object(time.time() if self.is_main else None)
        self.read = read_notes(self.out)
        gathered = {name: note for found in all_gather_object(self.read)
                    for name, note in found.items() if note is not None}
        old = self.saved
        if old is None or (old["world_size"] == self.batching.world_size
                           and sorted(old["hosts"]) == sorted(self.hosts)):
            remove_notes(self.out, self.read)
            return
        since = old.get("started_at") or 0.0
        notes = [n for n in gathered.values() if n["time"] >= since]
        self.pending = {"old": old, "notes": notes, "resumed": self.trainer.state.step}
        if self.is_main:
            log.info("membership changed: %d -> %d processes (hosts %s); micro-batch %d, "
                     "accumulation %s -> %d; resumed at step %d", old["world_size"],
                     self.batching.world_size, ", ".join(dict.fromkeys(self.hosts)),
                     self.batching.micro_batch, old.get("accumulation", "?"),
                     self.batching.accumulation, self.trainer.state.step)

    def after_step(self) -> None:
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        record = membership_record(p["old"], self.batching.world_size, self.hosts,
                                   self.batching, p["resumed"], p["notes"], time.time())
        if self.is_main:
            log.info("membership change recovered: %s s from the failure to this step, %s "
                     "step(s) done again", record["recovery_s"], record["steps_repeated"])
            metrics = self.trainer.hooks.of_type(MetricsHook)
            if metrics is not None:
                metrics.write("membership", self.trainer.state.step, record)
        remove_notes(self.out, self.read)

    def after_train(self) -> None:
        """The note of a start that did not end well: when (the first stop signal, else the
        error as the loop saw it) and at which step."""
        t = self.trainer
        if t.status in ("finished", "max_steps") or self.started_at is None:
            return
        stop = t.hooks.of_type(StopHook)
        signalled = stop.signalled_at if stop is not None else None
        reason = "stop signal" if t.status == "preempted" else "error"
        write_note(self.out, signalled or t.failed_at or time.time(), t.state.step, reason)
