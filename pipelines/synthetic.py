"""Synthetic data for throughput tests: one random batch per rank, generated on the device and
served ``synthetic_samples // global batch`` times per epoch (no decoding, no host copies)."""
from __future__ import annotations

import torch

from .base import DataConfig, LoaderSpec, register_backend


class SyntheticLoader:
    def __init__(self, cfg: DataConfig, spec: LoaderSpec):
        self.spec, self.num_classes = spec, cfg.num_classes or 1000
        g = torch.Generator().manual_seed(spec.seed * 1000 + spec.rank)
        size = cfg.image_size
        images = torch.randn(spec.batch_size, 3, size, size, generator=g)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.batch = (images.to(spec.device),
                      torch.randint(0, self.num_classes, (spec.batch_size,), generator=g).to(spec.device))
        total = cfg.synthetic_samples if spec.split == "train" else cfg.synthetic_samples // 10
        per_rank = total // spec.world_size
        self.batches = per_rank // spec.batch_size
        self.num_samples = self.batches * spec.batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.start_batch, self.batches):
            yield self.batch


@register_backend("synthetic")
def synthetic_loader(cfg: DataConfig, spec: LoaderSpec) -> SyntheticLoader:
    return SyntheticLoader(cfg, spec)
