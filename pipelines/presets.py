"""The evaluation preprocessing of an ImageNet-layout run, in one object built once from the
config, in the shape of torchvision's ``references/classification/presets.py``
``ClassificationPresetEval(*, crop_size, resize_size, mean, std, interpolation)``.

``EvalPreset`` both applies and describes it: the torch backend's val transform and
``python -m engine predict`` call it on PIL images; the DALI val graph takes its sizes and
mean/std (``torch_resize`` on the CPU path); ``python -m engine export`` writes
``describe()`` into ``meta.json``. The mean/std are the normalisation of training too.

CIFAR/SVHN are not described here: their loader holds the images in memory and normalises with
a fitted mean/std or ZCA (``small_datasets.Normalizer``).

Importing this module imports no torch (torchvision is imported on the first call).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalPreset:
    """Resize the shorter side to ``resize_size`` (antialiased ``interpolation``; the longer
    side truncated as torchvision does), centre-crop ``crop_size``, scale to [0, 1], normalise
    with ``mean``/``std`` (0-1 units, per RGB channel)."""

    crop_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"            # antialiased; the one our loaders implement

    def __post_init__(self):
        if self.interpolation != "bilinear":
            raise ValueError(f"interpolation={self.interpolation!r}: the loaders (DALI, torch) "
                             f"resize with antialiased bilinear only")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def mean_255(self) -> list[float]:
        return [m * 255 for m in self.mean]

    @property
    def std_255(self) -> list[float]:
        return [s * 255 for s in self.std]

    @cached_property
    def transform(self):
        """The torchvision v2 pipeline: PIL image (or uint8 CHW tensor) -> normalised float CHW."""
        import torch
        from torchvision.transforms import v2
        return v2.Compose([v2.PILToTensor(), v2.Resize(self.resize_size, antialias=True),
                           v2.CenterCrop(self.crop_size), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(self.mean, self.std)])

    def __call__(self, image):
        return self.transform(image)

    def describe(self) -> dict:
        """Every number of it, for a server (``meta.json``): mean/std in 0-255 units."""
        return {"resize": self.resize_size, "resize_to": "shorter side",
                "crop": self.crop_size, "crop_at": "center",
                "interpolation": f"{self.interpolation}, antialiased",
                "scale": "0-255 RGB", "mean": self.mean_255, "std": self.std_255,
                "formula": "(pixel - mean) / std, per channel"}


def eval_preset(cfg) -> EvalPreset:
    """The preset of a ``DataConfig`` (``data.image_size``, ``data.val_resize``; ImageNet's
    mean/std) for the ImageNet-layout data sets."""
    if cfg.dataset != "imagenet":
        raise ValueError(f"data.dataset={cfg.dataset!r} is normalised in memory by its loader "
                         f"(pipelines.small_datasets.Normalizer), not by an image preset")
    return EvalPreset(crop_size=cfg.image_size, resize_size=cfg.val_resize)
