"""Elastic jobs: what a start keeps when the number of processes changed, and what it records.

A job launched with ``torchrun --nnodes=MIN:MAX`` (launch/README.md, "Elastic jobs") is
restarted at another world size when a node is lost or one joins. Every start keeps:

- the global batch ``train.batch_size`` and each rank's micro-batch: ``train.micro_batch``, or
  the one of the run's first start (the memory known to fit, recorded in its provenance). The
  micro-batches a rank accumulates per optimizer step are what the world size leaves
  (``plan_batching``); a world size that does not divide them is refused in one line before any
  step. Never a bigger micro-batch: 2 nodes down to 1 would double every rank's activations.
- the sample stream: step s takes the samples ``perm[s*B:(s+1)*B]`` of the epoch's global
  permutation in micro-batches of m consecutive samples, rank r taking every W-th
  (``pipelines.base.train_shard_indices``); with m fixed, each step's micro-batches are the same
  sets at any world size, so the gradient is the same mean and BatchNorm sees the same batches.
- the lr schedule, counted in optimizer steps, and evaluation (every image once).

The RNG streams (dropout, mixup) follow a written rule (``engine.trainer.Trainer.load_state_dict``):
rank r continues the stream rank r saved; a rank the saving job did not have starts one seeded
from (seed, rank, step); the streams of departed ranks end.

A membership change (another world size or other hosts than the checkpoint's) is one log line
and one ``membership`` record in metrics.jsonl (``MembershipHook``). How long recovery took and
which steps were repeated come from the notes the ranks of the previous start left when they
ended by an error or a stop signal (``write_note``): the earliest is the failure, the furthest
step is where training had got to.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, TrainConfig

NOTES = "membership"      # RUN_DIR/membership/<host>-<pid>.json: how a start ended


@dataclass(frozen=True)
class Batching:
    """How one start splits the global batch: each rank's micro-batch and the micro-batches it
    accumulates per optimizer step."""

    batch_size: int             # global, per optimizer step
    micro_batch: int            # per rank and forward pass
    world_size: int

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch * self.world_size)


def plan_batching(t: TrainConfig, world_size: int, remembered: int | None = None) -> Batching:
    """The batching of a start of ``world_size`` processes: ``t.micro_batch`` if set, else the
    run's first start's (``remembered``), else ``batch_size / (world_size * grad_accum)``."""
    micro, source = t.micro_batch, "train.micro_batch"
    if micro is None and remembered is not None:
        micro, source = remembered, "kept from the run's first start: the memory known to fit"
    if micro is None:
        per_step = world_size * t.grad_accum
        if t.batch_size % per_step:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {world_size} "
                              f"processes x train.grad_accum={t.grad_accum}")
        return Batching(t.batch_size, t.batch_size // per_step, world_size)
    if t.batch_size % micro or (t.batch_size // micro) % world_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} cannot be split over {world_size} processes with a "
            f"micro-batch of {micro} per process ({source}): the number of processes must "
            f"divide {t.batch_size // micro if t.batch_size % micro == 0 else '(none)'} "
            f"(batch_size / micro-batch); set train.micro_batch to change the micro-batch")
    return Batching(t.batch_size, micro, world_size)


def remembered_micro_batch(starts: list[dict]) -> int | None:
    """The micro-batch of the run's first start that trained (provenance ``starts``), if
    recorded."""
    for start in starts:
        if start.get("micro_batch"):
            return int(start["micro_batch"])
    return None


# ------------------------------------------------------------------ how a start ended
def notes_dir(out: Path) -> Path:
    return Path(out) / NOTES


def write_note(out: Path, at: float, step: int, reason: str) -> None:
    """This rank's note that its start ended at time ``at`` (an error, a stop signal) with
    ``step`` optimizer steps done. Best effort: a rank that is going down never fails on it."""
    folder = notes_dir(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{socket.gethostname()}-{os.getpid()}.json"
        path.write_text(json.dumps({"time": at, "step": step, "reason": reason}) + "\n")
    except OSError:
        pass


def read_notes(out: Path) -> dict[str, dict]:
    """The notes this host's folder holds, by file name (unreadable ones left out)."""
    found = {}
    for path in sorted(notes_dir(out).glob("*.json")):
        try:
            found[path.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def remove_notes(out: Path, names) -> None:
    for name in names:
        try:
            (notes_dir(out) / name).unlink()
        except OSError:
            pass


def membership_record(old: dict, world_size: int, hosts: list[str], batching: Batching,
                      resumed_step: int, notes: list[dict], first_step_at: float) -> dict:
    """The ``membership`` record of a start whose processes differ from the checkpoint's
    (``old``: the saving start's world size and hosts). Recovery: from the earliest note (the
    failure, or the stop signal of a scale-up) to the first optimizer step after it; steps
    repeated: from the resumed step to the furthest any rank of the previous start got. Both
    null when no rank left a note (every process of the old job died at once)."""
    failed_at = min((n["time"] for n in notes), default=None)
    reached = max((n["step"] for n in notes), default=None)
    return {"old_world": old.get("world_size"), "new_world": world_size, "hosts": hosts,
            "micro_batch": batching.micro_batch, "accumulation": batching.accumulation,
            "recovery_s": None if failed_at is None else round(first_step_at - failed_at, 3),
            "steps_repeated": None if reached is None else max(0, reached - resumed_step)}
