"""The built-in demo data set: an ImageNet-layout JPEG folder of 10 shape classes.

Each image is a coloured shape (the class) at a random position, size and colour over a noisy
random background, so colour tells nothing and a network must learn shapes: a small WRN learns
it to well above chance in a few CPU minutes, yet it is not solved in one epoch.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "cross", "ring", "diamond", "hbars", "vbars",
           "checker", "star"]
DEFAULT_DIR = "data/default_imagenet"
SIZE = 80


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape in ("hbars", "vbars"):
        step = max(2 * r / 5, 2)
        for i in range(0, 5, 2):
            a = -r + i * step
            rect = ([cx - r, cy + a, cx + r, cy + a + step] if shape == "hbars"
                    else [cx + a, cy - r, cx + a + step, cy + r])
            draw.rectangle(rect, fill=colour)
    elif shape == "checker":
        cell = r / 2
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * cell, cy - r + j * cell
                    draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=colour)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5))
                  for k in range(10)]
        draw.polygon(points, fill=colour)


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    colour = tuple(int(c) for c in (background + 128 + rng.integers(-60, 60, 3)) % 256)
    r = rng.uniform(0.18, 0.38) * SIZE
    cx, cy = rng.uniform(r, SIZE - r, 2)
    _draw(ImageDraw.Draw(img), CLASSES[label], cx, cy, r, colour)
    return img


def generate(root: str | os.PathLike, train_per_class: int = 260, val_per_class: int = 50,
             seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(label, rng).save(folder / f"{name}_{i:04d}.JPEG", quality=90)
    return root


def ensure_default_dataset(root: str | os.PathLike | None = None) -> str:
    """The demo data set's path, generating it on first use. Safe when several processes call
    it at once: each generates into a temporary folder and only the first rename wins."""
    root = Path(root or os.environ.get("WRN_DEFAULT_DATA") or DEFAULT_DIR).resolve()
    if (root / "val").is_dir():
        return str(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        generate(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not (root / "val").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(root)
