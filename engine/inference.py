"""Using a trained checkpoint: the model, its preprocessing and its class names, all read from
the checkpoint itself (the trainer saves the resolved config, ``num_classes``, ``classes`` and
``class_names`` in every checkpoint), and ``python -m engine predict``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import wrn_large
from pipelines.folder import IMAGE_EXTENSIONS

from .checkpoint import CheckpointError, load_file
from .config import Config, config_from_dict


@dataclass
class Trained:
    model: nn.Module
    cfg: Config
    classes: list[str]
    names: list[str]


def load_trained(path: str | os.PathLike, use_ema: bool = False) -> Trained:
    """A checkpoint of ``train_imagenet.py`` (a ``step_N.pt`` file) as a ready eval-mode model."""
    from wrn_large.weights import load_pretrained
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a DeepSpeed checkpoint folder: predict and export read "
                         "a step_N.pt file (engine.name=ddp); its fp32 weights load with "
                         f"wrn_large.create_model(name, pretrained='{path}/weights.pt')")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_file(path)                  # CheckpointError names an unreadable file
    if "config" not in state:
        raise ValueError(f"{path} is not a checkpoint of train_imagenet.py (no config in it); "
                         "a bare state dict loads with wrn_large.create_model(name, pretrained=...)")
    cfg = config_from_dict(state["config"], f"{path} (its config)")
    num_classes = state.get("num_classes") or state["model"]["fc.weight"].shape[0]
    model = wrn_large.create_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    load_pretrained(model, state, use_ema=use_ema)
    classes = state.get("classes") or [str(i) for i in range(num_classes)]
    names = state.get("class_names") or classes
    return Trained(model.eval(), cfg, classes, names)


def preprocess(cfg: Config):
    """PIL image -> normalised (C, H, W) tensor, as the run's validation pipeline: the eval
    preset (``pipelines.presets``) of an ImageNet-layout run, ``SmallImageTransform`` of a
    CIFAR/SVHN one. Both ``describe()`` themselves (export's ``meta.json``)."""
    if cfg.data.dataset == "imagenet":
        from pipelines.presets import eval_preset
        return eval_preset(cfg.data)
    return SmallImageTransform(cfg)


class SmallImageTransform:
    """A CIFAR/SVHN run's validation input: the image resized to ``data.image_size``, then the
    pipeline's own ``Normalizer``. What the config leaves to the training set (``data.mean``/
    ``std`` null, ZCA) is fitted from ``data.root`` as in training (ZCA from its cache)."""

    def __init__(self, cfg: Config):
        from torchvision.transforms import v2
        from pipelines.small_datasets import Normalizer
        d = cfg.data
        self.size = d.image_size
        self.resize = v2.Compose([v2.PILToTensor(),
                                  v2.Resize((self.size, self.size), antialias=True)])
        try:
            self.normalizer = Normalizer(d, torch.device("cpu"))
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"this run's {d.normalization} normalisation is fitted on its "
                             f"training set, read from data.root={d.root}: {e}") from e

    def __call__(self, image) -> torch.Tensor:
        hwc = self.resize(image).permute(1, 2, 0)
        return self.normalizer(hwc[None])[0]

    def describe(self) -> dict:
        """Every number of it, for a server (``meta.json``): mean/std in 0-255 units as the run
        used them (given, or fitted on its training set). ZCA is refused: its 3072x3072 matrix
        is no mean/std."""
        n, size = self.normalizer, self.size
        if n.kind == "zca":
            raise ValueError("export writes the preprocessing into the file as mean/std; this "
                             "run's ZCA whitening (a 3072x3072 matrix fitted on its training "
                             "set) is not: classify with python -m engine predict, which "
                             "applies it")
        mean, std = ((n.mean.tolist(), n.std.tolist()) if n.kind == "meanstd"
                     else ([0.0] * 3, [255.0] * 3))            # scale: divide by 255
        return {"resize": [size, size], "resize_to": "height and width", "crop": None,
                "interpolation": "bilinear, antialiased", "scale": "0-255 RGB",
                "mean": mean, "std": std, "formula": "(pixel - mean) / std, per channel"}


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.name.lower().endswith(IMAGE_EXTENSIONS))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not files:
        raise FileNotFoundError(f"no images in {', '.join(paths)}")
    return files


def load_images(files: list[Path], transform) -> torch.Tensor:
    from PIL import Image
    batch = []
    for f in files:
        try:
            with Image.open(f) as im:
                batch.append(transform(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"cannot read image {f}: {e}") from e
    return torch.stack(batch)


@torch.no_grad()
def predict(trained: Trained, files: list[Path], topk: int = 5, batch_size: int = 32) -> list[dict]:
    transform = preprocess(trained.cfg)
    results = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        probs = trained.model(load_images(chunk, transform)).softmax(1)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        for f, p, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({"image": str(f), "top": [
                {"class": trained.classes[k], "name": trained.names[k], "probability": q}
                for q, k in zip(p, idx)]})
    return results


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine predict",
        description="Classify images with a checkpoint of train_imagenet.py: its own model, "
                    "validation preprocessing (resize, crop, mean/std) and class names.")
    p.add_argument("checkpoint", help="a step_N.pt of a run")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("--json", action="store_true", help="one JSON list on stdout")
    a = p.parse_args(argv)
    try:
        results = predict(load_trained(a.checkpoint, a.ema), image_files(a.images), a.topk)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(r["image"])
        for t in r["top"]:
            label = t["name"] if t["name"] == t["class"] else f"{t['name']} ({t['class']})"
            print(f"  {100 * t['probability']:6.2f}%  {label}")
    return 0
