"""Checkpoints as a hook: resume at the start (``run.resume``), save every ``every`` steps, at each
epoch's end and when the run stops early (a signal, ``run.max_steps``); keep the newest ``keep``.
The files themselves (atomic, checksummed, the fallback to an older valid one) are
``engine/checkpoint.py``'s; what goes in them is the engine's (model, optimizer) and the loop's
``state_dict`` (its state, the RNG streams and every stateful hook's), plus ``metadata``.

Saves in the background (``run.async_checkpoint``, on by default; engines that write one file,
``Engine.saves_in_background``): at a save rank 0 copies the state to host memory and its
``CheckpointWriter`` thread writes it while every rank trains on; retention pruning follows the
new checkpoint's completion there. One save is in flight at most: every rank waits at the next
save until rank 0's previous one is complete, and a failed write is raised there on every rank.
The run's last save (its end, a stop by signal or ``run.max_steps``) is waited for by every
rank before the loop ends, so the final checkpoint is complete when the process exits; a
failed run still joins the save in flight (``after_train``).

Which checkpoint a run resumes from is rank 0's choice, given to every rank: ranks that each
listed and verified the folder themselves could pick different ones (a file system's
attribute cache, node-local copies) and train on different weights."""
from __future__ import annotations

import logging
import socket
from functools import partial
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..checkpoint_writer import CheckpointWriter
from ..distributed import BufferSync, all_gather_object, broadcast_object
from ..errors import TrainingDiverged
from .base import CHECKPOINT, START, Check, Hook

log = logging.getLogger("wrn_large.train")


class CheckpointHook(Hook):
    def __init__(self, out: str | Path, engine, *, resume: str = "auto", every: int = 0,
                 keep: int = 3, metadata: dict | None = None, buffers: BufferSync | None = None,
                 is_main: bool = True, background: bool = True,
                 checkpoint_dir: str | Path | None = None):
        self.out, self.engine, self.resume_from = Path(out), engine, resume
        # where checkpoints go (run.checkpoint_dir: a folder or an s3:// prefix), and where
        # this host's ranks keep a downloaded one to read it (engine/checkpoint.py local_copy)
        self.folder = ckpt.checkpoint_dir(out, checkpoint_dir)
        self.cache = self.out / "checkpoint_cache" / socket.gethostname()
        self.every, self.keep, self.metadata = every, keep, dict(metadata or {})
        self.buffers, self.is_main = buffers, is_main
        self.saved: tuple[int, int] | None = None   # (step, epoch) last saved or resumed from
        self.staging = self.out / "checkpoint_staging"      # an S3 save's local file, then gone
        self.writer = (CheckpointWriter(write=partial(ckpt.save_file_atomic, staging=self.staging))
                       if background else None)

    def before_train(self) -> None:
        clash = ({h.name for h in self.trainer.hooks} | self.trainer.reserved_keys) & \
            self.metadata.keys()
        if clash:
            raise ValueError(f"checkpoint metadata would replace the run's state {sorted(clash)}")
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
        """Save the run as it is now, unless that very state was saved or resumed from. An
        epoch's end after a resume at its last step is saved again: the epoch is counted and
        its record added since."""
        trainer = self.trainer
        step = trainer.state.step
        path = ckpt.checkpoint_path(self.folder, step, self.engine.checkpoint_suffix)
        if self.saved == (step, trainer.state.epoch):
            return path
        trainer.phase(CHECKPOINT)
        if self.buffers is not None:
            self.buffers.sync(step)
        if not all(torch.isfinite(t).all() for t in trainer.model.state_dict().values()
                   if t.is_floating_point()):
            # the last step produced inf/NaN weights: never let them replace a good checkpoint
            raise TrainingDiverged(trainer.diverged("finite, but the weights are not", step))
        state = {**trainer.state_dict(), **self.metadata}
        if self.in_background():
            self.save_in_background(path, state)
        else:
            self.engine.save_checkpoint(str(path), state)
            on_rank0(lambda: self.written(path), self.is_main)   # its failure: on every rank
        self.saved = (step, trainer.state.epoch)
        return path

    def in_background(self) -> bool:
        return self.writer is not None and self.engine.saves_in_background

    def save_in_background(self, path: Path, state: dict) -> None:
        """Rank 0 hands a host copy of the state to the writer after the previous save is
        complete; the run's last save is waited for as well."""
        self.wait_for_writer()
        contents = self.engine.checkpoint_contents(state)
        if contents is not None:
            self.writer.submit(contents, str(path), after=lambda: self.written(path))
        if self.is_last_save():
            self.wait_for_writer()

    def written(self, path: Path) -> None:
        """Rank 0, once ``path`` is complete (in the writer's thread when in the background).
        Retention never stops the run: a checkpoint it could not delete is a warning (prune).
        On S3 the new checkpoint was read back against its SHA-256 by its upload: prune trusts
        it instead of reading it a second time."""
        log.info("saved checkpoint %s", path)
        try:
            ckpt.prune(self.folder, self.keep, verified=path if ckpt.is_remote(path) else None)
        except Exception as e:  # noqa: BLE001 - prune warns of storage errors itself; anything else
            log.warning("retention after %s failed (old checkpoints left): %s: %s", path,
                        type(e).__name__, e)

    def wait_for_writer(self) -> None:
        """Every rank waits until rank 0's save in flight is complete; its failure is raised
        on every rank (no rank left in a collective that rank 0 has left)."""
        on_rank0(self.writer.wait, self.is_main)

    def is_last_save(self) -> bool:
        trainer = self.trainer
        return trainer.stop_reason is not None or trainer.state.epoch >= trainer.schedule.epochs

    def after_train(self) -> None:
        """The save in flight is complete before the run ends, whatever ended it (a failed
        write is raised, or logged beside the run's own error). Rank 0's alone: no collective
        here, the ranks may have failed at different points."""
        if self.writer is not None:
            self.writer.wait()

    def resume(self) -> None:
        choice = self.resume_from
        if choice == "none":
            return
        candidates = on_rank0(lambda: self.candidates(choice), self.is_main)
        for path in candidates:
            incomplete, problem = on_rank0(lambda: rank0_problem(path, self.cache),
                                           self.is_main)
            if incomplete and choice == "auto":   # an interrupted save's leftover
                log.warning("skipping incomplete checkpoint %s", path)
                continue
            state = None
            if problem is None:
                state, problem = self.load(path)
            if problem is not None:
                if choice != "auto":
                    raise ckpt.CheckpointError(problem)
                log.warning("%s; falling back to the previous checkpoint", problem)
                continue
            self.trainer.load_state_dict(state)
            self.saved = (self.trainer.state.step, self.trainer.state.epoch)
            log.info("resumed from %s at step %d (epoch %d)", path, self.trainer.state.step,
                     self.trainer.state.epoch)
            return
        if candidates:
            log.warning("no valid checkpoint in %s: starting from scratch",
                        self.folder)

    def candidates(self, choice: str) -> list[Path]:
        if choice == "auto":
            return ckpt.list_checkpoints(self.folder)
        if not ckpt.exists(choice):
            raise FileNotFoundError(f"run.resume={choice}: no such checkpoint")
        return [choice if ckpt.is_remote(choice) else Path(choice)]

    def load(self, path: Path) -> tuple[dict | None, str | None]:
        """(the checkpoint's state, None) on every rank, or (None, the first rank's error) on
        every rank when every rank failed to read it. Where some ranks loaded it and others
        could not (a node-local copy, an I/O error on one node), the ranks now hold different
        weights: no fallback can make them equal again, so every rank raises."""
        try:
            local = ckpt.local_copy(path, self.cache)   # itself, or this host's checked download
            state, error = self.engine.load_checkpoint(str(local)), None
        except ckpt.CheckpointError as e:
            state, error = None, str(e)
        errors = all_gather_object(error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed and len(failed) < len(errors):
            raise ckpt.CheckpointError(
                f"{path}: read by some ranks, not by rank(s) "
                f"{', '.join(str(rank) for rank, _ in failed)} ({failed[0][1]}): the ranks would "
                f"train on different weights; make the checkpoint readable on every node")
        return (None, failed[0][1]) if failed else (state, None)


def on_rank0(decide, is_main: bool):
    """``decide()`` run on rank 0 alone and its answer given to every rank. What it raises is
    raised on every rank (no rank left waiting in a collective that rank 0 has left)."""
    answer, error = None, None
    if is_main:
        try:
            answer = decide()
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            error = e
    answer, error = broadcast_object((answer, error))
    if error is not None:
        raise error
    return answer


def rank0_problem(path, cache: Path) -> tuple[bool, str | None]:
    """(whether ``path`` is incomplete, why rank 0 will not resume from it or None). On S3 the
    checkpoint is downloaded into ``cache`` and checked there: the other ranks of this host
    read that copy (``load``), the ranks of other hosts download their own."""
    if not ckpt.is_complete(path):
        marker = "manifest" if ckpt.is_remote(path) else f"{ckpt.COMPLETE_MARKER} marker"
        return True, f"{path} is incomplete (no {marker})"
    try:
        ckpt.verify(ckpt.local_copy(path, cache))
    except ckpt.CheckpointError as e:
        return False, str(e)
    return False, None
