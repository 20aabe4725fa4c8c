"""Elastic jobs: what a start keeps when the number of processes changed, and what it records.

A job launched with ``torchrun --nnodes=MIN:MAX`` (launch/README.md, "Elastic jobs") is
restarted at another world size when a node is lost or one joins. Every start keeps:

- the global batch ``train.batch_size`` and each rank's micro-batch: ``train.micro_batch``, or
  the full job's (MAX nodes; the memory the job was sized for), whatever the size of the start.
  The micro-batches a rank accumulates per optimizer step are what the world size leaves
  (``plan_batching``); a world size that cannot take them is refused in one line before any
  step, and each start names the sizes of the range that would be. Never a bigger
  micro-batch: 2 nodes down to 1 would double every rank's activations.
- the sample stream: step s takes the samples ``perm[s*B:(s+1)*B]`` of the epoch's global
  permutation in micro-batches of m consecutive samples, rank r taking every W-th
  (``pipelines.base.train_shard_indices``); with m fixed, each step's micro-batches are the same
  sets at any world size, so the gradient is the same mean and BatchNorm sees the same batches.
- the lr schedule, counted in optimizer steps, and evaluation (every image once).

The RNG streams (dropout, mixup) follow a written rule (``Trainer.restore_rng_streams``):
rank r continues the stream rank r saved; a rank the saving job did not have starts one seeded
from (seed, rank, step); the streams of departed ranks end.

A membership change (another world size or other hosts than the checkpoint's: a lost or joined
node, or a requeue onto other nodes) is one log line and one ``membership`` record in
metrics.jsonl (``MembershipHook``). How long recovery took and which steps were repeated come
from the notes the ranks left when their start ended by an error or a stop signal
(``write_note``), those written since the start that saved the checkpoint began: the earliest is
the failure, the furthest step is where training had got to. The times are each host's clock.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, TrainConfig

NOTES = "membership"      # RUN_DIR/membership/<host>-<pid>.json: how a start ended
ELASTIC_NODES = "WRN_ELASTIC_NODES"     # "MIN:MAX", set by launch/torchrun.py for its workers


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


def elastic_range() -> tuple[int, int, int] | None:
    """(MIN, MAX, processes per node) of an elastic job started by launch/torchrun.py, which
    says ``--nnodes=MIN:MAX`` in ``WRN_ELASTIC_NODES`` to its workers; None in any process
    torchrun did not start (a variable inherited by something else is not an elastic job)."""
    spec = os.environ.get(ELASTIC_NODES)
    if not spec or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        low, high = (int(n) for n in spec.split(":"))
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ConfigError(f"{ELASTIC_NODES}={spec!r}: expected MIN:MAX (as launch/torchrun.py "
                          f"sets it) in a torchrun worker") from None
    return low, high, per_node


def plan_batching(t: TrainConfig, world_size: int,
                  elastic: tuple[int, int, int] | None = None) -> Batching:
    """The batching of a start of ``world_size`` processes: the micro-batch is
    ``t.micro_batch`` if set; in an elastic job (``elastic``: MIN, MAX, processes per node) the
    one of the full job, ``batch_size / (MAX x per node x grad_accum)``, at whatever size it
    runs now; else ``batch_size / (world_size x grad_accum)``. The accumulation is what is
    left; a world size that cannot take it is a ConfigError naming the sizes."""
    micro, source = t.micro_batch, "train.micro_batch"
    if micro is None and elastic is not None:
        full = elastic[1] * elastic[2]
        if t.batch_size % (full * t.grad_accum):
            raise ConfigError(
                f"train.batch_size={t.batch_size} is not divisible by the full elastic job's "
                f"{full} processes ({elastic[1]} nodes x {elastic[2]}) x "
                f"train.grad_accum={t.grad_accum}; or set train.micro_batch")
        micro = t.batch_size // (full * t.grad_accum)
        source = f"the full job's: {elastic[1]} nodes x {elastic[2]} processes"
    if micro is None:
        per_step = world_size * t.grad_accum
        if t.batch_size % per_step:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {world_size} "
                              f"processes x train.grad_accum={t.grad_accum}")
        return Batching(t.batch_size, t.batch_size // per_step, world_size)
    if not fits(t.batch_size, micro, world_size):
        raise ConfigError(
            f"train.batch_size={t.batch_size} cannot be split over {world_size} processes with a "
            f"micro-batch of {micro} per process ({source}): the number of processes must "
            f"divide {t.batch_size // micro} (batch_size / micro-batch)")
    return Batching(t.batch_size, micro, world_size)


def fits(batch_size: int, micro: int, world_size: int) -> bool:
    return batch_size % micro == 0 and (batch_size // micro) % world_size == 0


def sizes_it_cannot_run_at(batching: Batching, elastic: tuple[int, int, int]) -> list[int]:
    """The world sizes of an elastic job's range (MIN..MAX nodes) its global batch cannot be
    split over with its micro-batch: a start there is refused."""
    low, high, per_node = elastic
    return [n * per_node for n in range(low, high + 1)
            if not fits(batching.batch_size, batching.micro_batch, n * per_node)]


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


def read_notes(out: Path) -> dict[str, dict | None]:
    """The notes this host's folder holds, by file name (unreadable or incomplete ones as
    None: removed, never counted)."""
    found = {}
    for path in sorted(notes_dir(out).glob("*.json")):
        try:
            note = json.loads(path.read_text())
            found[path.name] = note if {"time", "step"} <= note.keys() else None
        except (OSError, ValueError, AttributeError):
            found[path.name] = None
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
