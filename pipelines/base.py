"""The contract between data backends and the trainer.

A backend is one function registered with ``@register_backend("name")`` that takes a
``DataConfig`` and a ``LoaderSpec`` and returns a ``Loader``. The trainer only ever calls
``build_loader(cfg, spec)``; adding a backend never touches the trainer. A backend of this
package is one file named in ``BUILTIN_BACKENDS``, imported when that backend is first asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch

from .config import DataConfig
from .quarantine import Quarantine, quarantine_for


@dataclass
class LoaderSpec:
    """Where and how one process reads: filled in by the trainer."""

    split: str                     # "train" | "val"
    batch_size: int                # per process
    rank: int = 0                  # GLOBAL rank
    world_size: int = 1
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # where the run pins its folder listings (RUN_DIR/listings): a resumed run reads the data
    # set its first start listed (pipelines.sources.open_samples); None: list the folder
    listings: Path | None = None
    # the split's bad images under data.on_bad_image=skip (pipelines.quarantine.quarantine_for):
    # the caller keeps it (checkpoints its state(), writes its listing()); the backend binds it
    # to the samples and fills it. None: build_loader makes one where data.on_bad_image=skip
    quarantine: Quarantine | None = None
    # the split's samples, listed once for the whole job by the caller (engine/listings.py:
    # rank 0 lists, the others read its pinned listing and compare digests). None: the backend
    # opens them itself (``samples_for``)
    samples: object | None = None

    def pinned_listing(self) -> Path | None:
        return self.listings / f"{self.split}.json" if self.listings is not None else None

    def open_samples(self, cfg: DataConfig):
        """The split's ``Samples`` (``pipelines.sources``): the job's, where the caller listed
        them once, else opened from ``cfg.root`` here."""
        if self.samples is not None:
            return self.samples
        from .sources import open_samples
        return open_samples(cfg.root, self.split, cfg.file_list, cfg.listing_cache,
                            self.pinned_listing(), cfg.shard_cache)


@runtime_checkable
class Loader(Protocol):
    """What the trainer iterates.

    - iteration yields ``(images, labels)``: float images (N, C, H, W), normalised, on
      ``spec.device``; int64 labels (N,) on the same device;
    - train: every rank yields the same number of full batches per epoch and the ranks'
      samples partition the epoch (drop the remainder); the order depends only on
      ``(seed, epoch)``, so an epoch can be replayed exactly. Use ``train_shard_indices``:
      global batch b is a slice of one permutation and rank r takes the r-th contiguous part
      of it, so N processes see exactly what 1 process with N-step gradient accumulation sees;
    - val: every sample is yielded by exactly one rank, exactly once (no padding duplicates);
      ranks may yield different numbers of batches;
    - ``set_epoch(epoch, start_batch)`` selects the epoch the next iteration yields and skips its
      first ``start_batch`` batches (exact mid-epoch resume);
    - bad images go into ``spec.quarantine`` (the caller's: a loader does not expose it).
    """

    num_classes: int
    num_samples: int               # samples this rank yields per epoch
    # (folder data sets also have ``classes``: the class folder names, in label order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...  # batches this rank yields per epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


@dataclass(frozen=True)
class ShardGroups:
    """``data.shuffle=shards``: a pack's shards in a random order, ``at_once`` of them mixed
    at a time (``shard_of``: each sample's shard)."""

    shard_of: object               # np.ndarray / tensor of ints, one per sample
    at_once: int


def train_permutation(num_samples: int, seed: int, epoch: int,
                      groups: ShardGroups | None = None) -> "torch.Tensor":
    """The epoch's order of the whole split, from (seed, epoch) only. ``groups`` None: one
    uniform permutation (``data.shuffle=global``). Else the shards are permuted and taken
    ``at_once`` at a time; the samples of each group of shards come in a uniform random
    order, the groups one after another (each sample once): a reader needs a few shards at a
    time, not all of them (whole shards from object storage, ``s3_pack.ShardCache``)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    if groups is None:
        return perm
    shard_of = torch.as_tensor(groups.shard_of, dtype=torch.int64)
    if len(shard_of) != num_samples:
        raise ValueError(f"{len(shard_of)} shard numbers for {num_samples} samples")
    shard_order = torch.randperm(int(shard_of.max()) + 1, generator=g)
    place = torch.empty_like(shard_order)
    place[shard_order] = torch.arange(len(shard_order))
    group = place[shard_of] // groups.at_once          # each sample's group
    return perm[torch.argsort(group[perm], stable=True)]


def train_shard_indices(num_samples: int, batch_size: int, rank: int, world_size: int,
                        seed: int, epoch: int,
                        groups: ShardGroups | None = None) -> "torch.Tensor":
    """This rank's sample indices for one training epoch, in order (full batches only).

    The epoch's permutation (``train_permutation``) depends only on (seed, epoch) and the
    shuffle. Global batch b holds ``perm[b*G:(b+1)*G]`` with G = batch_size * world_size;
    rank r reads its r-th slice."""
    perm = train_permutation(num_samples, seed, epoch, groups)
    global_batch = batch_size * world_size
    steps = num_samples // global_batch
    if steps == 0:
        raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch} "
                         f"({world_size} processes x {batch_size})")
    perm = perm[: steps * global_batch].view(steps, world_size, batch_size)
    return perm[:, rank].reshape(-1)


def val_shard_indices(num_samples: int, rank: int, world_size: int) -> "torch.Tensor":
    """Evaluation: every sample exactly once over all ranks, no padding (ranks may differ by 1)."""
    return torch.arange(rank, num_samples, world_size)


def epoch_indices(spec: "LoaderSpec", num_samples: int, epoch: int,
                  groups: ShardGroups | None = None) -> "torch.Tensor":
    """This rank's sample order for one epoch of ``spec.split`` (the one rule of every backend)."""
    if spec.split == "train":
        return train_shard_indices(num_samples, spec.batch_size, spec.rank, spec.world_size,
                                   spec.seed, epoch, groups)
    return val_shard_indices(num_samples, spec.rank, spec.world_size)


def shard_groups(cfg: DataConfig, samples) -> ShardGroups | None:
    """The training order's groups of shards under ``data.shuffle=shards``, None under
    ``global``. Refused (ValueError, one line) where the samples are no pack, or a pack whose
    shards each hold one or two classes (``--layout source``): its batches would too."""
    if cfg.shuffle == "global":
        return None
    where = getattr(samples, "root", cfg.root)
    if not hasattr(samples, "shard"):
        raise ValueError(f"data.shuffle=shards reads a pack's shards a few at a time; {where} "
                         f"is not a pack (python -m pipelines pack DATA_DIR OUT, then "
                         f"data.root=OUT)")
    if samples.layout != "mixed":
        raise ValueError(f"data.shuffle=shards needs a pack whose shards mix the classes; "
                         f"{where} was packed with --layout {samples.layout} (pack it again: "
                         f"the default layout is mixed)")
    return ShardGroups(samples.shard, cfg.shuffle_shards)


class EpochOrder:
    """The epoch bookkeeping of a Loader over ``dataset_size`` indexed samples: ``set_epoch``
    computes this rank's order with ``epoch_indices`` (the training order's ``groups``, None
    for a global shuffle), keeps the resume point and tells ``planned_reads`` (where set: the
    samples' ``plan``, an S3 pack's shard cache) what this process reads from there on;
    ``__len__`` counts batches. Subclasses set ``spec`` and ``dataset_size``, then call
    ``set_epoch(0)``."""

    spec: LoaderSpec
    dataset_size: int
    groups: ShardGroups | None = None
    planned_reads: Callable[[list[int]], None] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.order = epoch_indices(self.spec, self.dataset_size, epoch, self.groups)
        self.num_samples = len(self.order)
        if self.planned_reads is not None:
            self.planned_reads(self.remaining_order().tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.spec.batch_size)

    def remaining_order(self) -> "torch.Tensor":
        """This epoch's sample indices from the resume point on."""
        return self.order[self.start_batch * self.spec.batch_size:]


BackendFn = Callable[[DataConfig, LoaderSpec], Loader]
_backends: dict[str, BackendFn] = {}
# the module of this package that registers each built-in backend, imported on first need (a
# run of one backend does not import another's library); "dali" only where DALI imports
BUILTIN_BACKENDS = {"synthetic": "synthetic", "torch": "torch_backend", "dali": "dali"}


def _load_builtin_backend(name: str) -> None:
    if name in _backends or name not in BUILTIN_BACKENDS or name in _missing:
        return
    try:
        importlib.import_module(f"{__package__}.{BUILTIN_BACKENDS[name]}")
    except ImportError as e:
        if name != "dali" or not (e.name or "").startswith("nvidia"):
            raise
        _missing.add(name)            # looked for once


_missing: set[str] = set()


def register_backend(name: str):
    def wrap(fn: BackendFn) -> BackendFn:
        _backends[name] = fn
        return fn

    return wrap


def available_backends() -> list[str]:
    for name in BUILTIN_BACKENDS:
        _load_builtin_backend(name)
    return sorted(_backends)


def resolve_backend(name: str) -> str:
    if name == "auto":
        _load_builtin_backend("dali")
        name = "dali" if "dali" in _backends else "torch"
    _load_builtin_backend(name)
    if name not in _backends:
        raise ValueError(f"unknown data backend {name!r}; valid: auto, {', '.join(available_backends())}")
    return name


def build_loader(cfg: DataConfig, spec: LoaderSpec) -> Loader:
    problem = cfg.problem()   # the config loader's check too, for a DataConfig made in code
    if problem:
        raise ValueError(problem)
    if spec.quarantine is None:
        spec = replace(spec, quarantine=quarantine_for(cfg, spec.split))
    elif cfg.on_bad_image != "skip":
        raise ValueError(f"LoaderSpec.quarantine is given but data.on_bad_image="
                         f"{cfg.on_bad_image!r}: a quarantine is for skip")
    elif spec.quarantine.split != spec.split:
        raise ValueError(f"the {spec.quarantine.split} quarantine given for the {spec.split} "
                         f"split")
    return _backends[resolve_backend(cfg.backend)](cfg, spec)
