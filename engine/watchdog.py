"""A watchdog in every rank: a hung job is found, named and ended in minutes, not at the
process group's timeout (30 min for gloo, 10 for NCCL) with nothing said.

Where a rank is comes from three sources, read by a thread of its own and published every
``interval`` seconds:

- the loop's phase and step (``progress(step, phase)``: a few attribute writes, no I/O);
- the engine's pass counters (``engine.engines.Position``: forward and backward passes begun and
  ended, plain ints counted by the engine around its own calls, so DDP's reductions - inside
  backward, and its buffer broadcast at the start of forward - and DeepSpeed's are covered
  alike). A rank that began more passes than another is waiting for it in a collective; the one
  that began fewest is the stuck one, and its counters say in which (forward or backward: both
  are phase ``compute``);
- the process itself: the state of the main thread (``/proc/self/task/<tid>/stat``: ``D`` is
  uninterruptible sleep, a read on a hung file system; the watchdog thread still runs and says
  so) and the oldest sample read in flight here with the count of abandoned reads
  (``pipelines.read_guard``).

When no rank has made progress for ``train.hang_timeout_s``, one rank (the reporter) names the
stuck rank(s) in a table of all ranks (``verdict``): those whose records stopped coming (a
stopped, frozen or dead process; on the reporter's host, its ``/proc`` state too), else the
ranks the others wait for, else - when no rank waits on another - each rank stuck on its own:
all of them in ``data`` is the file system, with the paths being read. It publishes the verdict;
every live rank then writes its stacks, says so and exits with ``HANG_EXIT_CODE``. torchrun
(``--max-restarts``) restarts the group, which resumes from the last checkpoint; once the
restarts are spent the job fails (``launch/slurm.sbatch`` does not requeue it: a requeue would
meet the same fault).

The exit cannot block on our own I/O (``Watchdog.end_the_job``): a deadline that calls
``os._exit`` is armed before any I/O; the stacks go first to a local file (``$TMPDIR``), then to
``RUN_DIR/hang_<time>_rank<r>.txt`` only if the run directory answers, and logging and the
flight recorder's dump run in threads with a time limit. A thread in state D cannot be ended by
anything in the process: the process exits all the same, says which thread holds it, and is
gone once that read returns.

With a process group whose flight recorder is on (NCCL: ``TORCH_NCCL_TRACE_BUFFER_SIZE``, set by
``engine.distributed``; gloo: ``TORCH_FR_BUFFER_SIZE``), each rank dumps it before it exits, to
``TORCH_NCCL_DEBUG_INFO_TEMP_FILE`` (default ``/tmp/nccl_trace_rank_``) + rank, where NCCL's own
dump at the collectives' timeout would have gone: that timeout (hang_timeout_s + 300 s) is never
reached once the watchdog exits.

Store traffic (torchrun's one rendezvous store, keys under this restart attempt's prefix), per
interval: every rank one ``set`` of its record (~200 B, plus the length of a path in flight)
and one ``get`` of the heartbeat key (~50 B; a verdict rides in it); the reporter, instead of
the ``get``, one ``multi_get`` of the W-1 other records and one ``compare_set`` of the
heartbeat. Per interval that is 2 requests and ~240 B per rank, 3 requests and ~210 B x (W-1)
at the reporter, 2W + 1 requests in all (measured at W = 8 and 32: tests/test_watchdog.py). At
4,096 ranks and the default 10 s interval: 8,193 requests per interval (~820/s) and ~860 KB
read by the reporter, against W x (2W - 1) = 33.5 million requests per interval (3.4 million/s)
when every rank read every record. The reporter is rank 0 at the start; it names its
successors (the next live ranks) in the heartbeat, and successor k (0, 1, 2) takes over once
the heartbeat has not moved for (3 + 2k) intervals, any other rank after 11. A hang costs a few requests more: the verdict (what, who, at most 8 ranks named and
64 silent ones to kill: under 10 KB; the table stays in the reporter's log) read once by every
rank in the heartbeat, and the others' acknowledgements (``add``), polled by the reporter so
that it exits after them.

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
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 75    # EX_TEMPFAIL: try again (torchrun restarts)
DATA, COMPUTE, COLLECTIVE = "data", "compute", "all-reduce"
PHASES = ("start", DATA, COMPUTE, COLLECTIVE, "evaluation", "checkpoint")
STATE_D = "state D (uninterruptible: a read on a hung file system)"
HEARTBEAT = "hb"       # the reporter's heartbeat, its successors and, once found, the verdict
ACKS = "acks"          # ranks that have written their stacks after a verdict
SUCCESSORS = 3         # ranks named to take over from the reporter
NAMED_AT_MOST = 8      # stuck ranks written out in the HANG line (the table has them all)
KILLED_AT_MOST = 64    # silent ranks in the published verdict, for their hosts' ranks to kill


@dataclass
class Record:
    rank: int
    host: str
    pid: int
    step: int
    phase: str
    since: float        # wall time of its last progress
    beat: float         # wall time it was published
    fwd: int = 0        # forward passes begun (engine.engines.Position)
    fwd_done: int = 0
    bwd: int = 0        # backward passes begun (and, under DeepSpeed, the step after them)
    bwd_done: int = 0
    state: str = ""     # the main thread's /proc state (R, S, D, ...); "" where unknown
    blocked: int = 0    # threads in state D (uninterruptible), the main one included
    read: str | None = None          # the oldest sample read in flight here
    read_since: float | None = None  # ... its start (wall time)
    abandoned: int = 0  # reads given up on (pipelines.read_guard)

    def age(self, now: float) -> float:
        return now - self.since

    @property
    def passes(self) -> int:
        """Passes begun: of two ranks, the one with more is further on (each pass begins after
        the last one ended, on every rank in the same order)."""
        return self.fwd + self.bwd

    def reading_for(self, now: float) -> float:
        """Seconds the oldest read in flight here has taken (0: none known)."""
        return now - self.read_since if self.read is not None and self.read_since else 0.0

    def doing(self, now: float) -> str:
        """Where it is, in words: the phase, refined by the pass counters, the state and the
        read in flight."""
        if self.bwd > self.bwd_done:
            where = f"{COMPUTE} (backward)"
        elif self.fwd > self.fwd_done:
            where = f"{COMPUTE} (forward)"
        else:
            where = self.phase
        if self.state == "D":
            where += f", {STATE_D}"
        elif self.blocked:
            where += f", {self.blocked} thread(s) in {STATE_D}"
        if self.read is not None and (self.phase == DATA or self.state == "D" or self.blocked):
            where += f", reading {self.read}" + (
                f" for {now - self.read_since:.0f} s" if self.read_since else "")
        return where


def encode(record: Record) -> str:
    return json.dumps(asdict(record), separators=(",", ":"))


def rank_store(rank: int, world_size: int):
    """A client of the job's store (the agents', or rank 0's in an elastic job), private to this
    restart attempt (``distributed.attempt_prefix``); None outside a torchrun job of several
    processes."""
    if world_size < 2 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=60))
    from .distributed import attempt_prefix
    return dist.PrefixStore(f"{attempt_prefix()}/watchdog", store)


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


def proc_state(path: str) -> str:
    """The state letter of a /proc stat file (R, S, D, T, Z, ...); "" if unreadable."""
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def task_states() -> dict[str, str]:
    """The /proc state of each thread of this process, by thread id ({} where unknown)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    return {tid: proc_state(f"/proc/self/task/{tid}/stat") for tid in tids}


def thread_states() -> tuple[str, int]:
    """The main thread's state and the number of this process's threads in state D."""
    states = task_states()
    main = str(threading.main_thread().native_id)
    return states.get(main, ""), sum(1 for state in states.values() if state == "D")


def threads_in_state_d() -> list[str]:
    """This process's threads in uninterruptible sleep, as 'tid (name)'."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    return [f"{tid} ({names.get(int(tid), '?')})" for tid, state in task_states().items()
            if state == "D"]


def reads_in_flight() -> tuple[str | None, float | None, int]:
    """(path, start) of the oldest sample read in flight in this process and the count of
    abandoned reads (pipelines.read_guard); (None, None, 0) where it is not there."""
    try:
        from pipelines import read_guard
    except ImportError:
        return None, None, 0
    oldest = read_guard.oldest_read()
    return (*(oldest or (None, None)), read_guard.abandoned_reads())


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
            interval: float, states: dict[int, str] | None = None
            ) -> tuple[str, list[int]] | None:
    """None while some rank made progress within ``timeout``; else (what happened, stuck ranks).
    ``states``: the /proc state of silent ranks that the caller could see (its own host)."""
    if not records or min(r.age(now) for r in records) < timeout:
        return None
    seen = {r.rank for r in records}
    silent = sorted(set(range(world_size)) - seen) + sorted(
        r.rank for r in records if now - r.beat > 3 * interval)
    if silent:
        what = "no record for {:.0f} s: stopped, frozen or gone".format(3 * interval)
        for letter, words in (("D", STATE_D), ("T", "stopped (state T)")):
            named = [s for s in silent if (states or {}).get(s) == letter]
            if named:
                what += f"; {ranks(named)} in {words}"
        return what, silent
    low = min(r.passes for r in records)
    if any(r.passes > low for r in records):
        behind = sorted(r.rank for r in records if r.passes == low)
        return "the others wait for them in a collective (they began more passes)", behind
    if all(r.bwd > r.bwd_done for r in records):
        return ("every rank waits in backward: a collective that never completes (network, "
                "NCCL)"), []
    if all(r.fwd > r.fwd_done for r in records):
        return ("every rank is in its forward pass: compute, or a collective inside it (DDP's "
                "buffer broadcast) that never completes"), sorted(seen)
    # the same passes begun everywhere: those in the loop's collective wait for the others
    waiting = [r for r in records if r.phase == COLLECTIVE and r.fwd == r.fwd_done
               and r.bwd == r.bwd_done]
    busy = sorted(r.rank for r in records if r not in waiting)
    if waiting and busy:
        return "the others wait for them in a collective", busy
    if not busy:
        return "every rank waits: a collective that never completes (network, NCCL)", []
    # no rank waits for another: each is stuck on its own. In a read: in data, or with a read
    # in flight for half the timeout or a thread in state D (evaluation's reads too)
    if all(r.phase == DATA or r.reading_for(now) >= timeout / 2 or r.blocked for r in records):
        if len(records) == 1:
            return "stuck reading its input (the file system)", busy
        return "the file system: every rank is stuck reading its input", busy
    return "each rank is stuck on its own, none in a collective", busy


def ranks(numbers: list[int]) -> str:
    return ("rank " if len(numbers) == 1 else "ranks ") + ", ".join(map(str, numbers))


def table(records: list[Record], now: float) -> str:
    lines = [(f"{'rank':>4} {'host':<20} {'pid':>8} {'step':>8} {'phase':<11} {'idle s':>7} "
              f"{'fwd':>6} {'bwd':>6} {'st':>2} {'D':>3} {'lost':>4} reading")]
    for r in sorted(records, key=lambda r: r.rank):
        passes = (f"{r.fwd}{'+' if r.fwd > r.fwd_done else ' '}",
                  f"{r.bwd}{'+' if r.bwd > r.bwd_done else ' '}")
        reading = "" if r.read is None else r.read + (
            f" ({now - r.read_since:.0f} s)" if r.read_since else "")
        lines.append(f"{r.rank:>4} {r.host[:20]:<20} {r.pid:>8} {r.step:>8} {r.phase:<11} "
                     f"{r.age(now):>7.0f} {passes[0]:>6} {passes[1]:>6} {r.state or '?':>2} "
                     f"{r.blocked:>3} {r.abandoned:>4} {reading}".rstrip())
    lines.append("(fwd, bwd: passes begun, + while in one; st: the main thread's state; D: threads "
                 "in state D; lost: reads abandoned; reading: the oldest read in flight)")
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


def bounded(fn, seconds: float) -> bool:
    """Run ``fn`` in a thread of its own and wait at most ``seconds``: whether it finished. A
    call that blocks (a hung file system, a handler's lock held by the stuck thread) is left
    behind; the process exits without it."""
    done = threading.Event()

    def run():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - best effort: the exit goes on
            log.debug("watchdog: %r", e)
        finally:
            done.set()

    threading.Thread(target=run, name="hang-watchdog-io", daemon=True).start()
    return done.wait(max(seconds, 0.0))


def arm_deadline(seconds: float, code: int) -> None:
    """``os._exit(code)`` in ``seconds`` whatever the process is doing then (a thread of ours
    blocked in a write, a logging handler's lock). It needs the GIL: ``end_the_job`` also arms
    ``faulthandler``'s C-level timer, which needs none, 5 s later (it exits with code 1)."""
    def expire():
        time.sleep(seconds)
        stuck = threads_in_state_d()
        message = (f"hang watchdog: exit deadline ({seconds:.0f} s) passed; exiting with code "
                   f"{code}" + (f"; threads in {STATE_D}: {', '.join(stuck)} - the process is "
                                f"gone once their reads return" if stuck else "") + "\n")
        bounded(lambda: os.write(2, message.encode()), 1.0)
        os._exit(code)

    threading.Thread(target=expire, name="hang-watchdog-deadline", daemon=True).start()


def flight_recorder_path(rank: int) -> str:
    prefix = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE") or \
        os.environ.get("TORCH_FR_DUMP_TEMP_FILE") or "/tmp/nccl_trace_rank_"
    return f"{prefix}{rank}"


def dump_flight_recorder(rank: int) -> str | None:
    """The process group's flight recorder (its last collectives) dumped to
    ``flight_recorder_path``: NCCL's when the group is NCCL, the generic one (gloo) when
    ``TORCH_FR_BUFFER_SIZE`` turns it on; the path, or None where there is none."""
    dist = sys.modules.get("torch.distributed")   # not imported: no process group
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    from torch._C import _distributed_c10d as c10d
    if dist.get_backend() == "nccl" and int(os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "0")):
        trace = c10d._dump_nccl_trace()
    elif int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0")) and hasattr(c10d, "_dump_fr_trace"):
        trace = c10d._dump_fr_trace()
    else:
        return None
    path = flight_recorder_path(rank)
    with open(path, "wb") as f:
        f.write(trace)
    return path


class Watchdog:
    """``clock`` (wall time, seconds) and ``exit`` are for tests: with a clock of their own they
    call ``check_once`` themselves, with no thread and no sleep; with ``exit`` no deadline is
    armed. ``position``: the engine's pass counters (``engine.engines.Position``), or None.
    ``ack_wait_s``: how long the reporter waits, after a verdict, for the other live ranks to
    have written their stacks; ``exit_deadline_s``: the most a hang's exit may take."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, out_dir: Path,
                 store=None, interval: float | None = None, exit=None, clock=time.time,
                 position=None, ack_wait_s: float | None = None,
                 exit_deadline_s: float | None = None):
        self.timeout, self.rank, self.world_size = float(timeout_s), rank, world_size
        self.out, self.store, self._exit, self.clock = Path(out_dir), store, exit, clock
        self.position = position
        self.interval = interval or max(0.5, min(10.0, self.timeout / 10))
        self.ack_wait = 2 * self.interval + 1 if ack_wait_s is None else ack_wait_s
        self.exit_deadline = self.ack_wait + 20 if exit_deadline_s is None else exit_deadline_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step, self.phase, self.since = 0, "start", clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the store protocol (the module's docstring)
        self.heartbeat: bytes | None = None   # the heartbeat as last read or written here
        self.heartbeat_moved = clock()        # when it last changed, on this clock
        self.reporting = False
        self.seen: set[int] = {rank}          # ranks whose record is in the store (reporter)

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
        p = self.position
        counts = (p.forwards, p.forwards_done, p.backwards, p.backwards_done) if p else (0,) * 4
        read, read_since, abandoned = reads_in_flight()
        return Record(self.rank, self.host, self.pid, self.step, self.phase, self.since,
                      self.clock(), *counts, *thread_states(), read, read_since, abandoned)

    def _run(self) -> None:
        first = True   # publish at once: a rank stopped in its first seconds is named too
        while first or not self._stop.wait(self.interval):
            first = False
            if self.check_once():
                return

    def check_once(self) -> bool:
        """One round of the thread: publish this rank's record; as the reporter, read every
        record and end the job if no rank has made progress for the timeout; otherwise read the
        heartbeat and follow a verdict found there. True when it ended the job (returns only
        with an injected ``exit``)."""
        if self.store is None:
            mine = self.record()
            now = self.clock()
            found = verdict([mine], 1, now, self.timeout, self.interval)
            if found is None or self._stop.is_set():
                return False
            self.end_the_job(self.finding([mine], now, *found), [mine])
            return True
        try:
            return self.round()
        except Exception as e:  # noqa: BLE001 - the store gone: the job is ending anyway
            log.debug("watchdog: %s", e)
            return False

    def round(self) -> bool:
        store = self.store
        if self.heartbeat is None:    # the first round: the heartbeat exists from here on
            first = json.dumps({"n": 0, "by": 0, "next": list(range(1, SUCCESSORS + 1))})
            self.heartbeat = store.compare_set(HEARTBEAT, "", first)
            self.heartbeat_moved = self.clock()
            self.reporting = json.loads(self.heartbeat)["by"] == self.rank
        mine = self.record()
        store.set(f"r{self.rank}", encode(mine))
        if not self.reporting:
            beat = store.get(HEARTBEAT)
            if beat != self.heartbeat:
                self.heartbeat, self.heartbeat_moved = beat, self.clock()
            heard = json.loads(beat)
            if heard.get("verdict"):
                return self.follow(heard["verdict"], mine)
            if not self.takes_over(heard):
                return False
            log.warning("watchdog: rank %d reports from now on (rank %d's heartbeat stopped "
                        "%.0f s ago)", self.rank, heard["by"], self.clock() - self.heartbeat_moved)
        return self.report_round(mine)

    def takes_over(self, heard: dict) -> bool:
        """Whether this rank becomes the reporter: the k-th successor named in the heartbeat
        once it has not moved for (3 + 2k) intervals, any rank after (5 + 2 x SUCCESSORS)."""
        stale = self.clock() - self.heartbeat_moved
        successors = heard.get("next", [])
        k = successors.index(self.rank) if self.rank in successors else SUCCESSORS + 1
        return stale > (3 + 2 * k) * self.interval

    def read_records(self, mine: Record) -> list[Record]:
        """Every record in the store (the reporter's round): one multi_get once all ranks have
        published; until then a check of each rank not seen yet."""
        store, unseen = self.store, [r for r in range(self.world_size) if r not in self.seen]
        if unseen:
            if store.check([f"r{r}" for r in unseen]):
                self.seen.update(unseen)
            else:
                self.seen.update(r for r in unseen if store.check([f"r{r}"]))
        others = sorted(self.seen - {self.rank})
        values = store.multi_get([f"r{r}" for r in others]) if others else []
        return [mine] + [Record(**json.loads(v)) for v in values]

    def report_round(self, mine: Record) -> bool:
        records = self.read_records(mine)
        now = self.clock()
        live = sorted(r.rank for r in records if now - r.beat <= 3 * self.interval)
        beat = json.loads(self.heartbeat)
        new = {"n": beat.get("n", 0) + 1, "by": self.rank,
               "next": [r for r in live if r != self.rank][:SUCCESSORS]}
        found = verdict(records, self.world_size, now, self.timeout, self.interval,
                        self.neighbour_states(records, now))
        finding = None
        if found is not None and not self._stop.is_set():
            finding = self.finding(records, now, *found)   # the table stays here: O(W) bytes
            new["verdict"] = {k: v for k, v in finding.items() if k != "table"}
        wanted = json.dumps(new).encode()
        current = self.store.compare_set(HEARTBEAT, self.heartbeat, wanted)
        if current != wanted:   # another rank took over (this one was stopped a while)
            self.reporting, self.heartbeat = False, current
            self.heartbeat_moved = self.clock()
            heard = json.loads(current)
            return self.follow(heard["verdict"], mine) if heard.get("verdict") else False
        self.reporting, self.heartbeat = True, current
        if finding is None:
            return False
        self.end_the_job(finding, records)
        return True

    def neighbour_states(self, records: list[Record], now: float) -> dict[int, str]:
        """The /proc state of the silent ranks on this host (D: uninterruptible, T: stopped)."""
        return {r.rank: proc_state(f"/proc/{r.pid}/stat") for r in records
                if r.host == self.host and r.pid != self.pid
                and now - r.beat > 3 * self.interval and is_rank(r.pid, r.rank)}

    def finding(self, records: list[Record], now: float, what: str, stuck: list[int]) -> dict:
        """The verdict as published: what, who (in words), the table, the silent ranks to kill
        (host, pid, rank) and the stamp of every rank's stack file."""
        started = max(r.since for r in records)
        named = {r.rank: r for r in records}
        shown = [f"rank {s}" + (f" ({named[s].host}, step {named[s].step}, "
                                f"{named[s].doing(now)})" if s in named else "")
                 for s in stuck[:NAMED_AT_MOST]]
        if len(stuck) > NAMED_AT_MOST:
            shown.append(f"and {len(stuck) - NAMED_AT_MOST} more")
        silent = [[r.host, r.pid, r.rank] for r in records
                  if r.rank in stuck and now - r.beat > 3 * self.interval][:KILLED_AT_MOST]
        return {"what": what, "who": ", ".join(shown) or "no single rank",
                "idle": now - started, "by": self.rank, "kill": silent,
                "stamp": time.strftime("%Y%m%d-%H%M%S", time.localtime(started)),
                "table": table(records, now)}

    def follow(self, found: dict, mine: Record) -> bool:
        """A verdict read in the heartbeat: this rank's stacks, then its exit."""
        self.end_the_job(found, [mine])
        return True

    # ---------------------------------------------------------------- the exit
    def end_the_job(self, found: dict, records: list[Record]) -> None:
        """Exit 75, in a bounded time whatever blocks. In this order: the deadline (no I/O);
        this rank's stacks to a local file; the run directory's copy, the log lines and the
        flight recorder's dump, each in a thread with a time limit (the run directory only if
        it answers a stat); the acknowledgement (the others) or the wait for them (the
        reporter); then the processes this one started (a DataLoader worker stuck in its
        start-up would keep the job's output open), and right after the exit the stopped ranks
        of this host. ``exit`` given (tests): no deadline, and it is called instead of
        ``os._exit``, leaving this process's children."""
        real = self._exit is None
        if real:
            arm_deadline(self.exit_deadline, HANG_EXIT_CODE)
        name = f"hang_{found['stamp']}_rank{self.rank}.txt"
        header = (f"rank {self.rank} on {self.host}, pid {self.pid}: step {self.step}, phase "
                  f"{self.phase}, no progress anywhere for {found['idle']:.0f} s\n\n")

        def write_report(target: Path):
            with open(target, "w") as f:
                f.write(header)
                write_stacks(f)

        local = Path(tempfile.gettempdir()) / f"wrn_large_{self.pid}_{name}"
        try:
            write_report(local)
        except OSError:
            local = None
        if real and local is not None:   # the C-level backstop, should no Python thread run
            self._backstop = open(local, "a")  # noqa: SIM115 - open until the process ends
            faulthandler.dump_traceback_later(self.exit_deadline + 5, exit=True,
                                              file=self._backstop)
        path = self.out / name
        copied = bounded(lambda: os.stat(self.out), 2.0) and bounded(
            lambda: path.write_text(local.read_text()) if local else write_report(path), 5.0)
        if copied and local is not None and not real and path.exists():   # tests: no litter
            local.unlink(missing_ok=True)
        bounded(lambda: self.log_hang(found, path if copied else local), 5.0)
        bounded(self.log_flight_recorder, 5.0)
        self.acknowledge_or_wait(found, records)
        silent = [(pid, rank) for host, pid, rank in found.get("kill", [])
                  if host == self.host and pid != self.pid and is_rank(pid, rank)]
        for pid, rank in silent:
            bounded(lambda rank=rank, pid=pid: log.error(
                "killing rank %d (pid %d): silent, it would ignore torchrun's SIGTERM", rank,
                pid), 1.0)
        bounded(flush_logs, 2.0)
        if real:
            kill_now(descendants(os.getpid()))
        kill_after_exit([pid for pid, _ in silent])
        (self._exit or os._exit)(HANG_EXIT_CODE)

    def log_hang(self, found: dict, stacks: Path | None) -> None:
        if found["by"] == self.rank:   # one table per job, from the reporter
            log.error("HANG: no rank made progress for %.0f s (train.hang_timeout_s=%g). Stuck: "
                      "%s: %s.\n%s\nstacks: %s/hang_%s_rank*.txt (and in $TMPDIR where the run "
                      "directory did not answer); exiting with code %d so that torchrun "
                      "restarts the job from its last checkpoint", found["idle"], self.timeout,
                      found["who"], found["what"], found["table"], self.out, found["stamp"],
                      HANG_EXIT_CODE)
        else:
            log.error("HANG (found by rank %d: %s: %s): rank %d exits (code %d); stacks in %s",
                      found["by"], found["who"], found["what"], self.rank, HANG_EXIT_CODE, stacks)
        stuck = threads_in_state_d()
        if stuck:
            log.error("rank %d: thread(s) %s in %s: nothing in the process can end them; the "
                      "others exit now", self.rank, ", ".join(stuck), STATE_D)

    def log_flight_recorder(self) -> None:
        path = dump_flight_recorder(self.rank)
        if path:
            log.error("rank %d: flight recorder (last collectives) dumped to %s", self.rank, path)

    def acknowledge_or_wait(self, found: dict, records: list[Record]) -> None:
        """The others say they have written their stacks; the reporter waits for them (at most
        ``ack_wait``), so that torchrun, which stops every rank once one exits, stops none
        before its stacks are written."""
        if self.store is None:
            return
        if found["by"] != self.rank:
            bounded(lambda: self.store.add(ACKS, 1), 2.0)
            return
        now = self.clock()
        others = sum(1 for r in records if r.rank != self.rank and now - r.beat <= 3 * self.interval)
        deadline = time.monotonic() + self.ack_wait
        answered: list[int] = []
        while others and time.monotonic() < deadline:
            if not bounded(lambda: answered.append(self.store.add(ACKS, 0)), 2.0) or \
                    answered[-1] >= others:
                return
            time.sleep(min(0.1, self.interval))


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
