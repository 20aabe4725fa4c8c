"""A small COCO-format detection data set of drawn shapes, for CPU demos and tests.

    python -m detection.make_coco toy_coco --num-train 64 --num-val 16

writes ``toy_coco/{train,val}/*.jpg`` and ``toy_coco/annotations/instances_{train,val}.json``:
1-4 non-overlapping filled shapes per image (category 1 "rectangle", 2 "ellipse",
3 "triangle", each in its own colour family) on a noisy background, with exact boxes, areas and
polygon segmentations. The files pass ``detection.coco_check``.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "rectangle", "supercategory": "shape"},
              {"id": 2, "name": "ellipse", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape"}]
_BASE_COLOURS = {1: (220, 50, 40), 2: (40, 200, 60), 3: (50, 90, 230)}


def _polygon(cat: int, x: int, y: int, w: int, h: int) -> list[float]:
    x1, y1 = x + w - 1, y + h - 1
    if cat == 1:
        pts = [(x, y), (x1, y), (x1, y1), (x, y1)]
    elif cat == 2:
        cx, cy, rx, ry = x + (w - 1) / 2, y + (h - 1) / 2, (w - 1) / 2, (h - 1) / 2
        pts = [(cx + rx * math.cos(t), cy + ry * math.sin(t))
               for t in np.linspace(0, 2 * math.pi, 16, endpoint=False)]
    else:
        pts = [(x, y1), (x1, y1), (x + (w - 1) / 2, y)]
    return [round(float(c), 2) for p in pts for c in p]


def _draw(draw: ImageDraw.ImageDraw, cat: int, x: int, y: int, w: int, h: int, colour) -> None:
    box = [x, y, x + w - 1, y + h - 1]
    if cat == 1:
        draw.rectangle(box, fill=colour)
    elif cat == 2:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(x, y + h - 1), (x + w - 1, y + h - 1), (x + (w - 1) / 2, y)], fill=colour)


def _overlaps(a, b, margin: int = 2) -> bool:
    return not (a[0] + a[2] + margin <= b[0] or b[0] + b[2] + margin <= a[0]
                or a[1] + a[3] + margin <= b[1] or b[1] + b[3] + margin <= a[1])


def make_split(out_dir: str, split: str, num_images: int, size: tuple[int, int] = (128, 128),
               seed: int = 0, min_obj: int = 16, max_obj: int = 56) -> str:
    """Write one split; returns the path of its instances json."""
    rng = np.random.RandomState(seed)
    width, height = size
    max_obj = min(max_obj, width - 1, height - 1)
    img_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        background = rng.randint(0, 90, 3)
        pixels = background + rng.randint(-20, 21, (height, width, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        boxes = []
        for _ in range(rng.randint(1, 5)):
            for _attempt in range(20):
                w, h = (int(v) for v in rng.randint(min_obj, max_obj + 1, 2))
                x, y = int(rng.randint(0, width - w + 1)), int(rng.randint(0, height - h + 1))
                if not any(_overlaps((x, y, w, h), b) for b in boxes):
                    break
            else:
                continue
            cat = int(rng.randint(1, 4))
            colour = tuple(int(np.clip(c + rng.randint(-35, 36), 0, 255))
                           for c in _BASE_COLOURS[cat])
            _draw(draw, cat, x, y, w, h, colour)
            boxes.append((x, y, w, h))
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0,
                "segmentation": [_polygon(cat, x, y, w, h)]})
        file_name = f"{split}_{i:05d}.jpg"
        img.save(os.path.join(img_dir, file_name), quality=92)
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
    json_file = os.path.join(ann_dir, f"instances_{split}.json")
    with open(json_file, "w") as f:
        json.dump({"info": {"description": f"wrn_large toy shapes ({split})", "version": "1.0"},
                   "licenses": [], "images": images, "annotations": annotations,
                   "categories": CATEGORIES}, f)
    return json_file


def make_coco(out_dir: str, num_train: int = 64, num_val: int = 16,
              size: tuple[int, int] = (128, 128), seed: int = 0) -> dict[str, tuple[str, str]]:
    """Both splits; returns ``{split: (json_file, image_dir)}``."""
    out = {}
    for split, n, s in (("train", num_train, seed), ("val", num_val, seed + 1000)):
        if n > 0:
            out[split] = (make_split(out_dir, split, n, size, s), os.path.join(out_dir, split))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, (json_file, image_dir) in make_coco(args.out_dir, args.num_train, args.num_val,
                                                   tuple(args.size), args.seed).items():
        print(f"{split}: {json_file} (images in {image_dir})")


if __name__ == "__main__":
    main()
