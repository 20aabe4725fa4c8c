"""Checkpoints as a hook: resume at the start (``run.resume``), save every ``every`` steps, at each
epoch's end and when the run stops early (a signal, ``run.max_steps``); keep the newest ``keep``.
The files themselves (atomic, checksummed, the fallback to an older valid one) are
``engine/checkpoint.py``'s; what goes in them is the engine's (model, optimizer) and the loop's
``state_dict`` (its state, the RNG streams and every stateful hook's), plus ``metadata``."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..distributed import BufferSync, barrier
from ..errors import TrainingDiverged
from .base import CHECKPOINT, START, Check, Hook

log = logging.getLogger("wrn_large.train")


class CheckpointHook(Hook):
    def __init__(self, out: str | Path, engine, *, resume: str = "auto", every: int = 0,
                 keep: int = 3, metadata: dict | None = None, buffers: BufferSync | None = None,
                 is_main: bool = True):
        self.out, self.engine, self.resume_from = Path(out), engine, resume
        self.every, self.keep, self.metadata = every, keep, dict(metadata or {})
        self.buffers, self.is_main = buffers, is_main
        self.saved_at: int | None = None   # the step last saved (or resumed from)

    def before_train(self) -> None:
        self.trainer.phase(CHECKPOINT)
        self.resume()
        self.trainer.phase(START)

    def wants_check(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def after_check(self, check: Check) -> None:
        # at an epoch's last step the epoch's end saves, after its evaluation
        epoch_end = check.step % self.trainer.schedule.steps_per_epoch == 0
        if self.trainer.stop_reason is not None or (self.wants_check(check.step) and not epoch_end):
            self.save()

    def after_epoch(self) -> None:
        self.save()

    def save(self) -> Path:
        trainer = self.trainer
        step = trainer.state.step
        path = ckpt.checkpoint_path(self.out, step, self.engine.checkpoint_suffix)
        if self.saved_at == step:
            return path
        trainer.phase(CHECKPOINT)
        if self.buffers is not None:
            self.buffers.sync(step)
        if not all(torch.isfinite(t).all() for t in trainer.model.state_dict().values()
                   if t.is_floating_point()):
            # the last step produced inf/NaN weights: never let them replace a good checkpoint
            raise TrainingDiverged(trainer.diverged("finite, but the weights are not", step))
        state = trainer.state_dict()
        if state.keys() & self.metadata.keys():
            raise ValueError(f"checkpoint metadata {sorted(self.metadata)} would replace "
                             f"the run's own {sorted(state.keys() & self.metadata.keys())}")
        self.engine.save_checkpoint(str(path), {**state, **self.metadata})
        if self.is_main:
            ckpt.prune(self.out, self.keep)
            log.info("saved checkpoint %s", path)
        barrier()
        self.saved_at = step
        return path

    def resume(self) -> None:
        choice = self.resume_from
        if choice == "none":
            return
        candidates = ckpt.list_checkpoints(self.out) if choice == "auto" else [Path(choice)]
        if choice != "auto" and not candidates[0].exists():
            raise FileNotFoundError(f"run.resume={choice}: no such checkpoint")
        for path in candidates:
            if not ckpt.is_complete(path):
                log.warning("skipping incomplete checkpoint %s", path)
                continue
            try:
                ckpt.verify(path)
                state = self.engine.load_checkpoint(str(path))
            except ckpt.CheckpointError as e:
                if choice != "auto":
                    raise
                log.warning("%s; falling back to the previous checkpoint", e)
                continue
            self.trainer.load_state_dict(state)
            self.saved_at = self.trainer.state.step
            log.info("resumed from %s at step %d (epoch %d)", path, self.trainer.state.step,
                     self.trainer.state.epoch)
            return
        if candidates:
            log.warning("no valid checkpoint in %s: starting from scratch",
                        ckpt.checkpoint_dir(self.out))
