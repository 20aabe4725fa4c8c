"""What a hook is: an object the loop calls at fixed points (detectron2's ``HookBase``).

The loop (``engine/trainer.py``) runs epochs of optimizer steps and calls, in the order the hooks
were given:

    before_train
      before_epoch
        before_step, on_phase("data"), on_phase("compute") per micro-batch, after_step
        ... and at a check (below): on_phase("all-reduce"), to_reduce, after_check(check)
      after_epoch             (the epoch is counted and its record is history[-1])
    after_train               (always, also when the run fails: release what the hook holds;
                               every hook's runs even where one fails)

A *check* is the only place where the loop waits for the device: every ``check_every`` steps, at
each epoch's last step, at the run's last step, and at any step a hook ``wants_check``. Every
rank reduces the same vector there in one all-reduce: the loop's loss and NaN figures and what
each hook's ``to_reduce`` gives (a number summed over ranks, or ``PerRank`` for one slot per
rank). ``after_check`` reads the sums in ``check.reduced`` and adds what should be written for
the step to ``check.metrics``. Per step, a hook must not read a value off the device.

What a hook does at a check (``to_reduce``, ``wants_check``, ``request_stop``) and in
``state_dict`` must be the same on every rank, as the collectives there are: a hook that only
some ranks have (the progress bar, on rank 0) reduces nothing, wants no check and keeps no
state.

A hook that keeps state across a restart has a ``name``: ``state_dict()`` is saved in every
checkpoint under that name and given back to ``load_state_dict`` on resume (``None`` when the
checkpoint has none). ``state_dict`` is called on every rank at the same point, so it may use
collectives. A hook finds the loop as ``self.trainer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# where a rank is (the watchdog's table; data wait is the time between "data" and "compute")
START, DATA, COMPUTE, COLLECTIVE = "start", "data", "compute", "all-reduce"
EVALUATION, CHECKPOINT = "evaluation", "checkpoint"


@dataclass
class PerRank:
    """A figure of this rank that the check gathers from every rank (a list, by rank)."""

    value: float


@dataclass
class Check:
    """What the ranks agreed on at a check."""

    step: int                       # optimizer steps done
    epoch: int                      # the epoch these steps belong to (0-based)
    lr: float                       # the last step's
    steps: int                      # steps since the previous check
    seconds: float                  # wall time since the previous check
    loss: float | None              # mean over ranks and those steps (non-finite ones left out)
    reduced: dict = field(default_factory=dict)   # to_reduce's names -> sums or per-rank lists
    metrics: dict = field(default_factory=dict)   # what the writers record for this step


class Hook:
    name = ""                       # its key in checkpoints; "" for a hook without state
    trainer: Any                    # the engine.trainer.Trainer that runs it (set by HookList)

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def on_phase(self, phase: str) -> None:
        pass

    def after_step(self) -> None:
        pass

    def wants_check(self, step: int) -> bool:
        return False

    def to_reduce(self) -> dict:
        return {}

    def after_check(self, check: Check) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass


EVENTS = ("before_train", "before_epoch", "before_step", "on_phase", "after_step",
          "wants_check", "after_check", "after_epoch", "after_train")


class HookList:
    """The hooks in order, and for each event the ones that act on it (a step calls only those:
    a few attribute lookups per step, whatever the number of hooks)."""

    def __init__(self, hooks, trainer):
        self.hooks = list(hooks)
        names = [h.name for h in self.hooks if h.name]
        if len(names) != len(set(names)):
            raise ValueError(f"two hooks keep their state under one name: {names}")
        for hook in self.hooks:
            hook.trainer = trainer
        self.acting = {event: [getattr(h, event) for h in self.hooks
                               if getattr(type(h), event) is not getattr(Hook, event)]
                       for event in EVENTS}

    def __iter__(self):
        return iter(self.hooks)

    def call(self, event: str, *args) -> None:
        for method in self.acting[event]:
            method(*args)

    def call_each(self, event: str) -> list[Exception]:
        """``event`` on every hook even where one fails (after_train lets go of what each
        holds: the lock, the log file, signal handlers); the failures, in order."""
        failures = []
        for method in self.acting[event]:
            try:
                method()
            except Exception as e:  # noqa: BLE001 - reported by the caller
                failures.append(e)
        return failures

    def wants_check(self, step: int) -> bool:
        return any(wants(step) for wants in self.acting["wants_check"])

    def to_reduce(self) -> dict:
        values = {}
        for hook in self.hooks:
            for key, value in hook.to_reduce().items():
                if key in values:
                    raise ValueError(f"two hooks reduce a figure named {key!r}")
                values[key] = value
        return values

    def of_type(self, cls):
        """The hook of class ``cls`` (None if there is none)."""
        return next((h for h in self.hooks if isinstance(h, cls)), None)
