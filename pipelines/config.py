"""The ``data:`` section of a training config. No torch here: reading and checking a config
(``engine.config``) stays fast, so a mistyped key is reported in a fraction of a second.

The words the schema is written in live here too, below everything that reads a config: a
closed set of values is a ``Literal``; a number's allowed values are a ``Range`` in an
``Annotated`` type (``Count``: 1, 2, ...); a choice that also takes a path is ``ChoiceOrPath``.
``engine.config`` checks each value against them as it reads it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal


@dataclass(frozen=True)
class Range:
    """A number field's allowed values as an interval, ``Range("[1, inf)")``, ``Range("(0, 1]")``;
    ``off``: one more value outside it that turns the feature off (``Range("(1, inf)", off=0)``)."""

    text: str
    off: float | None = None

    def __post_init__(self):                     # a malformed text fails at import
        assert self.text[0] in "[(" and self.text[-1] in "])" and self.bounds, self.text

    @property
    def bounds(self) -> tuple[float, float]:
        lo, hi = self.text[1:-1].split(",")
        return float(lo), float(hi)

    def __contains__(self, x) -> bool:
        (lo, hi), (a, b) = self.bounds, (self.text[0], self.text[-1])
        above = lo <= x if a == "[" else lo < x
        below = x <= hi if b == "]" else x < hi
        return x == self.off or (above and below)

    def __str__(self) -> str:                    # as the error and --list-keys say it
        lo, hi = self.bounds
        interval = (f"{'>=' if self.text[0] == '[' else '>'} {lo:g}" if hi == math.inf
                    else f"in {self.text}")
        return interval if self.off is None else f"{self.off:g} (off) or {interval}"

    def problem(self, value) -> str | None:
        return None if value in self else f"must be {self}, got {value!r}"


@dataclass(frozen=True)
class ChoiceOrPath:
    """One of a few words, or a path: ``run.resume`` is auto, none or a checkpoint. A path is
    written with a '/' or a '.' (``./cache``, ``step_8.pt``), so a mistyped word (``of``) is an
    error rather than a relative folder of that name."""

    choices: tuple[str, ...]
    path: str                               # what the path names: "a folder", "a checkpoint"

    def __str__(self) -> str:
        return " | ".join(self.choices) + f" | {self.path}"

    def problem(self, value: str) -> str | None:
        if value in self.choices or is_path(value):
            return None
        return (f"{value!r} is not one of {', '.join(self.choices)}, or {self.path} (a path has "
                f"a '/' or a '.': ./{value} for one named so here)")


def is_path(value: str) -> bool:
    return "/" in value or "." in value or value.startswith("~")


Count = Annotated[int, Range("[1, inf)")]              # 1, 2, ...
Size = Annotated[int, Range("[0, inf)")]               # 0, 1, ... (0: off, where a comment says)
Positive = Annotated[float, Range("(0, inf)")]
NonNegative = Annotated[float, Range("[0, inf)")]
Fraction = Annotated[float, Range("[0, 1)")]           # a share or a decay: 1 would be all

Dataset = Literal["imagenet", "cifar10", "cifar100", "svhn"]
SMALL_DATASETS = ("cifar10", "cifar100", "svhn")       # in memory; data.root: their files


@dataclass
class DataConfig:
    """The ``data:`` section of a training config (every field can be overridden as data.KEY=...)."""

    dataset: Dataset = "imagenet"  # imagenet (JPEG folder or file list) | cifar10 | cifar100 | svhn
    root: str | None = None        # None: the built-in default data set, generated on first use
    backend: str = "auto"          # auto (dali where it imports, else torch) | dali | torch | synthetic
    num_classes: Count | None = None  # None: read from the data set
    image_size: Count = 224        # train crop / val crop side
    val_resize: Count = 256        # val: shorter side resized to this, then center crop
    # random-resized-crop scale range lower bound (ImageNet)
    min_crop_area: Annotated[float, Range("(0, 1]")] = 0.08
    augment: bool = True           # CIFAR: pad-4 random crop + flip; ImageNet: RRC + flip
    # meanstd | zca (CIFAR) | scale (divide by 255: SVHN); ImageNet: meanstd, ImageNet's constants
    normalization: Literal["meanstd", "zca", "scale"] = "meanstd"
    mean: list | None = None       # cifar/svhn meanstd: per-channel mean, 0-255 (None: fitted)
    std: list | None = None        # cifar/svhn meanstd: per-channel std, 0-255 (None: fitted)
    workers: Size = 2              # DALI threads / DataLoader workers per process
    # dali: auto (DALI's resize on the GPU, torch's uint8 kernel on the CPU) | dali | torch
    resize_with: Literal["auto", "dali", "torch"] = "auto"
    channels_last: bool = False    # NHWC memory format for the produced images
    file_list: str | None = None   # clean list from `python -m pipelines verify`; "{split}" -> train/val
    on_bad_image: Literal["skip", "stop"] = "skip"  # skip (quarantine, substitute, go on; pipelines/quarantine.py) | stop
    max_bad_images: Size | None = None  # skip: more bad images in a split stop the run (None: 0.1% of it, at least 1)
    # skip: more shards of an s3:// pack unreadable after every retry (each one event, all its samples set aside) stop the run (None: 0.1% of the split's shards, at least 1)
    max_bad_shards: Size | None = None
    # files read ahead per process (threads): hides a parallel file system's per-open latency (an s3:// pack's per-request latency: raise it to ~ latency x images/s per process, e.g. 128-256 for S3 on a GPU node); memory: this many encoded files
    read_ahead: Count = 64
    # seconds a sample read may take before it is abandoned, tried once more, then a bad image (skip) or a stop naming the file; 0: off (pipelines/read_guard.py)
    read_timeout_s: NonNegative = 60.0
    # folder listings cached and checked by directory mtimes: auto (~/.cache/wrn_large/listings) | off | a folder
    listing_cache: Annotated[str, ChoiceOrPath(("auto", "off"), "a folder")] = "auto"
    # backend=synthetic: train samples per epoch (val: a tenth, so at least 10)
    synthetic_samples: Annotated[int, Range("[10, inf)")] = 12800
    # data.root=s3://...: a node-local folder where the pack's shards are downloaded whole in the background (checked against their SHA-256) and read from once there; None: every sample a range GET (pipelines/s3_pack.py)
    shard_cache: str | None = None
    # the training order: global (one permutation of the split) | shards (a pack's shards in a random order, shuffle_shards of them mixed at a time: from object storage, whole shards instead of a request per image; needs a pack of the default --layout mixed)
    shuffle: Literal["global", "shards"] = "global"
    shuffle_shards: Count = 16     # data.shuffle=shards: shards mixed at a time (more: batches closer to a global shuffle; the shard cache holds the whole split either way)
    svhn_extra: bool = False       # svhn: add extra_32x32.mat to the training set (paper: 604k)

    def problem(self) -> str | None:
        """What no data set can make right in a combination of this section's values, in one
        line, or None. (Each value alone was checked as it was read.)"""
        if self.dataset == "imagenet":
            if self.normalization != "meanstd":
                return (f"data.normalization={self.normalization} with data.dataset=imagenet: the "
                        f"ImageNet pipelines normalise with ImageNet's mean/std (meanstd)")
            if self.mean is not None or self.std is not None:
                return ("data.mean/data.std set the CIFAR/SVHN normalisation; ImageNet "
                        "pipelines use ImageNet's constants")
            if self.val_resize < self.image_size:
                return (f"data.val_resize={self.val_resize} is below data.image_size="
                        f"{self.image_size}: the val center crop would be larger than the image")
        if self.shuffle == "shards" and (self.dataset != "imagenet" or self.backend == "synthetic"):
            source = (self.dataset if self.dataset != "imagenet" else "the synthetic backend")
            return (f"data.shuffle=shards reads a pack's shards a few at a time; {source} has "
                    f"no shards (data.shuffle=global)")
        if self.normalization == "zca" and self.dataset not in ("cifar10", "cifar100"):
            return f"data.normalization=zca is for cifar10/cifar100, not {self.dataset}"
        for key, lowest in (("mean", 0), ("std", 1e-12)):
            value = getattr(self, key)
            if value is not None and not (
                    len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and lowest <= v <= 255 for v in value)):
                return (f"data.{key}={value}: three numbers (one per channel, 0-255"
                        f"{', above 0' if lowest else ''}), or null to fit them on the training set")
        return None
