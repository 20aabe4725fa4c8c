"""The data set listed once per job, and the same list on every rank, provably.

Listing (or validating a cached listing of) 1.28M files is the costliest metadata work a job
does. Rank 0 does it and pins the result in ``RUN_DIR/listings`` (``pipelines.sources``); the
other ranks wait for it and read only the pinned file, which no later change to the tree can
alter. Every rank then hashes the samples it holds and the digests are compared: ranks holding
different lists would read different permutations, overlapping or missing shards, and nothing
downstream would notice. A mismatch stops the job naming the ranks and the first difference.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipelines.config import DataConfig
from pipelines.sources import Samples, open_samples

from .distributed import DistInfo, all_gather_object, broadcast_object

SPLITS = ("train", "val")


class ListingMismatch(RuntimeError):
    pass


def rows(samples: Samples) -> list[tuple]:
    """What identifies each sample: its file and label (a folder), or its place in the shards
    and label (a pack: ``pipelines.pack.PackedSamples``)."""
    if hasattr(samples, "files"):
        return list(zip(samples.files, samples.labels))
    return list(zip((samples.shards[s] for s in samples.shard), samples.offset.tolist(),
                    samples.size.tolist(), samples.labels))


def digest(samples: Samples) -> str:
    h = hashlib.sha256("\0".join(samples.classes).encode())
    for row in rows(samples):
        h.update(("\n" + "\t".join(map(str, row))).encode())
    return h.hexdigest()


def lists_files(cfg: DataConfig) -> bool:
    return cfg.dataset == "imagenet" and cfg.backend != "synthetic" and cfg.root is not None


def list_once(cfg: DataConfig, dist: DistInfo, listings: Path) -> dict[str, Samples]:
    """Each split's samples on this rank, listed by rank 0 alone ({} for data sets that are
    not a listing of files: CIFAR, SVHN, synthetic)."""
    if not lists_files(cfg):
        return {}
    held = {}
    for split in SPLITS:
        pinned = listings / f"{split}.json"
        samples, error = None, None
        if dist.is_main:
            try:
                samples = open_samples(cfg.root, split, cfg.file_list, cfg.listing_cache, pinned)
            except Exception as e:   # noqa: BLE001 - raised again below, on every rank together
                error = e
        failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank 0 could not list the {split} split: {failed}")
        if not dist.is_main:   # rank 0's pinned listing, read as is: no walk, no validation
            samples = open_samples(cfg.root, split, cfg.file_list, "off", pinned)
        agree(split, samples, dist)
        held[split] = samples
    return held


def agree(split: str, samples: Samples, dist: DistInfo) -> None:
    """Every rank holds the same ``samples``, or every rank raises naming the difference."""
    digests = all_gather_object(digest(samples))
    if len(set(digests)) == 1:
        return
    held = all_gather_object(rows(samples))   # the error path alone pays for this
    raise ListingMismatch(f"the ranks hold different {split} listings: " + "; ".join(
        difference(0, held[0], r, held[r]) for r in range(len(held)) if digests[r] != digests[0]))


def difference(a: int, rows_a: list[tuple], b: int, rows_b: list[tuple]) -> str:
    for i, (row_a, row_b) in enumerate(zip(rows_a, rows_b)):
        if row_a != row_b:
            return f"sample {i} is {show(row_a)} on rank {a}, {show(row_b)} on rank {b}"
    return (f"rank {a} lists {len(rows_a):,} samples, rank {b} {len(rows_b):,} (the first "
            f"{min(len(rows_a), len(rows_b)):,} agree)")


def show(row: tuple) -> str:
    *where, label = row
    return f"{' '.join(map(str, where))} (label {label})"
