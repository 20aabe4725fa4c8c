"""The loop alone (engine/trainer.py), in this process: a fake engine over an nn.Linear, a list
of batches, and hooks that record what they are called with. Then the real hooks as
engine/build.py assembles them: host syncs per step, the stop flag's latency, a NaN found at a
check."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from engine.checkpoint import load_file, save_file_atomic
from engine.engines import Engine
from engine.errors import TrainingDiverged
from engine.hooks import CheckpointHook, Hook
from engine.schedule import Schedule
from engine.trainer import Loaders, Trainer
from trainer_utils import ListLoader, batches

pytestmark = pytest.mark.timeout(300)


class FakeEngine(Engine):
    """What the loop needs of an engine: SGD on the model, losses it can be told to make
    non-finite, steps it can be told fp16 scaling skipped, checkpoints as plain files."""

    checkpoint_suffix = ".pt"

    def __init__(self, model, bad_steps=(), skipped_steps=()):
        self.module, self.device, self.amp_dtype = model, torch.device("cpu"), None
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.bad_steps, self.skipped_steps = set(bad_steps), set(skipped_steps)
        self.steps = 0

    def train_step(self, micro_batches, loss_fn):
        self.steps += 1
        total = torch.zeros(())
        batches = list(micro_batches)
        for x, y in batches:
            loss = loss_fn(self.module(x), y)
            if self.steps in self.bad_steps:
                loss = loss * float("nan")
            (loss / len(batches)).backward()
            total += loss.detach()
        if self.steps not in self.skipped_steps:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batches)

    def step_was_skipped(self):
        return self.steps in self.skipped_steps

    def save_checkpoint(self, path, client_state):
        save_file_atomic({"model": self.module.state_dict(),
                          "optimizer": self.optimizer.state_dict(), **client_state}, path)

    def load_checkpoint(self, path):
        state = load_file(path)
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state


class Recorder(Hook):
    """Every call, as (hook label, event, step)."""

    def __init__(self, label, calls):
        self.label, self.calls = label, calls

    def note(self, event, *extra):
        self.calls.append((self.label, event, self.trainer.state.step, *extra))

    def before_train(self):
        self.note("before_train")

    def before_epoch(self):
        self.note("before_epoch")

    def before_step(self):
        self.note("before_step")

    def on_phase(self, phase):
        self.note(phase)

    def after_step(self):
        self.note("after_step")

    def after_check(self, check):
        self.note("after_check", check.steps)

    def after_epoch(self):
        self.note("after_epoch")

    def after_train(self):
        self.note("after_train", self.trainer.status)


class StepCounter(Hook):
    """A hook with state: the steps it has seen, across restarts."""

    name = "counter"

    def __init__(self):
        self.seen = 0

    def after_step(self):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"] if state else 0


def make_trainer(hooks, *, steps_per_epoch=3, epochs=2, grad_accum=1, check_every=2,
                 engine_kwargs=None, max_steps=0):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    engine = FakeEngine(model, **(engine_kwargs or {}))
    loader = ListLoader(batches(steps_per_epoch * grad_accum))
    schedule = Schedule(epochs=epochs, steps_per_epoch=steps_per_epoch, base_lr=0.1,
                        grad_accum=grad_accum, max_steps=max_steps)
    return Trainer(model, engine, Loaders(loader), schedule, hooks,
                   loss_fn=nn.CrossEntropyLoss(), check_every=check_every)


def test_hooks_are_called_in_their_order_at_each_point_of_the_loop():
    calls = []
    trainer = make_trainer([Recorder("a", calls), Recorder("b", calls)], grad_accum=2)
    assert trainer.train() == "finished"
    a = [c[1:] for c in calls if c[0] == "a"]
    step = lambda s: [("before_step", s), ("data", s), ("compute", s), ("data", s),  # noqa: E731
                      ("compute", s), ("after_step", s + 1)]
    check = lambda s, n: [("all-reduce", s), ("after_check", s, n)]  # noqa: E731
    expected = ([("before_train", 0), ("before_epoch", 0)] + step(0) + step(1) + check(2, 2)
                + step(2) + check(3, 1) + [("after_epoch", 3), ("before_epoch", 3)]
                + step(3) + check(4, 1) + step(4) + step(5) + check(6, 2)
                + [("after_epoch", 6), ("after_train", 6, "finished")])
    assert a == expected
    # each call goes to a, then to b, before the loop moves on
    assert [c[1:] for c in calls[1::2]] == expected and {c[0] for c in calls[1::2]} == {"b"}
    assert [h["epoch"] for h in trainer.state.history] == [1, 2]


def test_after_train_runs_when_the_run_fails():
    calls = []
    trainer = make_trainer([Recorder("a", calls)], engine_kwargs={"bad_steps": {2}})
    with pytest.raises(TrainingDiverged, match="training loss is nan at step 2 "):
        trainer.train()
    assert calls[-1][1:] == ("after_train", 2, None)     # no status: it did not end well


def test_hooks_state_and_the_loops_go_through_a_checkpoint(tmp_path):
    first = make_trainer([StepCounter(), CheckpointHook(tmp_path, None, every=2)],
                         max_steps=4, check_every=100)
    first.hooks.of_type(CheckpointHook).engine = first.engine
    assert first.train() == "max_steps"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == \
        ["step_00000002.pt", "step_00000003.pt", "step_00000004.pt"]   # every 2, epoch end, stop
    counter = StepCounter()
    second = make_trainer([counter, CheckpointHook(tmp_path, None)], check_every=100)
    second.hooks.of_type(CheckpointHook).engine = second.engine
    assert second.train() == "finished"
    assert counter.seen == 6                          # 4 before the restart, 2 after
    assert second.state.step == 6 and [h["epoch"] for h in second.state.history] == [1, 2]
    saved = load_file(tmp_path / "checkpoints" / "step_00000006.pt")
    assert saved["format"] == 2 and saved["counter"] == {"seen": 6}
    # the loss of epoch 2 sums steps 4-6 across the restart: the same as without one
    again = make_trainer([], check_every=100)
    again.train()
    assert second.state.history == again.state.history


def test_an_epoch_ended_by_a_resume_is_saved_again(tmp_path):
    """A run stopped at an epoch's last step (run.max_steps here, a signal alike) saves before
    the epoch is counted; resumed, it counts and evaluates the epoch: that is saved over it, so
    a later resume does not do it again."""
    first = make_trainer([CheckpointHook(tmp_path, None)], max_steps=3, check_every=100)
    first.hooks.of_type(CheckpointHook).engine = first.engine
    assert first.train() == "max_steps"
    path = tmp_path / "checkpoints" / "step_00000003.pt"
    assert (load_file(path)["epoch"], load_file(path)["history"]) == (0, [])
    calls = []
    second = make_trainer([CheckpointHook(tmp_path, None), Recorder("r", calls)], epochs=1)
    second.hooks.of_type(CheckpointHook).engine = second.engine
    assert second.train() == "finished"
    assert [c[1] for c in calls].count("before_step") == 0        # only the epoch's end
    saved = load_file(path)
    assert saved["epoch"] == 1 and [h["epoch"] for h in saved["history"]] == [1]


def test_fp16_skips_are_counted_and_ten_in_a_row_is_divergence():
    trainer = make_trainer([], epochs=5, engine_kwargs={"skipped_steps": {2}}, check_every=1)
    seen = []
    trainer.hooks.call = _spy(trainer.hooks.call, seen)
    trainer.train()
    skipped = {c.step: c.metrics.get("skipped") for c in seen}
    assert skipped[2] == 1 and all(not v for s, v in skipped.items() if s != 2)
    trainer = make_trainer([], epochs=5, engine_kwargs={"skipped_steps": set(range(3, 20))})
    with pytest.raises(TrainingDiverged, match="for 10 steps in a row"):
        trainer.train()
    assert trainer.state.step == 12


def _spy(call, seen):
    def spying(event, *args):
        if event == "after_check":
            seen.append(args[0])
        return call(event, *args)
    return spying


# ---------------------------------------------------------------- the real hooks, built
def tiny_config(tmp_path, **extra):
    """The synthetic backend: batches made on the device, no decoding."""
    values = {"model.name": "wrn_cifar", "model.kwargs": "{depth: 10, widen_factor: 1}",
              "data.backend": "synthetic", "data.synthetic_samples": 96, "data.image_size": 16,
              "data.num_classes": 3, "train.batch_size": 8, "train.epochs": 2,
              "train.ema_decay": 0.5, "optim.lr_batch": 8, "run.log_every_steps": 4,
              "run.output_dir": str(tmp_path / "run"), "run.progress": True}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class SyncProbe(Hook):
    """Host reads of tensors (``Tensor.item``, ``tolist``, ``bool()``...) per step: from one
    ``before_step`` to the next (everything the loop and its hooks do for a step: the lr, the
    data, the engine, the hooks, deciding whether to check), less those of the checks and of
    the epochs' ends (evaluation, checkpoints), which ``wrap`` counts apart."""

    def __init__(self, counter, per_step):
        self.counter, self.per_step, self.at = counter, per_step, None

    def wrap(self, trainer):
        for name in ("check", "end_epoch"):
            setattr(trainer, name, self.counted_apart(getattr(trainer, name)))

    def counted_apart(self, method):
        def counted():
            before = self.counter["n"]
            try:
                return method()
            finally:
                self.counter["apart"] += self.counter["n"] - before
        return counted

    def before_step(self):
        now = self.counter["n"] - self.counter["apart"]
        if self.at is not None:
            self.per_step.append(now - self.at)
        self.at = now


def count_syncs(monkeypatch) -> dict:
    counter = {"n": 0, "apart": 0}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def test_no_host_sync_of_ours_within_a_step(tmp_path, monkeypatch):
    """The real hooks (EMA, watchdog, step times, progress bar, metrics, checkpoints): 0 host
    reads from the start of a step to its end, whatever the step; the checks do read."""
    from trainer_utils import train_in_process
    counter, per_step = count_syncs(monkeypatch), []
    probe = SyncProbe(counter, per_step)

    def patch(trainer):
        probe.wrap(trainer)
        trainer.hooks.__init__([probe, *trainer.hooks], trainer)

    run = train_in_process(tiny_config(tmp_path, **{"run.checkpoint_every_steps": 3}), patch)
    assert run.summary["steps"] == 24 and len(per_step) == 23   # between 24 before_steps
    assert per_step == [0] * 23
    assert counter["apart"] > 0              # the checks, evaluation and checkpoints read


def test_a_signal_stops_the_run_at_the_next_check(tmp_path):
    """SIGTERM during step 5: the check at step 8 (run.log_every_steps=4) stops every rank, the
    checkpoint is written there, and the run says it was preempted."""
    from trainer_utils import train_in_process

    class Kill(Hook):
        def after_step(self):
            if self.trainer.state.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    run = train_in_process(tiny_config(tmp_path),
                           lambda t: t.hooks.__init__([Kill(), *t.hooks], t))
    assert run.summary["status"] == "preempted" and run.summary["steps"] == 8
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()
            if p.suffix == ".pt"] == ["step_00000008.pt"]
    assert "received signal 15" in run.log


def test_a_nan_found_at_a_check_saves_nothing_after_the_last_good_check(tmp_path):
    """A NaN loss at step 6 between checks every 4 steps (checkpoints every 4): the check at
    step 8 finds it; the newest checkpoint and the last metrics record are step 4's."""
    from trainer_utils import nan_loss_at, read_metrics, train_in_process
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="training loss is nan at step 6 .*The last good "
                                               "checkpoint is .*step_00000004.pt"):
        train_in_process(tiny_config(tmp_path, **{"run.checkpoint_every_steps": 4}),
                         nan_loss_at({6}))
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step_00000004.pt"]
    assert max(m["step"] for m in read_metrics(out)) == 4


def test_the_callers_config_is_left_as_it_was(tmp_path):
    """build_trainer works on a resolved copy: 'auto' stays 'auto' in the caller's config."""
    import copy
    from engine.build import build_trainer
    from engine.config import load_config
    from trainer_utils import isolated
    cfg = load_config("configs/quickstart.yaml", tiny_config(tmp_path))
    before = copy.deepcopy(cfg)
    with isolated():   # building sets determinism flags and starts a process group
        trainer = build_trainer(cfg)
        trainer.hooks.call("after_train")
    assert cfg == before and cfg.train.compile == "auto"
    saved = Path(cfg.run.output_dir) / "config.yaml"
    assert "compile: 'off'" in saved.read_text()      # the resolved copy is what is saved
