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


def digest(samples: Samples) -> str:
    h = hashlib.sha256()
    h.update("\0".join(samples.classes).encode())
    for file, label in zip(samples.files, samples.labels):
        h.update(f"\n{file}\t{label}".encode())
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
    lists = all_gather_object((samples.files, samples.labels))   # the error path alone pays
    raise ListingMismatch(f"the ranks hold different {split} listings of {samples.root}: "
                          + "; ".join(difference(0, lists[0], r, lists[r])
                                      for r in range(len(lists)) if digests[r] != digests[0]))


def difference(a: int, listed_a, b: int, listed_b) -> str:
    (files_a, labels_a), (files_b, labels_b) = listed_a, listed_b
    for i, (fa, la, fb, lb) in enumerate(zip(files_a, labels_a, files_b, labels_b)):
        if (fa, la) != (fb, lb):
            return f"sample {i} is {fa} (label {la}) on rank {a}, {fb} (label {lb}) on rank {b}"
    return (f"rank {a} lists {len(files_a):,} samples, rank {b} {len(files_b):,} (the first "
            f"{min(len(files_a), len(files_b)):,} agree)")
