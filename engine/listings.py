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
from collections.abc import Iterator
from pathlib import Path

from pipelines.config import DataConfig
from pipelines.sources import Samples, open_samples

from .distributed import DistInfo, all_gather_object, broadcast_object

SPLITS = ("train", "val")


class ListingMismatch(RuntimeError):
    pass


def rows(samples: Samples) -> Iterator[tuple]:
    """What identifies each sample: its file and label (a folder), or its place in the shards
    and label (a pack: ``pipelines.pack.PackedSamples``)."""
    if hasattr(samples, "files"):
        return zip(samples.files, samples.labels)
    return zip((samples.shards[s] for s in samples.shard), samples.offset.tolist(),
               samples.size.tolist(), samples.labels)


def digest(samples: Samples) -> str:
    h = hashlib.sha256("\0".join(samples.classes).encode())
    for row in rows(samples):
        h.update(("\n" + "\t".join(map(str, row))).encode())
    return h.hexdigest()


def lists_files(cfg: DataConfig) -> bool:
    return cfg.dataset == "imagenet" and cfg.backend != "synthetic" and cfg.root is not None


def list_once(cfg: DataConfig, dist: DistInfo, listings: Path) -> dict[str, Samples]:
    """Each split's samples on this rank, listed by rank 0 alone ({} for data sets that are
    not a listing of files: CIFAR, SVHN, synthetic). An error on any rank is raised on every
    rank (no rank is left waiting in a collective)."""
    if not lists_files(cfg):
        return {}
    held = {}
    for split in SPLITS:
        pinned = listings / f"{split}.json"
        listed = everywhere(lambda: open_samples(cfg.root, split, cfg.file_list,
                                                 cfg.listing_cache, pinned, cfg.shard_cache), dist.is_main)
        if dist.is_main:
            samples, was_pinned = listed, pinned.is_file()
        was_pinned = broadcast_object(was_pinned if dist.is_main else None)
        read = everywhere(lambda: rank0s_listing(cfg, split, pinned, was_pinned),
                          not dist.is_main)
        if not dist.is_main:
            samples = read
        agree(split, samples, dist)
        held[split] = samples
    return held


def rank0s_listing(cfg: DataConfig, split: str, pinned: Path, was_pinned: bool) -> Samples:
    """The listing rank 0 pinned, read as is: no walk, no validation."""
    if was_pinned and not pinned.is_file():
        raise FileNotFoundError(f"{pinned}, written by rank 0, is not there on this node: "
                                f"run.output_dir must be on storage that every node sees")
    return open_samples(cfg.root, split, cfg.file_list, "off", pinned, cfg.shard_cache)


def everywhere(work, here: bool):
    """``work()`` where ``here``; what it raises on any rank is raised on every rank."""
    result, error = None, None
    if here:
        try:
            result = work()
        except Exception as e:   # noqa: BLE001 - raised below, on every rank together
            error = e
    errors = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} could not list the data: {failed[0][1]}")
    return result


def agree(split: str, samples: Samples, dist: DistInfo) -> None:
    """Every rank holds the same ``samples``, or every rank raises naming the difference."""
    digests = all_gather_object(digest(samples))
    if len(set(digests)) == 1:
        return
    reference = broadcast_object(list(rows(samples)) if dist.is_main else None)  # error path only
    mine = None if digests[dist.rank] == digests[0] else difference(0, reference, dist.rank,
                                                                    list(rows(samples)))
    found = [d for d in all_gather_object(mine) if d is not None]
    raise ListingMismatch(f"the ranks hold different {split} listings: " + "; ".join(found))


def difference(a: int, rows_a: list[tuple], b: int, rows_b: list[tuple]) -> str:
    for i, (row_a, row_b) in enumerate(zip(rows_a, rows_b)):
        if row_a != row_b:
            return f"sample {i} is {show(row_a)} on rank {a}, {show(row_b)} on rank {b}"
    return (f"rank {a} lists {len(rows_a):,} samples, rank {b} {len(rows_b):,} (the first "
            f"{min(len(rows_a), len(rows_b)):,} agree)")


def show(row: tuple) -> str:
    *where, label = row
    return f"{' '.join(map(str, where))} (label {label})"
