"""Checkpoints written while training goes on (``run.async_checkpoint``, on by default).

At a save the loop blocks only for ``CheckpointWriter.submit``: it waits for the previous save
to finish (at most one in flight), copies the state to host memory, and hands the copy to a
thread of its own that writes it (``engine.checkpoint.save_file_atomic``: temp name, fsync,
SHA-256, rename; an upload where the location is an ``s3://`` URL) and then runs ``after``
(retention pruning: only once the new checkpoint is complete). The copy is what makes this
safe: the optimizer steps that follow change the weights and momentum in place.

- On a GPU the copy goes to pinned host buffers, enqueued on the current stream (the next
  step's kernels are ordered after it); the thread waits for the copy's event before writing.
  On the CPU it is a plain copy. The buffers are kept and reused by the next save (it waits
  for this one first): the host holds one checkpoint's worth of memory for the run.
- A write that failed is raised by the next ``submit`` or ``wait`` (``CheckpointWriteFailed``):
  never lost. A failure of ``after`` (the checkpoint is written) is a warning, not a failed
  write: retention is not worth stopping a run for. The checkpoint hook waits at every save
  and at the run's end, on every rank (engine/hooks/checkpoint.py).
- The thread is a daemon: a process that dies (an unhandled error past the hooks, the
  watchdog's ``os._exit``) is not kept alive by it, and the file it leaves is a temp name,
  never a checkpoint (``save_file_atomic``). The run's normal end and a preemption join it.
- ``gate``: tests hold the write there (a ``threading.Event``) to see the loop step while a
  save is in flight; left ``None`` by the trainer.
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Callable

import torch

from .checkpoint import save_file_atomic

log = logging.getLogger(__name__)


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint written in the background could not be written."""


class HostCopy:
    """Copies of a state's tensors in host memory, into buffers kept for the next copy (pinned
    where CUDA is there); everything else is deep-copied."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.pinned = torch.cuda.is_available()

    def __call__(self, state):
        """``state`` copied; on a GPU with the event its copies complete at (else None)."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        copied = self.copy(state, (), pairs)
        if pairs:   # one call for all: hundreds of small tensors cost ~0.5 ms each one by one
            buffers, sources = zip(*pairs)
            torch._foreach_copy_(list(buffers), list(sources), non_blocking=self.pinned)
        if not self.pinned:
            return copied, None
        done = torch.cuda.Event()
        done.record()
        return copied, done

    def copy(self, value, key: tuple, pairs: list):
        """``value`` with each tensor replaced by its host buffer (to be filled from the
        tensor: ``pairs``) and the rest deep-copied; a dict's attributes (a state dict's
        ``_metadata``) kept."""
        if isinstance(value, torch.Tensor):
            buffer = self.buffer_for(value, key)
            pairs.append((buffer, value.detach()))
            return buffer
        if isinstance(value, dict):
            copied = type(value)((k, self.copy(v, key + (k,), pairs)) for k, v in value.items())
            for name, attribute in getattr(value, "__dict__", {}).items():
                setattr(copied, name, copy.deepcopy(attribute))
            return copied
        if type(value) in (list, tuple):
            return type(value)(self.copy(v, key + (i,), pairs) for i, v in enumerate(value))
        return copy.deepcopy(value)

    def buffer_for(self, tensor: torch.Tensor, key: tuple) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or not same_layout(buffer, tensor):
            buffer = self.buffers[key] = self.empty_like(tensor)
        return buffer

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor of ``tensor``'s shape, dtype and (dense) strides: it saves as the
        original would (channels_last stays channels_last)."""
        strides = tensor.stride() if is_dense(tensor) else None
        if strides is None:
            return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pinned)
        return torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype,
                                   pin_memory=self.pinned)


def is_dense(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or (tensor.dim() == 4 and
                                      tensor.is_contiguous(memory_format=torch.channels_last))


def same_layout(buffer: torch.Tensor, tensor: torch.Tensor) -> bool:
    return (buffer.shape == tensor.shape and buffer.dtype == tensor.dtype
            and (buffer.stride() == tensor.stride() or not is_dense(tensor)))


class CheckpointWriter:
    """One checkpoint written by a thread of its own at a time (the module's docstring)."""

    def __init__(self, write: Callable = save_file_atomic, gate: threading.Event | None = None):
        self.write, self.gate = write, gate
        self.host_copy = HostCopy()
        self.thread: threading.Thread | None = None
        self.failure: tuple[str, BaseException] | None = None
        self.written = 0          # saves completed (``after`` included)

    def submit(self, state: dict, location: str, after: Callable[[], None] | None = None) -> None:
        """Wait for the save in flight (raising its failure), copy ``state`` to host memory
        and start writing the copy to ``location``; ``after()`` runs once it is complete."""
        self.wait()
        copied, copied_at = self.host_copy(state)
        self.thread = threading.Thread(target=self.run, args=(copied, copied_at, location, after),
                                       name=f"checkpoint-writer {location}", daemon=True)
        self.thread.start()

    def run(self, state: dict, copied_at, location: str, after) -> None:
        try:
            if self.gate is not None:
                self.gate.wait()
            if copied_at is not None:
                copied_at.synchronize()
            self.write(state, location, checksum=True)
        except BaseException as e:  # noqa: BLE001 - raised in the loop by wait()
            self.failure = (location, e)
            return
        try:
            if after is not None:
                after()
        except Exception as e:  # noqa: BLE001 - the checkpoint is written: not a write failure
            log.warning("checkpoint %s is written, but what follows it (retention) failed: "
                        "%s: %s", location, type(e).__name__, e)
        self.written += 1

    def in_flight(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> None:
        """Until the save in flight (if any) is complete; its failure raised here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failure is not None:
            (location, error), self.failure = self.failure, None
            raise CheckpointWriteFailed(
                f"writing checkpoint {location} in the background failed: "
                f"{type(error).__name__}: {error}") from error
