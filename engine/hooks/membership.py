"""Membership changes of an elastic job (engine/membership.py): the processes and hosts of the
start that saved a checkpoint are kept in it; a start that resumes with others logs the change
and writes one ``membership`` record to metrics.jsonl at its first optimizer step, with how long
recovery took and how many steps were done again. A start that ends by an error or a stop signal
leaves a note for the next one to measure that from."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..distributed import all_gather_object
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

    def state_dict(self) -> dict:
        return {"world_size": self.batching.world_size, "hosts": self.hosts,
                "micro_batch": self.batching.micro_batch,
                "accumulation": self.batching.accumulation}

    def load_state_dict(self, state: dict | None) -> None:
        self.saved = state

    def before_train(self) -> None:
        """Every rank reads the notes its host's folder holds (a run directory may be
        node-local), all of them are gathered, and each rank removes those it read."""
        mine = read_notes(self.out)
        notes = {name: note for found in all_gather_object(mine) for name, note in found.items()}
        remove_notes(self.out, mine)
        old = self.saved
        if old is None or (old["world_size"] == self.batching.world_size
                           and sorted(old["hosts"]) == sorted(self.hosts)):
            return
        self.pending = {"old": old, "notes": list(notes.values()),
                        "resumed": self.trainer.state.step}
        if self.is_main:
            log.info("membership changed: %d -> %d processes (hosts %s); micro-batch %d kept, "
                     "accumulation %d -> %d; resumed at step %d", old["world_size"],
                     self.batching.world_size, ", ".join(dict.fromkeys(self.hosts)),
                     self.batching.micro_batch, old.get("accumulation", 0),
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

    def after_train(self) -> None:
        """The note of a start that did not end well: when (the first stop signal, else now,
        just after the error) and at which step."""
        t = self.trainer
        if t.status in ("finished", "max_steps"):
            return
        stop = t.hooks.of_type(StopHook)
        signalled = stop.signalled_at if stop is not None else None
        reason = "stop signal" if t.status == "preempted" else "error"
        write_note(self.out, signalled or time.time(), t.state.step, reason)
