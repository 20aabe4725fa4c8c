"""The ``data:`` section of a training config. No torch here: reading and checking a config
(``engine.config``) stays fast, so a mistyped key is reported in a fraction of a second."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """The ``data:`` section of a training config (every field can be overridden as data.KEY=...)."""

    dataset: str = "imagenet"      # imagenet (JPEG folder or file list) | cifar10 | cifar100 | svhn
    root: str | None = None        # None: the built-in default data set, generated on first use
    backend: str = "auto"          # auto (dali where it imports, else torch) | dali | torch | synthetic
    num_classes: int | None = None  # None: read from the data set
    image_size: int = 224          # train crop / val crop side
    val_resize: int = 256          # val: shorter side resized to this, then center crop
    min_crop_area: float = 0.08    # random-resized-crop scale range lower bound (ImageNet)
    augment: bool = True           # CIFAR: pad-4 random crop + flip; ImageNet: RRC + flip
    normalization: str = "meanstd"  # meanstd | zca (CIFAR) | scale (divide by 255: SVHN)
    mean: list | None = None       # cifar/svhn meanstd: per-channel mean, 0-255 (None: fitted)
    std: list | None = None        # cifar/svhn meanstd: per-channel std, 0-255 (None: fitted)
    workers: int = 2               # DALI threads / DataLoader workers per process
    resize_with: str = "auto"      # dali: auto (DALI's resize on the GPU, torch's uint8 kernel on the CPU) | dali | torch
    channels_last: bool = False    # NHWC memory format for the produced images
    file_list: str | None = None   # clean list from `python -m pipelines verify`; "{split}" -> train/val
    on_bad_image: str = "skip"     # skip (quarantine, substitute, go on; pipelines/quarantine.py) | stop
    max_bad_images: int | None = None  # skip: more bad images in a split stop the run (None: 0.1% of it, at least 1)
    read_ahead: int = 64           # files read ahead per process (threads): hides a parallel file system's per-open latency; memory: this many encoded files
    listing_cache: str = "auto"    # folder listings cached and checked by directory mtimes: auto (~/.cache/wrn_large/listings) | off | a folder
    synthetic_samples: int = 12800  # backend=synthetic: train samples per epoch (val: a tenth)
    svhn_extra: bool = False       # svhn: add extra_32x32.mat to the training set (paper: 604k)
