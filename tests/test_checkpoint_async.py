"""Checkpoints written in the background (engine/checkpoint_writer.py, run.async_checkpoint):
the loop steps while a save is in flight, what is written is the state at the save's step, a
stop waits for the save in flight and leaves complete checkpoints a run resumes from exactly,
a failed write is raised in the loop, and one save is in flight at most.

The loop here is the real one with the real DDP engine (one process) and checkpoint hook, on a
tiny linear model fed fixed batches; the writer is held on its test gate, so what is asserted is
the order of events, never a duration."""
from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
import torch.nn as nn

from engine import checkpoint as ckpt
from engine.checkpoint_writer import CheckpointWriteFailed, CheckpointWriter
from engine.config import Config
from engine.ddp import DDPEngine
from engine.distributed import DistInfo
from engine.hooks import CheckpointHook, Hook, StopHook
from engine.schedule import Schedule
from engine.trainer import Loaders, Trainer
from trainer_utils import ListLoader, batches, isolated

pytestmark = pytest.mark.timeout(120)   # a writer that never lets go fails, not hangs CI


def make_trainer(out, hooks=(), *, background=True, every=4, keep=100, epochs=2,
                 steps_per_epoch=8, check_every=2):
    """The loop over 2 epochs of 8 steps, SGD with momentum (state to save), checkpoints every
    ``every`` steps; ``hooks`` run before the checkpoint hook."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    cfg = Config()
    cfg.optim.momentum, cfg.optim.lr = 0.9, 0.1
    engine = DDPEngine(cfg, model, DistInfo())
    saver = CheckpointHook(out, engine, every=every, keep=keep, background=background)
    schedule = Schedule(epochs=epochs, steps_per_epoch=steps_per_epoch, base_lr=0.1)
    return Trainer(model, engine, Loaders(ListLoader(batches(steps_per_epoch))), schedule,
                   [*hooks, saver], loss_fn=nn.CrossEntropyLoss(), check_every=check_every)


def writer_of(trainer) -> CheckpointWriter:
    return trainer.hooks.of_type(CheckpointHook).writer


def step_file(out, step: int):
    return out / "checkpoints" / f"step_{step:08d}.pt"


def saved_names(out) -> list[str]:
    """The checkpoint files under ``out``, newest first."""
    return sorted((p.name for p in (out / "checkpoints").glob("step_*.pt")), reverse=True)


class HeldWriter(Hook):
    """Holds the writer's first save on the gate for ``steps`` steps after it was handed over,
    noting at each of them whether its file is there yet; then lets it go."""

    def __init__(self, steps: int):
        self.steps, self.gate = steps, threading.Event()
        self.seen: list[tuple[int, bool]] = []   # (step, first save's file exists) while held

    def before_train(self):
        self.writer = writer_of(self.trainer)
        self.writer.gate = self.gate

    def after_step(self):
        if self.gate.is_set() or self.writer.thread is None:
            return
        self.seen.append((self.trainer.state.step, step_file(self.trainer.hooks.of_type(
            CheckpointHook).out, 4).exists()))
        if len(self.seen) == self.steps:
            self.gate.set()


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------- 1. the loop steps on
def test_the_loop_steps_while_a_save_is_in_flight_and_writes_what_a_synchronous_save_does(
        tmp_path):
    held = HeldWriter(steps=3)
    trainer = make_trainer(tmp_path / "async", [held])
    assert trainer.train() == "finished"
    # the step-4 save was handed over, then steps 5-7 ran while its file was not written
    assert held.seen == [(5, False), (6, False), (7, False)]
    sync = make_trainer(tmp_path / "sync", background=False)
    assert sync.train() == "finished"
    names = saved_names(tmp_path / "sync")
    assert names == saved_names(tmp_path / "async")
    assert names == ["step_00000016.pt", "step_00000012.pt", "step_00000008.pt",
                     "step_00000004.pt"]
    for name in names:   # (2 in the loop) each holds the state of its own step, bit for bit
        ckpt.verify(tmp_path / "async" / "checkpoints" / name)
        assert tensors_equal(ckpt.load_file(tmp_path / "sync" / "checkpoints" / name),
                             ckpt.load_file(tmp_path / "async" / "checkpoints" / name)), name
    assert writer_of(trainer).thread is None          # joined at the run's end


# ---------------------------------------------------------------- 2. a copy is written
def test_what_is_written_is_a_copy_taken_at_submit(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "history": [{"epoch": 1}]}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in optimizer.state.values()]
    gate = threading.Event()
    writer = CheckpointWriter(gate=gate)
    path = tmp_path / "step_00000001.pt"
    writer.submit(state, str(path))
    with torch.no_grad():                      # what the next steps do, in place
        for tensor in [*model.state_dict().values(),
                       *(s["momentum_buffer"] for s in optimizer.state.values())]:
            tensor.add_(1)
    state["history"].append({"epoch": 2})
    gate.set()
    writer.wait()
    ckpt.verify(path)
    saved = ckpt.load_file(path)
    assert tensors_equal(saved["model"], expected)
    assert tensors_equal([s["momentum_buffer"] for s in saved["optimizer"]["state"].values()],
                         momentum)
    assert saved["history"] == [{"epoch": 1}]
    assert saved["model"]["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert saved["model"]._metadata == model.state_dict()._metadata   # as torch.save keeps it


# ---------------------------------------------------------------- 3. a stop during a save
def hold_each_save_until_waited(writer: CheckpointWriter) -> None:
    """Each write is held on the gate until the loop waits for it (at the next save or the
    run's end): what a slow disk or upload does, without a clock."""
    gate, wait = threading.Event(), writer.wait
    writer.gate = gate

    def wait_then_hold_again():
        if writer.thread is not None:
            gate.set()
        wait()
        gate.clear()

    writer.wait = wait_then_hold_again


class SignalDuringSave(Hook):
    """SIGTERM at step 5 while the step-4 save is in flight; notes whether it still is when
    the stop is decided (the check of step 6), and what a hook before the checkpoint hook
    finds at the run's end (the metrics hook lists the final checkpoint's checksum there)."""

    def __init__(self, out):
        self.out = out
        self.in_flight_at_stop = self.newest_at_after_train = None

    def after_step(self):
        if self.trainer.state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    def after_check(self, check):
        if self.trainer.stop_reason is not None:
            self.in_flight_at_stop = (writer_of(self.trainer).in_flight()
                                      and not step_file(self.out, 4).exists())

    def after_train(self):
        self.newest_at_after_train = saved_names(self.out)[0]


def test_a_sigterm_during_a_save_leaves_complete_checkpoints_and_the_resume_is_exact(tmp_path):
    out = tmp_path / "run"
    with isolated():
        probe = SignalDuringSave(out)
        preempted = make_trainer(out, [StopHook(out), probe])
        hold_each_save_until_waited(writer_of(preempted))
        assert preempted.train() == "preempted" and preempted.state.step == 6
    assert probe.in_flight_at_stop is True
    assert probe.newest_at_after_train == "step_00000006.pt"   # complete before hooks end
    assert saved_names(out) == ["step_00000006.pt", "step_00000004.pt"]
    for name in saved_names(out):
        ckpt.verify(out / "checkpoints" / name)
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp" in p.name]
    resumed = make_trainer(out)
    assert resumed.train() == "finished"
    whole = make_trainer(tmp_path / "whole")
    assert whole.train() == "finished"
    assert resumed.state.history == whole.state.history
    assert tensors_equal(ckpt.load_file(step_file(out, 16)),
                         ckpt.load_file(step_file(tmp_path / "whole", 16)))


# ---------------------------------------------------------------- 4. a failed write
def failing_first_write(writer: CheckpointWriter):
    written = writer.write

    def write(state, location, checksum):
        if not getattr(write, "failed", False):
            write.failed = True
            raise OSError(28, "No space left on device")
        written(state, location, checksum=checksum)
    writer.write = write


def test_a_write_that_failed_in_the_background_is_raised_at_the_next_save(tmp_path):
    trainer = make_trainer(tmp_path)
    failing_first_write(writer_of(trainer))
    with pytest.raises(CheckpointWriteFailed, match=r"step_00000004\.pt.*No space left"):
        trainer.train()
    assert trainer.state.step == 8          # raised at the next save, not lost
    assert trainer.status is None
    assert not step_file(tmp_path, 4).exists()


def test_a_last_save_that_failed_is_raised_at_the_runs_end(tmp_path):
    trainer = make_trainer(tmp_path, every=0, epochs=1)     # one save: the epoch's end
    failing_first_write(writer_of(trainer))
    with pytest.raises(CheckpointWriteFailed, match=r"step_00000008\.pt"):
        trainer.train()
    assert trainer.status is None and saved_names(tmp_path) == []


# ---------------------------------------------------------------- 5. one in flight
def test_a_save_waits_for_the_one_in_flight_and_pruning_follows_completion(tmp_path):
    """Each save is held until the loop waits for it (the next save, or the run's end): the
    host copy of the next one is taken only once it is complete. keep=2: each save prunes
    after it is complete, in the writer."""
    copies = []
    trainer = make_trainer(tmp_path, keep=2)
    writer = writer_of(trainer)
    hold_each_save_until_waited(writer)
    host_copy = writer.host_copy

    def noting_copy(state):
        copies.append((trainer.state.step, writer.in_flight(), saved_names(tmp_path)))
        return host_copy(state)

    writer.host_copy = noting_copy
    assert trainer.train() == "finished"
    assert copies == [(4, False, []),
                      (8, False, ["step_00000004.pt"]),
                      (12, False, ["step_00000008.pt", "step_00000004.pt"]),
                      (16, False, ["step_00000012.pt", "step_00000008.pt"])]
    assert saved_names(tmp_path) == ["step_00000016.pt", "step_00000012.pt"]
