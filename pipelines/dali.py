"""NVIDIA DALI ImageNet pipelines: nvJPEG ("mixed") decoding on the GPU, the same graph on the CPU.

One ``@pipeline_def`` per stage (train, val), shared by the CPU and GPU variants: the
decoder's device and ``device_id`` differ (``device_id=None`` on the CPU, nothing assumes a GPU),
and by default where the resize runs (below); ``data.resize_with=dali`` runs the GPU graph
unchanged on the CPU.

Python decides *what* is read, DALI does the heavy work. Each epoch, ``fn.external_source``
feeds the encoded bytes in the order of ``train_shard_indices`` / ``val_shard_indices``
together with each sample's augmentation parameters, computed by ``rrc_window`` (torchvision's
RandomResizedCrop algorithm, 10 attempts then a centre-crop fallback) from numbers that depend
only on (seed, epoch, sample index) (``sample_rng``). No DALI RNG is used, so:

- a resumed epoch (``set_epoch(epoch, start_batch)``) skips the first batches without reading
  them and replays the rest exactly (DALI's own random operators could not be fast-forwarded
  without pipeline checkpoints);
- a sample gets the same crop and flip whichever rank reads it, for any number of processes.

Train: ``decoders.image_slice`` decodes only the crop window (region-of-interest decoding).
Val: decode the whole image. What follows depends on ``data.resize_with`` (``resize_in_dali``):

- on the GPU (``auto``/``dali``): DALI resizes (antialiased bilinear) to ``image_size``, or
  for val to the size torchvision's ``Resize(val_resize)`` gives, and centre-crops at the
  offset torchvision's ``CenterCrop`` uses (both computed in Python, ``ValGeometry``, from
  the eval preset's sizes, ``presets.py``); one fused ``crop_mirror_normalize`` flips, crops
  and normalises to float with the preset's mean/std;
- on the CPU (``auto``/``torch``): the graph stops after decoding and ``torch_resize`` resizes,
  flips and normalises in torch's uint8 kernels, which are ~6x faster than DALI's CPU
  resampler here and are torchvision's own (results equal torchvision's tensor transforms).

Output float CHW, or channels_last NCHW when ``data.channels_last``. The last val batch may
be short: ``external_source`` takes variable batch sizes, so every image is evaluated exactly
once.

A file that cannot be read or decoded is quarantined and replaced (``data.on_bad_image=skip``,
``pipelines/quarantine.py``; DALI's pipeline, dead after a decoding error, is rebuilt at the
failing batch) or stops the run with an error that names it and tells the user to run
``python -m pipelines verify`` (``stop``); files listed by ``data.file_list`` (its output) are
all clean.
"""
from __future__ import annotations

import logging
import math
import os
from collections import deque

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.tensors import TensorListCPU, TensorListGPU

from . import torch_resize
from .base import DataConfig, EpochOrder, LoaderSpec, register_backend, shard_groups
from .presets import eval_preset
from .quarantine import (VERIFY_HINT, BadImage, BadImagePolicy, CorruptImageError,
                         TooManyBadImages)
from .read_ahead import ReadAhead
from .sample_rng import sample_uniforms
from .sources import Samples

log = logging.getLogger(__name__)


_INHERITED: list = []   # a forked child's copies of its parent's pipelines, never destroyed


def _forget_pipelines_in_a_forked_child() -> None:
    """A process forked from one with DALI pipelines (a DataLoader worker, a verify pool) has
    none of their threads: destroying a parent pipeline there (its ``__del__`` when garbage
    collected, or its C++ object's destructor) would wait for them forever. The child keeps
    the C++ objects alive and detaches them from their Python pipelines (DALI keeps weak
    references to all); fork children end with os._exit, which runs no destructor."""
    from nvidia.dali.pipeline import Pipeline
    for ref in list(Pipeline._pipes):
        pipe = ref()
        if pipe is not None and pipe._pipe is not None:
            _INHERITED.append(pipe._pipe)
            pipe._pipe = None


os.register_at_fork(after_in_child=_forget_pipelines_in_a_forked_child)
ATTEMPTS = 10  # RandomResizedCrop tries before falling back to a centre crop (as torchvision)
RATIO = (3 / 4, 4 / 3)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


# ---------------------------------------------------------------- the DALI graphs
def normalize(images, layout: str, mean: list[float], std: list[float], **crop_and_mirror):
    """Flip, crop and normalise to float in one pass (crop_mirror_normalize); mean/std in 0-255
    units (``EvalPreset.mean_255``)."""
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=mean,
                                    std=std, **crop_and_mirror)


# nvJPEG ("mixed") upsamples 4:2:0 chroma its own way unless asked to do as libjpeg-turbo (the
# CPU graph, PIL, torchvision) does: without this a model trained on GPU-decoded images is
# evaluated, predicted and exported on differently coloured ones (DALI PR #4662, issue #3610).
# bench/gpu_check.py measures what it costs on the GPU by turning it off.
JPEG_FANCY_UPSAMPLING = True


def decoder_args(decoder_device: str) -> dict:
    # ImageFolder (PIL) ignores EXIF orientation, and crop windows are in raw-frame pixels
    return dict(device=decoder_device, output_type=types.RGB, adjust_orientation=False,
                jpeg_fancy_upsampling=JPEG_FANCY_UPSAMPLING)


def decode(jpegs, decoder_device: str):
    return fn.decoders.image(jpegs, **decoder_args(decoder_device))


@pipeline_def
def imagenet_train_pipe(source, decoder_device: str, size: int, layout: str,
                        resize_in_pipe: bool, mean: list[float], std: list[float]):
    jpegs, labels, anchor, shape, flip = fn.external_source(
        source=source, num_outputs=5,
        dtype=[types.UINT8, types.INT64, types.INT32, types.INT32, types.INT32])
    crops = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="WH",
                                    normalized_anchor=False, normalized_shape=False,
                                    **decoder_args(decoder_device))
    if not resize_in_pipe:  # torch_resize finishes: resize, flip, normalise
        return crops, labels, flip
    images = fn.resize(crops, size=[size, size], antialias=True,
                       interp_type=types.INTERP_LINEAR)
    return normalize(images, layout, mean, std, mirror=flip), labels


@pipeline_def
def imagenet_val_pipe(source, decoder_device: str, crop: int, layout: str,
                      resize_in_pipe: bool, mean: list[float], std: list[float]):
    if not resize_in_pipe:  # torch_resize finishes: Resize + CenterCrop, normalise
        jpegs, labels = fn.external_source(source=source, num_outputs=2,
                                           dtype=[types.UINT8, types.INT64])
        return decode(jpegs, decoder_device), labels
    jpegs, labels, resized_hw, crop_y, crop_x = fn.external_source(
        source=source, num_outputs=5,
        dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.FLOAT])
    # the size and crop position torchvision would use, computed in Python (ValGeometry):
    # DALI's own resize_shorter / centre-crop rounding is up to a pixel off
    images = fn.resize(decode(jpegs, decoder_device), size=resized_hw, antialias=True,
                       interp_type=types.INTERP_LINEAR)
    return normalize(images, layout, mean, std, crop=(crop, crop), crop_pos_x=crop_x,
                     crop_pos_y=crop_y), labels


# ---------------------------------------------------------------- augmentation parameters
def jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, None if ``data`` is not a parsable JPEG."""
    buf = memoryview(data)  # no copy: only the header is read
    if buf[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(buf)
    while i + 9 < n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:
            i += 1
        elif marker in _SOF:
            return int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 7:i + 9], "big")
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
        else:
            i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


def jpeg_is_truncated(data: bytes) -> bool:
    """A JPEG whose bytes stop before the end-of-image marker that must follow its first scan:
    a file cut mid-scan, which nvJPEG may decode into a half-grey image without an error. Bytes
    after the marker (some cameras append data) are fine, and an EXIF thumbnail's own marker
    comes before the first scan, so it does not count. Not a JPEG: False (the decoder judges)."""
    if data[:2] != b"\xff\xd8":
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False                  # unparsable header: the decoder's error names it
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
        elif marker == 0xDA:              # start of scan: the end marker must follow
            return data.rfind(b"\xff\xd9", i) < 0
        elif marker == 0xD9:
            return True                   # an image that ends before any scan
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return True


def size_or_problem(data) -> tuple[int, int] | str:
    """(height, width) of an encoded image, or why its bytes cannot be fed."""
    if jpeg_is_truncated(data):
        return "truncated: the JPEG ends before its end-of-image marker"
    size = jpeg_size(data)
    if size is not None and size[0] > 0 and size[1] > 0:
        return size
    return pil_size_or_problem(data)


def pil_size_or_problem(data) -> tuple[int, int] | str:
    """PNG and the other formats DALI also decodes, sized by PIL; what PIL cannot open, DALI
    cannot decode."""
    import io
    from PIL import Image
    try:  # PIL refuses a header with a side of 0 as well
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except Exception as e:  # noqa: BLE001 - any failure to open is the reason
        return f"not an image ({type(e).__name__})"


def rrc_window(h: int, w: int, u: np.ndarray, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, width, height): torchvision's RandomResizedCrop.get_params with its random
    draws replaced by ``u`` (4 numbers per attempt)."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(ATTEMPTS):
        a, r, y, x = u[4 * k:4 * k + 4]
        target = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + r * (log_hi - log_lo))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(x * (w - cw + 1)), int(y * (h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def fed_size(index: int, data) -> tuple[int, int]:
    """The feed's check of a sample's bytes (``BadImagePolicy.resolve``): its (height, width),
    or ``BadImage`` with the reason DALI could not use it."""
    size = size_or_problem(data)
    if isinstance(size, str):
        raise BadImage(size)
    return size


# ---------------------------------------------------------------- feeding one epoch
class EpochSource:
    """An iterable for ``fn.external_source``: one epoch of batches in our order, the files read
    ahead by ``read_ahead``. Remembers the samples of the batches DALI has taken but not yet
    returned, to name a file that fails.

    A sample that cannot be read, or is no image or a truncated JPEG, is handled by ``policy``
    (``data.on_bad_image``, ``quarantine.BadImagePolicy``: stop with its name, or quarantine it
    and feed its substitute or nothing); without a policy, it stops the run."""

    def __init__(self, samples: Samples, order: list[int], batch_size: int, augment=None,
                 read_ahead: ReadAhead | None = None, policy: BadImagePolicy | None = None,
                 epoch: int = 0):
        self.samples, self.order, self.batch_size, self.augment = samples, order, batch_size, augment
        self.policy = policy or BadImagePolicy(samples, None, seed=0, drop_bad=False)
        self.read_ahead = read_ahead or ReadAhead(self.policy.read_one, 1)  # of read_or_error
        self.epoch = epoch
        self.in_flight: deque[list[int]] = deque()

    def __iter__(self):
        bs, policy = self.batch_size, self.policy
        wanted = [policy.wanted(i, self.epoch) for i in self.order]   # as the quarantine is now
        files = self.read_ahead(wanted)
        for start in range(0, len(self.order), bs):
            slots = self.order[start:start + bs]
            picked, data, sizes = [], [], []
            for k, slot in enumerate(slots, start):
                used = policy.resolve(slot, self.epoch, wanted[k], next(files), fed_size)
                if used is not None:
                    index, buf, size = used
                    picked.append(index)
                    data.append(np.frombuffer(buf, dtype=np.uint8))
                    sizes.append(size)
            self.in_flight.append(picked)
            batch = [data, np.array([self.samples.labels[i] for i in picked], dtype=np.int64)]
            if self.augment is not None:
                batch += self.augment(picked, sizes)
            yield tuple(batch)

    def quarantine_undecodable(self) -> bool:
        """After DALI failed: quarantine the samples in flight that do not decode; whether any."""
        from .verify import check_sample
        found = False
        for indices in self.in_flight:
            for i in indices:
                why = check_sample(self.samples, i)
                if why is not None:
                    self.policy.quarantine.add(i, why)
                    found = True
        return found

    def returned(self) -> None:
        self.in_flight.popleft()

    def explain(self, error: Exception) -> Exception:
        """The error to raise when DALI fails: names the undecodable files, or if none is found,
        the files of the batch that failed."""
        from .verify import check_sample
        describe = self.samples.describe
        bad = [(describe(i), why) for indices in self.in_flight for i in indices
               if (why := check_sample(self.samples, i)) is not None]
        if bad:
            listing = "; ".join(f"{p} ({why})" for p, why in bad)
            return CorruptImageError(f"DALI could not decode {listing}. {VERIFY_HINT}")
        batch = [describe(i) for i in self.in_flight[0]] if self.in_flight else []
        reason = dali_reason(error)
        return CorruptImageError(f"DALI failed on one of the {len(batch)} files of a batch "
                                 f"({', '.join(batch[:4])}{' ...' if len(batch) > 4 else ''}): "
                                 f"{reason}. {VERIFY_HINT}")


def dali_reason(error: Exception) -> str:
    """The informative line of a DALI error (its last one, before the boilerplate)."""
    boilerplate = ("Current pipeline object", "Critical error in pipeline", "encountered")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in reversed(lines) if not line.startswith(boilerplate)),
                str(error)[:200])


class TrainAugment:
    """Per-sample RandomResizedCrop windows and flips from (seed, epoch, sample index)."""

    def __init__(self, seed: int, epoch: int, scale: tuple[float, float], flip: bool):
        self.seed, self.epoch, self.scale, self.flip = seed, epoch, scale, flip

    def __call__(self, indices, sizes):
        u = sample_uniforms(self.seed, self.epoch, indices, 4 * ATTEMPTS + 1)
        windows = np.array([rrc_window(h, w, u[k], self.scale) for k, (h, w) in enumerate(sizes)],
                           dtype=np.int32)
        flips = (u[:, -1] < 0.5) & self.flip
        # whole-batch arrays: DALI takes them in one piece, much cheaper than per-sample lists
        return [windows[:, :2].copy(), windows[:, 2:].copy(), flips.astype(np.int32)]


def resized_size(h: int, w: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(shorter) output (height, width): the longer side is truncated."""
    if w <= h:
        return int(shorter * h / w), shorter
    return shorter, int(shorter * w / h)


class ValGeometry:
    """Per-sample resized size and centre-crop position, rounded as torchvision rounds them."""

    def __init__(self, resize: int, crop: int):
        self.resize, self.crop = resize, crop

    def __call__(self, indices, sizes):
        sizes = np.array([resized_size(h, w, self.resize) for h, w in sizes], dtype=np.float32)
        pos_y, pos_x = (np.array([self.position(int(n)) for n in sizes[:, axis]], np.float32)
                        for axis in (0, 1))
        return [sizes, pos_y, pos_x]

    def position(self, extent: int) -> float:
        """DALI's normalised crop_pos for torchvision's offset int(round((extent - crop) / 2))."""
        margin = extent - self.crop
        return int(round(margin / 2.0)) / margin if margin > 0 else 0.0


# ---------------------------------------------------------------- the Loader
def to_torch(tensor_list, dtype: torch.dtype) -> torch.Tensor:
    """A DALI batch (TensorList of uniform shape) as a torch tensor where DALI put it, as DALI's
    own iterator does: a GPU TensorList is copied into a CUDA tensor on its device, a CPU one
    (e.g. the labels of a "mixed" pipeline; it has ``as_cpu`` too) viewed as a CPU tensor."""
    if isinstance(tensor_list, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray
        device = torch.device("cuda", tensor_list.device_id())
        tensor = tensor_list.as_tensor()
        out = torch.empty(tensor.shape(), dtype=dtype, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    if not isinstance(tensor_list, TensorListCPU):
        raise TypeError(f"expected a DALI TensorList, got {type(tensor_list).__name__}")
    out = torch.from_numpy(tensor_list.as_array())
    if out.dtype != dtype:
        raise TypeError(f"DALI output of {out.dtype}, expected {dtype}")
    return out


class DaliLoader(EpochOrder):
    """A Loader (pipelines.base) over a source's samples (``pipelines.sources``: a folder, a
    verified file list, a pack); the val graph's sizes and both graphs' mean/std are the eval
    preset's (``presets.eval_preset``)."""

    def __init__(self, cfg: DataConfig, spec: LoaderSpec):
        self.cfg, self.spec = cfg, spec
        self.samples = spec.open_samples(cfg)
        if spec.quarantine is not None:
            spec.quarantine.bind(self.samples)
        self.policy = BadImagePolicy(self.samples, spec.quarantine, spec.seed,
                                     drop_bad=spec.split != "train",
                                     read_timeout_s=cfg.read_timeout_s)
        self.read_ahead = self.policy.reader(cfg.read_ahead)
        self.preset = eval_preset(cfg)   # val sizes; the normalisation of both splits
        self.dataset_size = len(self.samples)
        self.num_classes = cfg.num_classes or len(self.samples.classes)
        self.classes = self.samples.classes
        cuda = spec.device.type == "cuda"
        self.device_id = (spec.device.index if spec.device.index is not None
                          else torch.cuda.current_device()) if cuda else None
        self.decoder_device = "mixed" if cuda else "cpu"
        self.groups = shard_groups(cfg, self.samples) if spec.split == "train" else None
        self.planned_reads = getattr(self.samples, "plan", None)
        self.resize_in_pipe = resize_in_dali(cfg.resize_with, cuda)
        if not self.resize_in_pipe:
            torch_resize.keep_freed_batches_mapped()
            if not torch_resize.compiled():
                log.warning("pipelines/_normalize.c is not built (no C compiler at install?): "
                            "normalising with torch's ops, ~0.1 ms per image slower")
        self.set_epoch(0)

    def pipeline(self, source: EpochSource):
        cfg, s, cpu = self.cfg, self.spec, self.device_id is None
        common = dict(batch_size=s.batch_size, num_threads=max(1, cfg.workers),
                      device_id=self.device_id, seed=s.seed,
                      # on the CPU, DALI's dynamic executor and a third batch in flight keep
                      # both cores busy while torch resizes (+5-15%, docs/benchmarks.md)
                      exec_dynamic=cpu, prefetch_queue_depth=3 if cpu else 2)
        layout = "HWC" if cfg.channels_last else "CHW"
        p = self.preset
        graph, size = ((imagenet_train_pipe, cfg.image_size) if s.split == "train"
                       else (imagenet_val_pipe, p.crop_size))
        return graph(source, self.decoder_device, size, layout, self.resize_in_pipe,
                     p.mean_255, p.std_255, **common)

    def source(self, order: list[int]) -> EpochSource:
        s, cfg = self.spec, self.cfg
        if s.split == "train":
            augment = TrainAugment(s.seed, self.epoch, (cfg.min_crop_area, 1.0), cfg.augment)
        else:
            augment = (ValGeometry(self.preset.resize_size, self.preset.crop_size)
                       if self.resize_in_pipe else None)
        return EpochSource(self.samples, order, s.batch_size, augment, self.read_ahead,
                           self.policy, self.epoch)

    def batch(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) as the trainer wants them from one run of the pipeline."""
        cfg, device = self.cfg, self.spec.device
        labels = to_torch(outputs[1], torch.int64).view(-1).to(device, non_blocking=True)
        if self.resize_in_pipe:
            x = to_torch(outputs[0], torch.float32).to(device, non_blocking=True)
            return (x.permute(0, 3, 1, 2) if cfg.channels_last else x), labels  # NHWC view
        images = torch_resize.image_views(outputs[0])
        with torch_resize.one_thread():
            if self.spec.split == "train":
                x = torch_resize.resize_crops(images, cfg.image_size, outputs[2].as_array(),
                                              cfg.channels_last, self.preset)
            else:
                x = torch_resize.resize_center_crop(images, self.preset, cfg.channels_last)
        return x.to(device), labels

    def __iter__(self):
        bs = self.spec.batch_size
        order = self.remaining_order().tolist()
        done = 0   # batches yielded: after a decode failure under skip, rebuild from the next
        while done * bs < len(order):
            rest = order[done * bs:]
            source = self.source(rest)
            pipe = self.pipeline(source)
            pipe.build()
            try:
                for _ in range(-(-len(rest) // bs)):
                    try:
                        outputs = pipe.run()
                    except (CorruptImageError, TooManyBadImages):
                        raise                              # raised by our feed, already named
                    except RuntimeError as e:
                        # DALI cannot skip a sample (NVIDIA/DALI#1727): its pipeline is dead
                        if self.spec.quarantine is None or not source.quarantine_undecodable():
                            raise source.explain(e) from e
                        break
                    source.returned()
                    done += 1
                    yield self.batch(outputs)
            finally:
                del pipe

    def close(self) -> None:
        """Ends the read-ahead threads of an epoch left unfinished now (each epoch's end, or
        its iterator's collection, ends them anyway: ``read_ahead.ReadAhead``)."""
        self.read_ahead.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resize_in_dali(resize_with: str, cuda: bool) -> bool:
    """``data.resize_with``: auto = DALI's resize on the GPU, torch's on the CPU (faster there)."""
    if resize_with == "auto":
        return cuda
    if resize_with not in ("dali", "torch"):
        raise ValueError(f"data.resize_with={resize_with!r}: valid: auto, dali, torch")
    if resize_with == "torch" and cuda:
        raise ValueError("data.resize_with=torch resizes DALI's CPU decodes; with CUDA, DALI "
                         "decodes and resizes on the GPU: use auto or dali")
    return resize_with == "dali"


@register_backend("dali")
def dali_loader(cfg: DataConfig, spec: LoaderSpec):
    if cfg.dataset != "imagenet":
        from .small_datasets import small_dataset_loader
        return small_dataset_loader(cfg, spec)
    return DaliLoader(cfg, spec)
