"""The hang watchdog's and the straggler rule's decisions, on records as ranks publish them
(the real processes, signals and restarts are in test_fault_tolerance.py)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.step_times import StepTimes, stragglers
from engine.watchdog import COLLECTIVE, STATE_D, Record, Watchdog, verdict
from trainer_utils import REPO, live_processes_mentioning

NOW = 1_000_000.0


def record(rank, step=10, phase=COLLECTIVE, idle=100.0, beat=0.0, **where):
    return Record(rank, f"node{rank // 4}", 1000 + rank, step, phase, NOW - idle, NOW - beat,
                  **where)


# Where a rank of a DDP job really is after 40 micro-batches (passes as the engine counts them):
# its next forward begun and waiting in DDP's buffer broadcast, its backward begun and waiting in
# the gradient all-reduce, between micro-batches waiting for data, ...
IN_DATA = dict(fwd=40, fwd_done=40, bwd=40, bwd_done=40)
IN_FORWARD = dict(fwd=41, fwd_done=40, bwd=40, bwd_done=40)
IN_BACKWARD = dict(fwd=41, fwd_done=41, bwd=41, bwd_done=40)


def test_a_rank_stuck_in_a_read_while_the_other_waits_inside_compute_is_named_with_the_path():
    """The usual hang (issue 33): rank 0's read of one file never returns; rank 1, its data in
    hand, waits inside DDP's forward (the buffer broadcast) or inside backward (the gradient
    all-reduce): the loop reports phase compute for it. Rank 0 is named, with the file."""
    for other in (IN_FORWARD, IN_BACKWARD):
        reading = record(0, phase="data", read="/data/train/n01/003.jpg",
                         read_since=NOW - 95, **IN_DATA)
        waiting = record(1, phase="compute", **other)
        what, stuck = verdict([reading, waiting], 2, NOW, 60, 2)
        assert stuck == [0] and "wait for them" in what, other
        assert reading.doing(NOW) == "data, reading /data/train/n01/003.jpg for 95 s"


def test_a_rank_in_an_endless_forward_is_named_compute_while_the_other_waits_in_backward():
    spinning = record(1, phase="compute", **IN_FORWARD)
    _, stuck = verdict([record(0, phase="compute", **IN_BACKWARD), spinning], 2, NOW, 60, 2)
    assert stuck == [1] and spinning.doing(NOW) == "compute (forward)"
    # with gradient accumulation, the rank behind by a whole micro-batch
    behind = record(2, phase="data", fwd=39, fwd_done=39, bwd=39, bwd_done=39)
    _, stuck = verdict([record(0, **IN_BACKWARD), record(1, **IN_BACKWARD), behind], 3, NOW, 60,
                       2)
    assert stuck == [2]


def test_every_rank_inside_backward_is_a_collective_that_never_completes():
    what, stuck = verdict([record(r, phase="compute", **IN_BACKWARD) for r in range(4)], 4, NOW,
                          60, 2)
    assert stuck == [] and "never completes" in what


def test_every_rank_in_data_is_the_file_system_and_a_lone_process_is_named_with_its_path():
    stuck_reads = [record(r, phase="data", read=f"/nfs/x/{r}.jpg", read_since=NOW - 70,
                          state="D", **IN_DATA) for r in range(3)]
    what, stuck = verdict(stuck_reads, 3, NOW, 60, 2)
    assert stuck == [0, 1, 2] and what.startswith("the file system")
    assert stuck_reads[1].doing(NOW) == f"data, {STATE_D}, reading /nfs/x/1.jpg for 70 s"
    evaluating = [record(r, phase="evaluation", read=f"/nfs/val/{r}.jpg", read_since=NOW - 70,
                         blocked=2, **IN_DATA) for r in range(2)]   # evaluation's reads, too
    what, stuck = verdict(evaluating, 2, NOW, 60, 2)
    assert stuck == [0, 1] and what.startswith("the file system")
    assert "2 thread(s) in state D" in evaluating[0].doing(NOW)
    alone = record(0, phase="data", read="/nfs/x/9.jpg", read_since=NOW - 61, **IN_DATA)
    what, stuck = verdict([alone], 1, NOW, 60, 2)
    assert stuck == [0] and "file system" in what and "/nfs/x/9.jpg" in alone.doing(NOW)


def test_a_silent_rank_seen_in_state_d_on_this_host_is_named_so():
    what, stuck = verdict([record(0, **IN_BACKWARD), record(1, beat=30, **IN_DATA)], 2, NOW, 60,
                          2, states={1: "D"})
    assert stuck == [1] and "stopped, frozen or gone" in what and STATE_D in what


def test_no_verdict_while_any_rank_progresses():
    assert verdict([record(0), record(1, phase="compute", idle=5)], 2, NOW, 60, 2) is None
    assert verdict([record(0, idle=30), record(1, idle=30)], 2, NOW, 60, 2) is None


def test_the_stopped_rank_is_the_one_whose_records_stopped():
    what, stuck = verdict([record(0), record(1, phase="compute", beat=80), record(2)], 3, NOW,
                          60, 2)
    assert stuck == [1] and "stopped" in what
    what, stuck = verdict([record(0), record(2)], 3, NOW, 60, 2)    # rank 1 never published
    assert stuck == [1]


def test_a_rank_stuck_outside_the_collective_while_the_others_wait():
    for phase in ("evaluation", "checkpoint", "data", "compute"):
        what, stuck = verdict([record(0), record(1), record(2, phase=phase), record(3)], 4,
                              NOW, 60, 2)
        assert stuck == [2] and "wait for them" in what, phase


def test_every_rank_in_the_collective_names_no_single_rank():
    what, stuck = verdict([record(r) for r in range(4)], 4, NOW, 60, 2)
    assert stuck == [] and "network" in what


class Clock:
    """Wall time that moves only when the test moves it: the decisions run on it with no thread
    and no sleep (``Watchdog.check_once`` is one round of the thread)."""

    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_hung_single_process_dumps_its_stacks_and_exits(tmp_path):
    """A job of one (no store): its own record decides, at the timeout and not before. The exit
    is the injected one. 120 idle threads stand for a process with many (faulthandler alone
    lists 100, the newest): the main thread's stack is in the file all the same."""
    clock, exits = Clock(), []
    dog = Watchdog(60, 0, 1, tmp_path, interval=2, exit=exits.append, clock=clock)
    dog.progress(step=7, phase="data")
    clock.now += 59.9
    assert not dog.check_once() and exits == [] and not list(tmp_path.glob("hang_*"))
    done = threading.Event()
    crowd = [threading.Thread(target=done.wait, name="idle") for _ in range(120)]
    for t in crowd:
        t.start()
    try:
        clock.now += 0.2
        assert dog.check_once()
    finally:
        done.set()
    assert exits == [75]
    (stack,) = tmp_path.glob("hang_*_rank0.txt")
    text = stack.read_text()
    assert "step 7, phase data, no progress anywhere for 60 s" in text
    assert "most recent call first" in text
    main_thread = text.split("most recent call first")[0]
    assert "test_a_hung_single_process_dumps_its_stacks_and_exits" in main_thread


def test_a_progressing_process_is_left_alone(tmp_path):
    """Progress every 2 s for 200 s (past the 60 s timeout): no exit; then none for 60 s: the
    exit. A stopped watchdog ends nothing."""
    clock, exits = Clock(), []
    dog = Watchdog(60, 0, 1, tmp_path, interval=2, exit=exits.append, clock=clock)
    for step in range(100):
        clock.now += 2
        dog.progress(step=step, phase="compute")
        assert not dog.check_once()
    clock.now += 59.5
    assert not dog.check_once() and exits == [] and not list(tmp_path.glob("hang_*"))
    clock.now += 1
    assert dog.check_once() and exits == [75]
    stopped = Watchdog(60, 0, 1, tmp_path / "stopped", interval=2, exit=exits.append,
                       clock=clock)
    stopped.stop()
    clock.now += 61
    assert not stopped.check_once() and exits == [75]


def test_a_stopped_rank_is_named_through_the_store(tmp_path, caplog):
    """Two ranks publishing through a real torch.distributed store (one in memory): rank 1
    stops publishing mid-step while rank 0 waits for it in the all-reduce; at the timeout rank
    0 names rank 1 as stopped, in a table of both."""
    import logging
    import torch.distributed as dist
    store, clock, exits = dist.HashStore(), Clock(), []
    dogs = [Watchdog(60, rank, 2, tmp_path, store=store, interval=2, exit=exits.append,
                     clock=clock) for rank in range(2)]
    for step in range(5):
        clock.now += 2
        for dog in dogs:
            dog.progress(step=step, phase="compute")
            assert not dog.check_once()
    dogs[0].progress(phase=COLLECTIVE)            # rank 1 is stopped from here on
    clock.now += 59
    assert not dogs[0].check_once()
    clock.now += 2
    with caplog.at_level(logging.ERROR, logger="engine.watchdog"):
        assert dogs[0].check_once()
    assert exits == [75]
    assert "Stuck: rank 1 (" in caplog.text and "step 4, compute): no record" in caplog.text
    assert "stopped, frozen or gone" in caplog.text
    table_rows = [line.split() for line in caplog.text.splitlines()
                  if line.split()[:1] in (["0"], ["1"])]
    assert [(row[0], row[3], row[4]) for row in table_rows] == [
        ("0", "4", COLLECTIVE), ("1", "4", "compute")]


def test_the_thread_ends_a_hung_process(tmp_path):
    """The real thread on the real clock fires (no upper bound on when: CI is loaded)."""
    exits = []
    dog = Watchdog(0.6, 0, 1, tmp_path, interval=0.1, exit=exits.append)
    dog.progress(step=3, phase="data")
    dog.start()
    deadline = time.time() + 60
    try:
        while not exits and time.time() < deadline:
            time.sleep(0.05)
    finally:
        dog.stop()                           # had it not fired: no thread left behind
    assert exits == [75]
    assert "step 3, phase data" in next(tmp_path.glob("hang_*_rank0.txt")).read_text()


def test_a_hang_exit_takes_the_processes_it_started_with_it(tmp_path):
    """The real exit, not an injected one: exit code 75, and the processes the hung one started
    (a child, and its child), as a DataLoader worker stuck in its start-up, are gone with it."""
    marker = f"{600 + os.getpid() % 1000 / 1000:.3f}"     # a sleep only this test starts
    script = f"""
import subprocess, sys, time
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from engine.watchdog import Watchdog
subprocess.Popen(["sleep", "{marker}"])
subprocess.Popen(["bash", "-c", "sleep {marker} & wait"])
time.sleep(0.5)
Watchdog(0.6, 0, 1, {str(tmp_path)!r}, interval=0.1).start().progress(step=3, phase="data")
time.sleep(60)
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=50, capture_output=True, text=True)
    assert proc.returncode == 75, proc.stderr[-2000:]
    deadline = time.time() + 10
    while time.time() < deadline and live_processes_mentioning(f"sleep {marker}"):
        time.sleep(0.1)
    assert not live_processes_mentioning(f"sleep {marker}")


def test_stragglers_are_compared_with_the_other_ranks():
    assert stragglers([0.1, 0.1, 0.1, 0.1], [0.01] * 4, 1.5) == []
    ((rank, times, why),) = stragglers([0.1, 0.25, 0.1, 0.1], [0.01] * 4, 1.5)
    assert rank == 1 and 2.2 < times < 2.4 and why == "computing"
    ((rank, times, why),) = stragglers([0.1, 0.1], [0.01, 0.2], 1.5)   # two ranks
    assert rank == 1 and why == "waiting for data"
    assert stragglers([0.1, 0.3], [0.0, 0.0], 0) == []                  # off


def test_step_times_measure_the_forward_and_the_data_wait():
    import torch
    net = torch.nn.Linear(4, 4)
    times = StepTimes(net, torch.device("cpu"))
    times.waiting()                         # what the step-times hook does around next(loader)
    time.sleep(0.02)
    times.arrived()
    slow = threading.Event()
    net.register_forward_hook(lambda *a: slow.wait(0.03), prepend=True)  # inside the timing
    net(torch.zeros(2, 4))
    net.eval()(torch.zeros(2, 4))           # evaluation is not a training step's forward
    data_wait, forward = times.take()
    assert 0.02 <= data_wait < 0.5 and 0.03 <= forward < 0.5
    assert times.take() == (0.0, 0.0)


class Counted:
    """A rank's store client that counts its requests and the bytes of keys and values sent and
    received (what the watchdog calls; anything else would fail its round)."""

    def __init__(self, store):
        self.store, self.requests, self.bytes = store, 0, 0

    def _count(self, *data) -> None:
        self.requests += 1
        self.bytes += sum(len(d) for d in data)

    def set(self, key, value):
        self._count(key, value)
        return self.store.set(key, value)

    def get(self, key):
        value = self.store.get(key)
        self._count(key, value)
        return value

    def compare_set(self, key, expected, desired):
        value = self.store.compare_set(key, expected, desired)
        self._count(key, expected, desired, value)
        return value

    def multi_get(self, keys):
        values = self.store.multi_get(keys)
        self._count(*keys, *values)
        return values

    def check(self, keys):
        self._count(*keys)
        return self.store.check(keys)

    def add(self, key, amount):
        self._count(key, b"12345678")
        return self.store.add(key, amount)


def traffic(world: int, tmp_path, rounds: int = 10) -> tuple[list[float], list[float]]:
    """``world`` watchdogs in this process on one real TCPStore, all progressing: (requests,
    bytes) per instance per interval, counted after a warm-up. They share one client connection
    (each its own counter): the 25th connection to a TCPStore from one process waits 5 s."""
    import torch.distributed as dist
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", master.port, is_master=False)
    clients = [Counted(dist.PrefixStore("wd", client)) for _ in range(world)]
    clock = Clock()
    dogs = [Watchdog(60, r, world, tmp_path, store=c, interval=2, exit=pytest.fail, clock=clock)
            for r, c in enumerate(clients)]

    def interval(step):
        clock.now += 2
        for dog in dogs:
            dog.progress(step=step, phase="compute")
            assert not dog.check_once()

    for step in range(3):
        interval(step)
    for c in clients:
        c.requests = c.bytes = 0
    for step in range(3, 3 + rounds):
        interval(step)
    return [c.requests / rounds for c in clients], [c.bytes / rounds for c in clients]


def test_store_traffic_per_rank_and_interval_is_constant_in_the_world_size(tmp_path):
    """32 watchdogs on one real TCPStore (one process, 32 clients): per interval every rank
    makes 2 requests (its record's set, the heartbeat's get) of a few hundred bytes; the
    reporter (rank 0) 3 (its set, one multi_get of all records, the heartbeat's compare_set),
    reading ~300 B per rank. The same at 8 ranks: nothing grows with W but the reporter's read.
    (Before: 2W - 1 requests per rank per interval.)"""
    figures = {w: traffic(w, tmp_path / str(w)) for w in (8, 32)}
    for w, (requests, sizes) in figures.items():
        assert requests == [3.0] + [2.0] * (w - 1), w
        print(f"W={w}: reporter {requests[0]:.0f} requests {sizes[0]:.0f} B, others "
              f"{requests[1]:.0f} requests {max(sizes[1:]):.0f} B per interval")
    others = {w: max(sizes[1:]) for w, (_, sizes) in figures.items()}
    assert others[32] <= others[8] * 1.05 and others[32] < 1000
    reporter = {w: sizes[0] for w, (_, sizes) in figures.items()}
    assert 31 * 150 < reporter[32] < 31 * 1000           # the records it reads, ~300 B each


def test_the_reporters_successor_takes_over_and_names_it(tmp_path, caplog):
    """Rank 0, the reporter, stops (its thread runs no more): its heartbeat stops moving, rank 1
    (its first successor) takes over after 3 intervals, and at the timeout names rank 0 as
    silent; rank 2 reads the verdict in the heartbeat and exits too."""
    import logging
    import torch.distributed as dist
    store, clock, exits = dist.HashStore(), Clock(), []
    dogs = [Watchdog(60, rank, 3, tmp_path, store=store, interval=2, exit=exits.append,
                     clock=clock, ack_wait_s=0) for rank in range(3)]
    for step in range(3):
        clock.now += 2
        for dog in dogs:
            dog.progress(step=step, phase="compute")
            assert not dog.check_once()
    assert [d.reporting for d in dogs] == [True, False, False]
    with caplog.at_level(logging.WARNING, logger="engine.watchdog"):
        for _ in range(29):                  # 58 s: rank 0 stopped, the others wait for it
            clock.now += 2
            assert not dogs[1].check_once() and not dogs[2].check_once()
        assert [d.reporting for d in dogs] == [True, True, False]
        assert "rank 1 reports from now on" in caplog.text
        clock.now += 4
        assert dogs[1].check_once() and exits == [75]
        assert dogs[2].check_once() and exits == [75, 75]
    assert "Stuck: rank 0 (" in caplog.text and "stopped, frozen or gone" in caplog.text
    assert "HANG (found by rank 1: rank 0 (" in caplog.text
    assert len(list(tmp_path.glob("hang_*_rank*.txt"))) == 2


def test_the_exit_cannot_block_on_a_report_that_never_finishes(tmp_path):
    """The real exit, in a process of its own: its stack file's write blocks forever (a FIFO
    nobody reads, in place of a hung file system) and so does train.log's handler (another such
    FIFO). The deadline armed before any I/O ends the process with code 75 all the same."""
    fifo_dir = tmp_path / "fifos"
    script = f"""
import logging, os, sys, time
sys.path.insert(0, {str(REPO)!r})
from engine import watchdog
os.makedirs({str(fifo_dir)!r})
for name in ("log", "stacks"):
    os.mkfifo(os.path.join({str(fifo_dir)!r}, name))
logging.getLogger().addHandler(logging.FileHandler({str(fifo_dir / "log")!r}, delay=True))

def blocked(f):   # the stack file's write: it never returns
    open({str(fifo_dir / "stacks")!r}, "w")

watchdog.write_stacks = blocked
watchdog.Watchdog(0.6, 0, 1, {str(tmp_path)!r}, interval=0.1,
                  exit_deadline_s=2).start().progress(step=3, phase="data")
time.sleep(120)
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True,
                          text=True)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "exit deadline (2 s) passed; exiting with code 75" in proc.stderr


PASSES_SEEN = [("forward", 1, 0, 0, 0), ("backward", 1, 1, 1, 0), ("forward", 2, 1, 1, 1),
               ("backward", 2, 2, 2, 1)]


def passes_seen(engine, net):
    """(where, forwards, forwards_done, backwards, backwards_done) as read from inside each
    forward and backward of one step of two micro-batches."""
    import torch
    at, seen = engine.position, []
    net.register_forward_hook(lambda *a: seen.append(
        ("forward", at.forwards, at.forwards_done, at.backwards, at.backwards_done)))
    net[1].weight.register_hook(lambda g: seen.append(
        ("backward", at.forwards, at.forwards_done, at.backwards, at.backwards_done)))
    batch = (torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))
    engine.train_step(iter([batch, batch]), torch.nn.functional.cross_entropy)
    return seen, (at.forwards, at.forwards_done, at.backwards, at.backwards_done)


ENGINE_ARGS = ["train.grad_accum=2", "train.batch_size=8", "train.amp=off", "train.compile=off"]


def test_the_ddp_engine_counts_its_passes_where_they_happen():
    """The pass counters the watchdog publishes, read from inside the forward and the backward
    of a real DDPEngine step (one process, grad_accum 2): + while in a pass, equal after."""
    import torch
    from engine.config import load_config
    from engine.distributed import DistInfo
    from engine.engines import build_engine
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    engine = build_engine(load_config("configs/quickstart.yaml", ENGINE_ARGS), net, DistInfo())
    assert passes_seen(engine, net) == (PASSES_SEEN, (2, 2, 2, 2))


def test_the_deepspeed_engine_counts_its_passes_alike():
    """The same counters from a DeepSpeed step (its own process: DeepSpeed keeps process-wide
    state; ~8 s, most of it DeepSpeed's import): backward ends after DeepSpeed's step."""
    script = f"""
import sys, torch
sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
from engine.config import load_config
from engine.distributed import init_distributed
from engine.engines import build_engine
from test_watchdog import ENGINE_ARGS, passes_seen
cfg = load_config("configs/quickstart.yaml", ["engine.name=deepspeed", *ENGINE_ARGS])
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
print(repr(passes_seen(build_engine(cfg, net, init_distributed("gloo", True)), net)))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == repr((PASSES_SEEN, (2, 2, 2, 2)))
