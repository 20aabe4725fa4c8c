"""CIFAR-10/100 and SVHN from their standard on-disk formats, held in memory.

- ``cifar10``: ``root`` = the extracted ``cifar-10-batches-py`` (``data_batch_1..5``,
  ``test_batch``: pickled dicts with ``data`` (N, 3072) uint8 rows in CHW order and ``labels``).
- ``cifar100``: ``root`` = the extracted ``cifar-100-python`` (``train``, ``test`` with
  ``fine_labels``).
- ``svhn``: ``root`` holds ``train_32x32.mat`` / ``test_32x32.mat`` (scipy.io format; ``X`` is
  32x32x3xN uint8, ``y`` is Nx1 with 10 meaning digit 0); ``data.svhn_extra=true`` adds
  ``extra_32x32.mat`` to the training set (the paper's 604k-image setting).

The whole set sits on ``spec.device`` as uint8 (150 MB for CIFAR) and every batch is gathered,
normalised and augmented there with vectorised tensor ops: no decoding, no workers. The same
loader serves every backend (``torch`` and ``dali``): for 32x32 images already in memory a DALI
graph has nothing to decode and would only add a host round trip.

Normalisation (``data.normalization``), fitted on the training split:
``meanstd`` per-channel mean/std on the 0-255 scale (``data.mean``/``data.std``, else fitted);
``zca`` as pylearn2's ``make_cifar10_gcn_whitened.py``, the paper's ZCA inputs: global contrast
normalisation of each image (L2 norm ``GCN_SCALE``), then ZCA whitening with ``filter_bias``
``ZCA_FILTER_BIAS`` (fitted once and cached next to the data, or under ``~/.cache/wrn_large``
when ``root`` is read-only); ``scale`` divides by 255 (SVHN).
Augmentation (``data.augment``, the paper's): reflect-pad 4, random 32x32 crop, horizontal flip,
applied after normalisation, with each sample's crop and flip a function of
(seed, epoch, sample index) (``sample_rng``), so resumes and any process count replay exactly.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import DataConfig, EpochOrder, LoaderSpec
from .folder import url_scheme
from .sample_rng import sample_uniforms

PAD = 4
# pylearn2's make_cifar10_gcn_whitened.py, which made the paper's ZCA inputs (the official
# README, "CIFAR-10 whitened (using pylearn2)"): CIFAR10(gcn=55.), then ZCA() with its default
# filter_bias 0.1
GCN_SCALE = 55.0
ZCA_FILTER_BIAS = 0.1
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: data.root must be the extracted CIFAR python "
                                f"directory (cifar-10-batches-py or cifar-100-python)")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar(root: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batches = [_unpickle(root / name) for name in files]
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # NHWC


def _svhn(root: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat
    images, labels = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: data.root must hold the SVHN cropped-digit "
                                    f"files train_32x32.mat and test_32x32.mat")
        mat = loadmat(path)
        images.append(np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2)))  # 32x32x3xN -> NHWC
        y = mat["y"].reshape(-1).astype(np.int64)
        labels.append(np.where(y == 10, 0, y))
    return np.concatenate(images), np.concatenate(labels)


def load_arrays(dataset: str, root: str, split: str, svhn_extra: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels int64) of one split, as stored on disk."""
    root = Path(root)
    train = split == "train"
    if dataset == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        return _cifar(root, files, b"labels")
    if dataset == "cifar100":
        return _cifar(root, ["train" if train else "test"], b"fine_labels")
    if dataset == "svhn":
        names = (["train_32x32.mat"] + (["extra_32x32.mat"] if svhn_extra else [])
                 if train else ["test_32x32.mat"])
        return _svhn(root, names)
    raise ValueError(f"unknown dataset {dataset!r}; valid: imagenet, {', '.join(NUM_CLASSES)}")


@functools.lru_cache(maxsize=4)
def _train_arrays(dataset: str, root: str, svhn_extra: bool):
    return load_arrays(dataset, root, "train", svhn_extra)


def _zca_cache_path(dataset: str, root: Path, key: str) -> Path:
    name = f".zca_{dataset}_{key}.pt"
    if os.access(root, os.W_OK):
        return root / name
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wrn_large"
    cache.mkdir(parents=True, exist_ok=True)
    return cache / name


def global_contrast_normalize(x: torch.Tensor, scale: float = GCN_SCALE,
                              min_divisor: float = 1e-8) -> torch.Tensor:
    """pylearn2's ``global_contrast_normalize`` with its defaults (subtract_mean, L2 norm,
    sqrt_bias 0): each row minus its mean, scaled to L2 norm ``scale``; a constant row stays 0."""
    x = x - x.mean(1, keepdim=True)
    norm = torch.sqrt((x * x).sum(1, keepdim=True)) / scale
    return x / torch.where(norm < min_divisor, torch.ones_like(norm), norm)


def fit_zca(x: torch.Tensor, filter_bias: float = ZCA_FILTER_BIAS
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """pylearn2's ``ZCA.fit`` for rows ``x`` (N, D): (mean (D,), P (D, D)) with
    whitened = (x - mean) @ P and P = U diag(1/sqrt(s)) U^T for the eigen-decomposition
    U diag(s) U^T of ``cov + filter_bias * I`` (cov divided by N). With fewer rows than columns
    the same P comes from the N x N Gram matrix (P = I/sqrt(b) + V diag(1/sqrt(s + b) -
    1/sqrt(b)) V^T over the covariance's non-null space)."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    x = x - mean
    if n >= d:
        s, u = torch.linalg.eigh(x.T @ x / n)
        w = (u * (1.0 / torch.sqrt(s.clamp(min=0) + filter_bias))) @ u.T
        return mean.float(), w.float()
    g, v = torch.linalg.eigh(x @ x.T)          # X X^T = V diag(g) V^T, g = n * cov eigenvalues
    keep = g > g.max() * 1e-10
    u = x.T @ (v[:, keep] / torch.sqrt(g[keep]))  # orthonormal eigenvectors of the covariance
    scale = 1.0 / torch.sqrt(g[keep] / n + filter_bias) - 1.0 / np.sqrt(filter_bias)
    w = (u * scale) @ u.T + torch.eye(d, dtype=x.dtype) / np.sqrt(filter_bias)
    return mean.float(), w.float()


def as_rows(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> float rows in CHW order (the CIFAR pickles' layout)."""
    return images.permute(0, 3, 1, 2).reshape(len(images), -1).float()


def zca_cached(dataset: str, root: str, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The ZCA of the GCN'd training images, fitted once and kept next to the data."""
    key = hashlib.sha1(images[:: max(1, len(images) // 64)].tobytes()
                       + str((images.shape, GCN_SCALE, ZCA_FILTER_BIAS)).encode()).hexdigest()[:12]
    path = _zca_cache_path(dataset, Path(root), key)
    if path.is_file():
        saved = torch.load(path)
        return saved["mean"], saved["w"]
    rows = global_contrast_normalize(as_rows(torch.from_numpy(images)).double())
    mean, w = fit_zca(rows)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"mean": mean, "w": w}, tmp)
    os.replace(tmp, path)  # atomic: concurrent ranks write the same content
    return mean, w


class Normalizer:
    """uint8 NHWC batch -> normalised float NCHW (a channels_last view)."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        self.kind = cfg.normalization
        if self.kind == "scale":
            return
        if self.kind == "meanstd":
            mean, std = cfg.mean, cfg.std
            if mean is None or std is None:
                train, _ = _train_arrays(cfg.dataset, str(cfg.root), cfg.svhn_extra)
                x = torch.from_numpy(train).reshape(-1, 3).double()
                mean = x.mean(0).tolist() if mean is None else mean
                std = x.std(0).tolist() if std is None else std
            self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
            self.std = torch.tensor(std, dtype=torch.float32, device=device)
        elif self.kind == "zca":
            train, _ = _train_arrays(cfg.dataset, str(cfg.root), cfg.svhn_extra)
            mean, w = zca_cached(cfg.dataset, str(cfg.root), train)
            self.mean, self.w = mean.to(device), w.to(device)
        else:
            raise ValueError(f"unknown normalization {self.kind!r}; valid: meanstd, zca, scale")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float()
        if self.kind == "scale":
            x = x / 255
        elif self.kind == "meanstd":
            x = (x - self.mean) / self.std
        else:
            n, h, w, c = x.shape
            rows = global_contrast_normalize(as_rows(x))
            x = ((rows - self.mean) @ self.w).view(n, c, h, w).permute(0, 2, 3, 1)
        return x.permute(0, 3, 1, 2)


def pad_crop_flip(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Reflect-pad by PAD, crop back to the input size at offsets from u[:, 0:2], mirror where
    u[:, 2] < 0.5. x: (N, C, H, W); u: (N, 3) in [0, 1). Returns (N, C, H, W) (channels_last)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    oy = (u[:, 0] * (2 * PAD + 1)).long()
    ox = (u[:, 1] * (2 * PAD + 1)).long()
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    flip = (u[:, 2] < 0.5)[:, None]
    rows = oy[:, None] + ar_h
    cols = ox[:, None] + torch.where(flip, w - 1 - ar_w, ar_w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


class InMemoryLoader(EpochOrder):
    """A Loader (pipelines.base) over a uint8 NHWC tensor held on the device."""

    def __init__(self, cfg: DataConfig, spec: LoaderSpec):
        images, labels = (_train_arrays(cfg.dataset, str(cfg.root), cfg.svhn_extra)
                          if spec.split == "train" else load_arrays(cfg.dataset, cfg.root, "val"))
        self.spec, self.cfg = spec, cfg
        self.images = torch.from_numpy(images).to(spec.device)
        self.labels = torch.from_numpy(labels).to(spec.device)
        self.dataset_size = len(self.images)
        self.num_classes = cfg.num_classes or NUM_CLASSES[cfg.dataset]
        self.normalize = Normalizer(cfg, spec.device)
        self.augment = cfg.augment and spec.split == "train"
        self.set_epoch(0)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        on_device = indices.to(self.spec.device)
        x = self.normalize(self.images[on_device])
        if self.augment:
            u = sample_uniforms(self.spec.seed, self.epoch, indices.numpy(), 3)
            x = pad_crop_flip(x, torch.from_numpy(u).to(self.spec.device))
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), self.labels[on_device]

    def __iter__(self):
        bs = self.spec.batch_size
        for b in range(self.start_batch, len(self)):
            yield self.batch(self.order[b * bs:(b + 1) * bs])


def small_dataset_loader(cfg: DataConfig, spec: LoaderSpec) -> InMemoryLoader:
    if cfg.root is None:
        raise ValueError(f"data.root must point at the {cfg.dataset} files (see pipelines/README.md)")
    if url_scheme(cfg.root):
        raise ValueError(f"data.root={cfg.root}: {cfg.dataset} is read from a local folder, "
                         f"not a {url_scheme(cfg.root)}:// URL")
    return InMemoryLoader(cfg, spec)
