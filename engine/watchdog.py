"""A watchdog in every rank: a hung job is found, named and ended in minutes, not at the
process group's timeout (30 min for gloo, 10 for NCCL) with nothing said.

The training loop tells it where it is (``progress(step, phase)``: a few attribute writes, no
I/O). A thread publishes that record every few seconds where every rank can read it without a
collective: the rendezvous store torchrun runs (a key per rank, under this restart attempt's
prefix), or, in a job of one process, nowhere but here. When no rank has made progress for
``train.hang_timeout_s``, each live rank:

- logs one table (host, pid, last step, phase, seconds since its last progress) and names the
  stuck rank(s): those whose records stopped coming (a stopped or frozen process), else those
  not waiting in a collective while the others are;
- writes the Python stacks of all its threads, the main thread's first, to
  ``RUN_DIR/hang_<time>_rank<r>.txt``;
- (the reporting rank) kills the silent ranks on its own host: a stopped process ignores the
  SIGTERM torchrun sends first, which would cost another 30 s;
- exits with ``HANG_EXIT_CODE``, so torchrun (``--max-restarts``) restarts the group, which
  resumes from the last checkpoint, and SLURM's script requeues once restarts are spent.

Clocks are compared across hosts (each record carries its writer's wall time): cluster nodes
keep them within milliseconds (NTP), far below any useful timeout.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 75    # EX_TEMPFAIL: try again (torchrun restarts, SLURM requeues)
COLLECTIVE = "all-reduce"
PHASES = ("start", "data", "compute", COLLECTIVE, "evaluation", "checkpoint")


@dataclass
class Record:
    rank: int
    host: str
    pid: int
    step: int
    phase: str
    since: float        # wall time of its last progress
    beat: float         # wall time it was published

    def age(self, now: float) -> float:
        return now - self.since


def rank_store(rank: int, world_size: int):
    """A client of torchrun's rendezvous store, private to this restart attempt; None outside a
    torchrun job of several processes."""
    if world_size < 2 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=60))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"wrn_large/attempt_{attempt}/watchdog", store)


def write_stacks(f) -> None:
    """The main thread's stack first, then every thread's. faulthandler lists at most 100
    threads, newest first, so in a process with many threads it would leave out the main one,
    the one that hangs."""
    main = sys._current_frames().get(threading.main_thread().ident)
    if main is not None:
        f.write("Main thread (most recent call last):\n")
        f.write("".join(traceback.format_stack(main)) + "\n")
    f.flush()
    faulthandler.dump_traceback(file=f, all_threads=True)


def is_rank(pid: int, rank: int) -> bool:
    """Whether process ``pid`` here is rank ``rank`` of this torchrun job (not a process that
    reused the pid, nor one of another job: same RANK and TORCHELASTIC_RUN_ID)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return False
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "").encode()
    return environ.get(b"RANK") == str(rank).encode() and \
        environ.get(b"TORCHELASTIC_RUN_ID", b"") == run_id


def verdict(records: list[Record], world_size: int, now: float, timeout: float,
            interval: float) -> tuple[str, list[int]] | None:
    """None while some rank made progress within ``timeout``; else (what happened, stuck ranks)."""
    if not records or min(r.age(now) for r in records) < timeout:
        return None
    seen = {r.rank for r in records}
    silent = sorted(set(range(world_size)) - seen) + sorted(
        r.rank for r in records if now - r.beat > 3 * interval)
    if silent:
        return "no record for {:.0f} s: stopped, frozen or gone".format(3 * interval), silent
    waiting = [r for r in records if r.phase == COLLECTIVE]
    busy = sorted(r.rank for r in records if r.phase != COLLECTIVE)
    if waiting and busy:
        return "the others wait for them in a collective", busy
    lowest = min(r.step for r in records)
    behind = sorted(r.rank for r in records if r.step == lowest)
    if len(behind) < len(records):
        return "behind the others' step", behind
    return "every rank waits: a collective that never completes (network, NCCL)", []


def table(records: list[Record], now: float) -> str:
    lines = [f"{'rank':>4} {'host':<20} {'pid':>8} {'step':>8} {'phase':<11} {'idle s':>7}"]
    for r in sorted(records, key=lambda r: r.rank):
        lines.append(f"{r.rank:>4} {r.host[:20]:<20} {r.pid:>8} {r.step:>8} {r.phase:<11} "
                     f"{r.age(now):>7.0f}")
    return "\n".join(lines)


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid`` and by them (Linux's /proc; elsewhere none): a hang's
    exit must not leave them behind, e.g. a DataLoader worker stuck before it ran a line, which
    would keep the job's output pipes open."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue   # not a process, or gone
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_after_exit(pids: list[int], wait_s: float = 10.0) -> None:
    """SIGKILL ``pids`` once this process has exited and its parent has reaped it (or after
    ``wait_s``). torchrun reports the first failure it sees: a rank killed before this one's
    exit code (75, a hang) is seen would hide why the job stopped, and killing first, then
    exiting at once, still lost that race while this process's memory was being torn down. A
    shell in a session of its own does the killing: no Python runs in a child of this threaded
    process (pipelines/torch_backend.py says why), and torchrun's signals to this rank's
    process group do not reach it."""
    if not pids:
        return
    script = ('p=$1; shift; n=0; while kill -0 "$p" 2>/dev/null && [ "$n" -lt %d ]; do '
              'sleep 0.01; n=$((n + 1)); done; kill -9 "$@" 2>/dev/null' % int(wait_s * 100))
    quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    try:   # its output to /dev/null: it must not hold the job's output open
        os.posix_spawn("/bin/sh", ["sh", "-c", script, "sh", str(os.getpid()), *map(str, pids)],
                       os.environ, file_actions=quiet, setsid=True)
    except OSError:  # no shell: kill now, at the risk of the order
        kill_now(pids)


def kill_now(pids: list[int]) -> None:
    import signal
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass   # gone already


class Watchdog:
    """``clock`` (wall time, seconds) and ``exit`` are for tests: with a clock of their own they
    call ``check_once`` themselves, with no thread and no sleep."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, out_dir: Path,
                 store=None, interval: float | None = None, exit=None, clock=time.time):
        self.timeout, self.rank, self.world_size = float(timeout_s), rank, world_size
        self.out, self.store, self._exit, self.clock = Path(out_dir), store, exit, clock
        self.interval = interval or max(0.5, min(10.0, self.timeout / 10))
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step, self.phase, self.since = 0, "start", clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the loop's side
    def progress(self, step: int | None = None, phase: str | None = None) -> None:
        if step is not None:
            self.step = step
        if phase is not None:
            self.phase = phase
        self.since = self.clock()

    def start(self) -> "Watchdog":
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------- the thread's side
    def record(self) -> Record:
        return Record(self.rank, self.host, self.pid, self.step, self.phase, self.since,
                      self.clock())

    def records(self) -> list[Record]:
        mine = self.record()
        if self.store is None:
            return [mine]
        self.store.set(str(self.rank), json.dumps(mine.__dict__))
        out = []
        for rank in range(self.world_size):
            if rank == self.rank:
                out.append(mine)
            elif self.store.check([str(rank)]):
                out.append(Record(**json.loads(self.store.get(str(rank)))))
        return out

    def _run(self) -> None:
        first = True   # publish at once: a rank stopped in its first seconds is named too
        while first or not self._stop.wait(self.interval):
            first = False
            if self.check_once():
                return

    def check_once(self) -> bool:
        """One round of the thread: publish this rank's record, read the others', and end the job
        if no rank has made progress for the timeout. True when it ended the job (returns only
        with an injected ``exit``)."""
        try:
            records = self.records()
        except Exception as e:  # noqa: BLE001 - the store gone: the job is ending anyway
            log.debug("watchdog: %s", e)
            return False
        now = self.clock()
        found = verdict(records, self.world_size, now, self.timeout, self.interval)
        if found is None or self._stop.is_set():
            return False
        self.end_the_job(self.report(records, now, *found))
        return True

    def end_the_job(self, silent: list[int]) -> None:
        """Exit 75 at once, with the processes this one started (a DataLoader worker stuck in its
        start-up would keep the job's output open); right after, SIGKILL the stopped ranks of
        this host. ``exit`` given (tests): call it instead, and leave this process's children."""
        if self._exit is None:
            kill_now(descendants(os.getpid()))
        kill_after_exit(silent)
        (self._exit or os._exit)(HANG_EXIT_CODE)

    def stopped_neighbours(self, records: list[Record], now: float) -> list[int]:
        """The pids of the silent ranks on this host, to SIGKILL: a stopped process acts on no
        SIGTERM, so torchrun would wait its 30 s for each before killing it and restarting the
        group."""
        silent = []
        for r in records:
            if r.host == self.host and r.pid != self.pid and now - r.beat > 3 * self.interval \
                    and is_rank(r.pid, r.rank):
                log.error("killing rank %d (pid %d), silent for %.0f s", r.rank, r.pid,
                          now - r.beat)
                silent.append(r.pid)
        return silent

    def report(self, records: list[Record], now: float, what: str, stuck: list[int]) -> list[int]:
        """Log the hang and write this rank's stacks; the pids of the stopped ranks to kill."""
        started = max(r.since for r in records)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
        path = self.out / f"hang_{stamp}_rank{self.rank}.txt"
        try:
            with open(path, "w") as f:
                f.write(f"rank {self.rank} on {self.host}, pid {self.pid}: step {self.step}, "
                        f"phase {self.phase}, no progress anywhere for {now - started:.0f} s\n\n")
                write_stacks(f)
        except OSError as e:
            log.error("watchdog: cannot write %s: %s", path, e)
        live = [r.rank for r in records if now - r.beat <= 3 * self.interval]
        named = {r.rank: r for r in records}
        if self.rank == min(live, default=self.rank):   # one table per job, from one rank
            who = ", ".join(f"rank {s}" + (f" ({named[s].host}, step {named[s].step}, "
                                           f"{named[s].phase})" if s in named else "")
                            for s in stuck) or "no single rank"
            log.error("HANG: no rank made progress for %.0f s (train.hang_timeout_s=%g). Stuck: "
                      "%s: %s.\n%s\nstacks: %s/hang_%s_rank*.txt; exiting with code %d so that "
                      "torchrun restarts the job from its last checkpoint", now - started,
                      self.timeout, who, what, table(records, now), self.out, stamp,
                      HANG_EXIT_CODE)
            silent = self.stopped_neighbours(records, now)
        else:
            log.error("HANG: rank %d exits (code %d); stack in %s", self.rank, HANG_EXIT_CODE, path)
            silent = []
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        return silent
