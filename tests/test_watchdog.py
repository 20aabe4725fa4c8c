"""The hang watchdog's and the straggler rule's decisions, on records as ranks publish them
(the real processes, signals and restarts are in test_fault_tolerance.py)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.step_times import StepTimes, stragglers
from engine.watchdog import COLLECTIVE, Record, Watchdog, verdict
from trainer_utils import live_processes_mentioning

NOW = 1_000_000.0


def record(rank, step=10, phase=COLLECTIVE, idle=100.0, beat=0.0):
    return Record(rank, f"node{rank // 4}", 1000 + rank, step, phase, NOW - idle, NOW - beat)


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
