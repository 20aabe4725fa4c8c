"""The resize stage of the DALI pipelines when DALI decodes on the CPU, in torch's uint8 kernels.

On the CPU, DALI's resampler is the bottleneck of the train pipeline: ~1.9 ms of CPU per
RandomResizedCrop output against ~0.3 ms for torch's antialiased bilinear uint8 kernel (AVX2),
the one torchvision's v2 transforms call on tensors (measured in docs/benchmarks.md). So on
the CPU DALI decodes (the crop window only, for train) and these functions resize, crop, flip
and normalise. The result is torchvision's tensor transforms: ``resized_crop`` /
``resize`` + ``center_crop`` with ``antialias=True``, by construction. The flip and the
normalisation run in one compiled pass (``_normalize.c``) where setup.py could build it.
"""
from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from .presets import IMAGENET_MEAN, IMAGENET_STD, EvalPreset

try:  # built by setup.py where a C compiler is found; torch's ops otherwise
    from . import _normalize as _kernel
except ImportError:
    _kernel = None


def compiled() -> bool:
    """Whether the compiled normalisation (``_normalize.c``) is in use."""
    return _kernel is not None


def image_views(tensor_list) -> list[torch.Tensor]:
    """A DALI CPU batch of HWC uint8 images of any sizes as (1, 3, H, W) channels_last views
    (no copy). The batch stride is the image size, which makes the format unambiguous to torch:
    its uint8 resize then writes channels_last without a repacking copy (the trick torchvision's
    resize plays; 0.35 -> 0.2 ms per 224x224 output here)."""
    views = []
    for t in tensor_list:
        hwc = torch.from_numpy(np.asarray(t))
        h, w, c = hwc.shape
        views.append(hwc.as_strided((1, c, h, w), (h * w * c, 1, w * c, c)))
    return views


@lru_cache(maxsize=8)
def affine(mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
    """(scale, shift), each (3, 1, 1), with x * scale + shift = (x - 255 mean) / (255 std) for
    0-255 pixels x and mean/std in 0-1 units (an ``EvalPreset``'s), and their flat contiguous
    copies for ``_kernel``."""
    scale = 1 / (torch.tensor(std).view(3, 1, 1) * 255)
    shift = -torch.tensor(mean).view(3, 1, 1) * 255 * scale
    return scale, shift, scale.flatten().contiguous(), shift.flatten().contiguous()


def resize_crops(crops: list[torch.Tensor], size: int, flips: np.ndarray,
                 channels_last: bool, preset: EvalPreset | None = None) -> torch.Tensor:
    """Train: each decoded crop window resized to ``size`` x ``size``, flipped where ``flips``
    says so, normalised with the preset's mean/std (ImageNet's without one): one float batch."""
    out = empty_batch(len(crops), size, channels_last)
    mean, std = (preset.mean, preset.std) if preset else (IMAGENET_MEAN, IMAGENET_STD)
    constants = normalization_constants(out, mean, std)
    for i, crop in enumerate(crops):
        image = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        normalize_into(out[i], image, constants, flip=bool(flips[i]))
    return out


def resize_center_crop(images: list[torch.Tensor], preset: EvalPreset,
                       channels_last: bool) -> torch.Tensor:
    """Val: the eval preset (torchvision's Resize(resize_size) + CenterCrop(crop_size), its
    mean/std) on decoded images: one float batch."""
    resize, crop = preset.resize_size, preset.crop_size
    out = empty_batch(len(images), crop, channels_last)
    constants = normalization_constants(out, preset.mean, preset.std)
    for i, image in enumerate(images):
        normalize_into(out[i], TF.center_crop(TF.resize(image, [resize], antialias=True),
                                              [crop, crop])[0], constants)
    return out


def empty_batch(n: int, size: int, channels_last: bool) -> torch.Tensor:
    """The float batch, allocated in the memory format asked for: each image is written once,
    in place (a batch-wide conversion to channels_last afterwards cost ~0.12 ms per image)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(n, 3, size, size, memory_format=memory_format)


def normalize_into(out: torch.Tensor, image: torch.Tensor, constants, flip: bool = False) -> None:
    """uint8 CHW (a channels_last view) -> float normalised with the mean/std of ``constants``,
    mirrored if ``flip``, written into ``out``. One image at a time, while it is in cache: 0.15 ms per
    224x224 image cheaper than a batch-wide pass. ``constants``: ``normalization_constants`` of
    the batch ``out`` belongs to.

    The compiled one-pass loop (``_normalize.c``) where it is built and the layouts are the
    usual ones, else torch's ops: the same values either way (tested)."""
    scale, shift, scale3, shift3 = constants
    if _kernel is not None and _kernel_layouts(out, image):
        _kernel.normalize(image.data_ptr(), image.stride(1), image.shape[1], image.shape[2],
                          out.data_ptr(), out.stride(2) == 1, scale3.data_ptr(),
                          shift3.data_ptr(), flip)
        return
    out.copy_(image.flip(-1) if flip else image).mul_(scale).add_(shift)


def _kernel_layouts(out: torch.Tensor, image: torch.Tensor) -> bool:
    """``image``: uint8 (3, h, w) with 3-byte pixels in rows; ``out``: float32 (3, h, w),
    contiguous CHW or HWC (what ``empty_batch`` makes)."""
    _, h, w = image.shape
    return (image.dtype == torch.uint8 and image.stride(0) == 1 and image.stride(2) == 3
            and image.stride(1) >= 3 * w and out.dtype == torch.float32
            and out.shape == image.shape
            and out.stride() in ((h * w, w, 1), (1, 3 * w, 3)))


def normalization_constants(batch: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                            std: tuple[float, ...] = IMAGENET_STD) -> tuple[torch.Tensor, ...]:
    """``affine(mean, std)``, its scale and shift shaped for the images of ``batch`` (torch's
    path). CHW: broadcast (3, 1, 1) constants. HWC (channels_last): full-size constants in the
    same layout, since torch's elementwise loop over a broadcast innermost dimension of 3 is
    ~5x slower."""
    shape, stride = tuple(batch.shape[1:]), batch.stride()[1:]  # one image's
    scale, shift, scale3, shift3 = affine(tuple(mean), tuple(std))
    if stride[0] != 1:
        return scale, shift, scale3, shift3
    return (*_layout_constants(shape, stride, tuple(mean), tuple(std)), scale3, shift3)


@lru_cache(maxsize=8)
def _layout_constants(shape: tuple[int, ...], stride: tuple[int, ...], mean, std):
    return tuple(torch.empty_strided(shape, stride).copy_(c.expand(shape))
                 for c in affine(mean, std)[:2])


@contextmanager
def one_thread():
    """Run the per-image ops on one torch thread: DALI's threads keep the other cores busy,
    and an OpenMP team spinning beside them cost 15-20% of throughput here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_malloc_tuned = False


def keep_freed_batches_mapped() -> None:
    """Let glibc reuse freed batch buffers instead of returning them to the OS.

    A float batch of 64 x 3 x 224 x 224 is 38 MB, above glibc's largest dynamic mmap
    threshold (32 MB), so every batch is a fresh mmap whose first touch page-faults: on this
    machine ~0.4 ms per image, more than the resize itself. Raising the mmap and trim
    thresholds (what jemalloc/tcmalloc users get by default) keeps the freed pages in the heap.
    The process keeps its peak batch memory reserved; nothing else changes."""
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): leave the allocator alone
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
