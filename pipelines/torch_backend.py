"""The torchvision baseline: ImageFolder-style JPEG reading with PIL + transforms v2 in a
DataLoader, the loader most users know. Deterministic by construction: the order comes from
``train_shard_indices`` and each sample's random crop/flip from a generator seeded by
(seed, epoch, sample index), so a resumed epoch replays exactly and the global RNG is untouched.

A file that cannot be decoded stops the run with an error naming it and the command that
writes a clean file list (`python -m pipelines verify`)."""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .base import DataConfig, EpochOrder, LoaderSpec, register_backend
from .folder import Samples, load_samples

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptImageError(RuntimeError):
    pass


def imagenet_transform(cfg: DataConfig, split: str) -> v2.Compose:
    if split == "train":
        geometry = [v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_area, 1.0),
                                         antialias=True)]
        if cfg.augment:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [v2.Resize(cfg.val_resize, antialias=True), v2.CenterCrop(cfg.image_size)]
    return v2.Compose([v2.PILToTensor(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageFiles(Dataset):
    def __init__(self, samples: Samples, transform, seed: int):
        self.samples, self.transform, self.seed = samples, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path = self.samples.root / self.samples.files[index]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except Exception as e:
            raise CorruptImageError(
                f"cannot decode {path}: {type(e).__name__}: {e}. Run `python -m pipelines verify "
                f"{self.samples.root.parent}` and train with the clean list it writes "
                f"(data.file_list=...)") from e
        with torch.random.fork_rng(devices=[]):  # per-sample RNG, global stream untouched
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image), self.samples.labels[index]


class IndexedLoader(EpochOrder):
    """A Loader (pipelines.base) over any map-style dataset of (image, label) pairs."""

    def __init__(self, dataset, spec: LoaderSpec, num_classes: int, workers: int,
                 channels_last: bool):
        self.dataset, self.spec, self.num_classes = dataset, spec, num_classes
        self.workers, self.channels_last = workers, channels_last
        self.dataset_size = len(dataset)
        self.set_epoch(0)

    def __iter__(self):
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = self.epoch
        order = self.remaining_order().tolist()
        loader = DataLoader(self.dataset, batch_size=self.spec.batch_size, sampler=order,
                            num_workers=self.workers, pin_memory=self.spec.device.type == "cuda",
                            generator=torch.Generator(), persistent_workers=False)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in loader:
            images = images.to(self.spec.device, non_blocking=True, memory_format=memory_format)
            yield images, labels.to(self.spec.device, non_blocking=True)


@register_backend("torch")
def torch_loader(cfg: DataConfig, spec: LoaderSpec) -> IndexedLoader:
    if cfg.dataset != "imagenet":
        from .small_datasets import small_dataset_loader
        return small_dataset_loader(cfg, spec)
    samples = load_samples(cfg.root, spec.split, cfg.file_list)
    dataset = ImageFiles(samples, imagenet_transform(cfg, spec.split), spec.seed)
    loader = IndexedLoader(dataset, spec, cfg.num_classes or len(samples.classes), cfg.workers,
                           cfg.channels_last)
    loader.classes = samples.classes
    return loader
