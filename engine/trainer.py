"""The training loop and nothing else (detectron2's ``SimpleTrainer``): epochs of optimizer steps,
each of ``grad_accum`` micro-batches through the engine, with hooks around them
(``engine/hooks/base.py`` says when each is called). What a run does besides stepping
(checkpoints, evaluation, EMA, metrics, the watchdog, signals, the quarantine, the progress bar)
is a hook in ``engine/hooks/``; what a run is made of is built by ``engine/build.py``.

No host sync of ours per step: a step's loss stays on the device, summed with the steps before
it. The ranks compare notes only at a check: one all-reduce of the summed loss, of each rank's
first non-finite loss and of what the hooks reduce (the stop flag, step times), then one read of
it on the host. A non-finite loss found there stops the run (``TrainingDiverged``) before
anything of the steps after the previous check is saved, since checkpoints are written at checks
only. (DALI's ResNet-50 example and torchtitan also read their figures only when they log.)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .checkpoint import ResumeMismatch
from .distributed import DistInfo, all_reduce_sum
from .errors import TrainingDiverged
from .hooks.base import COLLECTIVE, COMPUTE, DATA, Check, Hook, HookList, PerRank
from .schedule import Schedule
from .state import TrainState, gather_rng_states, seed_process, set_rng_state

log = logging.getLogger("wrn_large.train")
# 2: the loop with hooks (each stateful hook's state under its name). 1: written before, no
# "format" key; its keys are a subset of 2's, so it loads as it is
CHECKPOINT_FORMAT = 2
# fp16 loss scaling skips a step whose gradients overflow; this many in a row is divergence (a
# lower scale cannot mend an overflowing forward pass)
MAX_SKIPPED_IN_A_ROW = 10
TRAIN_STATE_KEYS = ("step", "epoch", "epoch_loss_sum", "epoch_loss_count", "history")
RESERVED_KEYS = {"format", "model", "optimizer", "scaler", "rng", *TRAIN_STATE_KEYS}


@dataclass
class Loaders:
    """What the run reads: ``Loader``s (pipelines.base) of the train and validation splits."""

    train: Any
    val: Any = None


class Window:
    """The steps since the last check, summed on the loss's device (no host sync): the sum of
    the finite losses, their count, and the first step whose loss was non-finite without fp16
    loss scaling skipping it (0: none) with that loss."""

    def __init__(self):
        self.steps = self.skipped = 0
        self.sums: torch.Tensor | None = None      # (loss sum, finite steps)
        self.bad: torch.Tensor | None = None       # (first bad step, its loss)
        self.t0 = time.time()

    def add(self, loss: torch.Tensor, step: int, skipped: bool) -> None:
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        if self.sums is None:
            self.sums = torch.zeros(2, dtype=torch.float64, device=loss.device)
            self.bad = torch.zeros(2, dtype=torch.float64, device=loss.device)
        self.sums += torch.stack([torch.where(finite, loss, 0.0), finite.to(torch.float64)])
        if not skipped:
            first = (self.bad[0] == 0) & ~finite
            self.bad = torch.stack([torch.where(first, float(step), self.bad[0]),
                                    torch.where(first, loss, self.bad[1])])
        self.steps += 1
        self.skipped += int(skipped)

    def reduce(self, dist: DistInfo, figures: dict) -> tuple[list, list, dict]:
        """One all-reduce over ranks and one read on the host: ((loss sum, finite steps),
        [(step, loss)] of each rank's first bad step, the hooks' figures summed (``PerRank``:
        a list by rank))."""
        world, rank = dist.world_size, dist.rank
        bad = torch.zeros(2, world, dtype=torch.float64, device=self.sums.device)
        bad[:, rank] = self.bad
        host, layout = [], []
        for name, value in figures.items():
            if isinstance(value, PerRank):
                slots = [0.0] * world
                slots[rank] = float(value.value)
                host += slots
                layout.append((name, world))
            else:
                host.append(float(value))
                layout.append((name, None))
        packed = torch.cat([self.sums, bad.flatten(),
                            torch.tensor(host, dtype=torch.float64).to(self.sums.device)])
        all_reduce_sum(packed)
        values = packed.tolist()                    # the check's one wait for the device
        sums, steps, losses = values[:2], values[2:2 + world], values[2 + world:2 + 2 * world]
        bad_steps = [(int(s), v) for s, v in zip(steps, losses) if s > 0]
        at, reduced = 2 + 2 * world, {}
        for name, width in layout:
            reduced[name] = values[at:at + width] if width else values[at]
            at += width or 1
        return sums, bad_steps, reduced


class Trainer:
    """``train()`` runs ``schedule`` over ``loaders.train`` with ``engine`` (which owns the wrapped
    model, optimizer and precision of ``model``), calling ``hooks`` in their order."""

    reserved_keys = RESERVED_KEYS   # the checkpoint keys that are the loop's own

    def __init__(self, model: nn.Module, engine, loaders: Loaders, schedule: Schedule,
                 hooks: Iterable[Hook] = (), *, loss_fn: Callable,
                 batch_transform: Callable | None = None, dist: DistInfo = DistInfo(),
                 check_every: int = 20, seed: int | None = None):
        self.model, self.engine, self.loaders, self.schedule = model, engine, loaders, schedule
        self.loss_fn, self.batch_transform = loss_fn, batch_transform
        self.dist, self.check_every, self.seed = dist, check_every, seed
        self.state = TrainState()
        self.hooks = HookList(hooks, self)
        clash = {h.name for h in self.hooks} & RESERVED_KEYS
        if clash:
            raise ValueError(f"hook state name(s) {sorted(clash)} are the trainer's own")
        self.lr = schedule.lr(0)
        self.window = Window()
        self.skipped_in_a_row = 0
        self.stop_reason: str | None = None
        self.status: str | None = None   # finished | preempted | max_steps, once train() ends
        self.failed_at: float | None = None     # when train() saw the error that ended it

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        if self.seed is not None:
            seed_process(self.seed, self.dist.rank)
        try:
            self.hooks.call("before_train")
            if self.schedule.max_steps and self.state.step >= self.schedule.max_steps:
                self.stop_reason = "max_steps"
            while self.state.epoch < self.schedule.epochs and self.stop_reason is None:
                self.train_epoch()
            self.status = self.stop_reason or "finished"
        except BaseException:
            self.failed_at = time.time()
            for failure in self.hooks.call_each("after_train"):   # the run's error says why
                log.error("after a failed run, a hook failed too: %r", failure)
            raise
        failures = self.hooks.call_each("after_train")
        for failure in failures[1:]:
            log.error("a hook failed after the run, besides the first failure: %r", failure)
        if failures:
            raise failures[0]
        return self.status

    def train_epoch(self) -> None:
        st, schedule = self.state, self.schedule
        done = st.step - st.epoch * schedule.steps_per_epoch
        self.loaders.train.set_epoch(st.epoch, done * schedule.grad_accum)
        batches = iter(self.loaders.train)
        try:
            self.model.train()
            self.window = Window()
            self.hooks.call("before_epoch")
            for _ in range(done, schedule.steps_per_epoch):
                self.run_step(batches)
                if self.stop_reason is not None:
                    return
        finally:   # the epoch's loader ends now (its DataLoader workers), not when collected
            getattr(batches, "close", lambda: None)()
        self.end_epoch()

    def run_step(self, batches) -> None:
        st, schedule = self.state, self.schedule
        self.lr = schedule.lr(st.step)
        self.engine.set_lr(self.lr)
        if schedule.clears_optimizer(st.step):
            self.engine.clear_optimizer_state()
            log.info("lr drop to %g at step %d: fresh optimizer state", self.lr, st.step)
        self.hooks.call("before_step")
        loss = self.engine.train_step(self.micro_batches(batches), self.loss_fn)
        skipped = self.engine.step_was_skipped()   # host-side, except fp16's own scaler read
        st.step += 1
        self.window.add(loss, st.step, skipped)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.hooks.call("after_step")
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise TrainingDiverged(self.diverged(
                f"{loss.item()}, and fp16 loss scaling skipped the step for "
                f"{self.skipped_in_a_row} steps in a row (non-finite gradients)", st.step))
        if self.check_due():
            self.check()

    def micro_batches(self, batches):
        for _ in range(self.schedule.grad_accum):
            self.phase(DATA)
            batch = next(batches)
            self.phase(COMPUTE)
            yield self.batch_transform(batch) if self.batch_transform else batch

    def phase(self, name: str) -> None:
        """Tell the hooks where this rank is (``hooks.base``'s phase names)."""
        self.hooks.call("on_phase", name)

    def check_due(self) -> bool:
        step, schedule = self.state.step, self.schedule
        return (step % self.check_every == 0 or step % schedule.steps_per_epoch == 0
                or bool(schedule.max_steps and step >= schedule.max_steps)
                or self.hooks.wants_check(step))

    def check(self) -> Check:
        """Reduce the window over ranks; stop on a non-finite loss; hand the figures to the
        hooks (``after_check``)."""
        st, world = self.state, self.dist.world_size
        self.phase(COLLECTIVE)
        window, self.window = self.window, Window()
        (loss_sum, finite), bad, reduced = window.reduce(self.dist, self.hooks.to_reduce())
        if bad:
            step, value = min(bad)
            raise TrainingDiverged(self.diverged(value, step))
        st.epoch_loss_sum += loss_sum / world
        st.epoch_loss_count += finite / world
        check = Check(step=st.step, epoch=st.epoch, lr=self.lr, steps=window.steps,
                      seconds=time.time() - window.t0,
                      loss=loss_sum / finite if finite else None, reduced=reduced)
        check.metrics.update(epoch=st.epoch, loss=check.loss, lr=self.lr)
        if window.skipped:
            check.metrics["skipped"] = window.skipped
            log.warning("%d of the last %d steps skipped by fp16 loss scaling (non-finite "
                        "gradients; weights unchanged by them)", window.skipped, window.steps)
        if self.schedule.max_steps and st.step >= self.schedule.max_steps:
            self.request_stop("max_steps")
        self.hooks.call("after_check", check)
        return check

    def end_epoch(self) -> None:
        """Count the epoch and its record (history[-1], which ``after_epoch`` hooks complete)."""
        st = self.state
        st.history.append({"epoch": st.epoch + 1,
                           "train_loss": st.epoch_loss_sum / max(st.epoch_loss_count, 1),
                           "lr": self.schedule.lr(st.step - 1)})
        st.epoch += 1
        st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0
        self.hooks.call("after_epoch")

    def request_stop(self, reason: str) -> None:
        """End the run after this check (a hook's or the schedule's decision, the same on every
        rank); the checkpoint hook saves first."""
        self.stop_reason = self.stop_reason or reason

    def diverged(self, value, step: int) -> str:
        return (f"training loss is {value} at step {step} (epoch {self.state.epoch}); stopped "
                f"without saving anything of the steps since the last check. Lower optim.lr, "
                f"check the data, or use train.amp=off / optim.clip_grad_norm=1.0.")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The loop's state, every rank's RNG streams and each stateful hook's state (call on
        every rank: the RNG streams and some hooks' states are gathered)."""
        state = {"format": CHECKPOINT_FORMAT, **self.state.as_dict(), "rng": gather_rng_states()}
        for hook in self.hooks:
            if hook.name:
                value = hook.state_dict()
                if value is not None:
                    state[hook.name] = value
        return state

    def load_state_dict(self, state: dict) -> None:
        version = state.get("format", 1)
        if version > CHECKPOINT_FORMAT:
            raise ResumeMismatch(f"checkpoint format {version} is newer than this code reads "
                                 f"({CHECKPOINT_FORMAT}): resume it with the code that wrote it")
        for key in TRAIN_STATE_KEYS:
            setattr(self.state, key, state[key])
        for hook in self.hooks:
            if hook.name:
                hook.load_state_dict(state.get(hook.name))
        self.restore_rng_streams(state.get("rng") or [])

    def restore_rng_streams(self, saved: list[dict]) -> None:
        """The rule for the RNG streams (dropout, mixup) of a job resumed at another world size
        (engine/membership.py): rank r continues the stream rank r saved; a rank the saving job
        did not have starts one seeded from (seed, rank, step); departed ranks' streams end."""
        rank, world = self.dist.rank, self.dist.world_size
        if rank < len(saved):
            set_rng_state(saved[rank])
        elif self.seed is not None:
            seed_process(self.seed, rank, step=self.state.step)
        if saved and len(saved) != world and self.dist.is_main:
            log.info("RNG streams: the checkpoint has %d ranks', this job %d ranks: ranks 0-%d "
                     "continue theirs%s%s", len(saved), world, min(len(saved), world) - 1,
                     f", ranks {len(saved)}-{world - 1} start new ones (seed, rank, step "
                     f"{self.state.step})" if world > len(saved) else "",
                     f", the streams of ranks {world}-{len(saved) - 1} end" if len(saved) > world
                     else "")
