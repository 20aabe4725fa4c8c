"""A COCO-format file with the shape and quirks of the real ``instances_train2017.json``.

    python -m detection.coco_like out/ [--scale 1.0]

writes ``out/annotations/instances_train2017.json`` and ``out/train2017/*.jpg`` with, at scale 1,
the release's statistics: 118,287 images, 860,001 annotations, 80 categories with COCO's
non-contiguous ids (1..90 with 10 gaps), ~1% crowd annotations with RLE masks, ~1,000 images
without annotations, 2 boxes of height 0 and area 0 (the real file has exactly these), polygons
of 16-80 coordinates, and the common image sizes (640x480, 480x640, 640x427, ...). Boxes and
polygons lie inside their images. The images are hard links to one small JPEG of the right size
per 60,000 names (ext4 allows 65,000 links per file), so 118,287 images take ~1 MB.

For checking, loading and training at real scale where the real file cannot be downloaded; the
pixels are noise, so nothing is learnt from it.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from .coco_check import gc_paused

NUM_IMAGES = 118_287
NUM_ANNOTATIONS = 860_001
EMPTY_IMAGES = 1_021
CROWD_FRACTION = 0.0106
ZERO_HEIGHT_BOXES = 2
MISSING_CATEGORY_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
CATEGORY_IDS = [i for i in range(1, 91) if i not in MISSING_CATEGORY_IDS]
SIZES = [((640, 480), 0.45), ((480, 640), 0.15), ((640, 427), 0.2), ((427, 640), 0.05),
         ((500, 375), 0.1), ((375, 500), 0.05)]  # (width, height), share of the images
LINKS_PER_FILE = 60_000


def make_coco_like(out_dir: str, scale: float = 1.0, seed: int = 0) -> tuple[str, str]:
    """Returns ``(json_file, image_dir)``."""
    rng = np.random.default_rng(seed)
    num_images = max(10, round(NUM_IMAGES * scale))
    num_anns = max(10, round(NUM_ANNOTATIONS * scale))
    image_dir = os.path.join(out_dir, "train2017")
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)

    size_index = rng.choice(len(SIZES), num_images, p=[share for _, share in SIZES])
    image_ids = rng.choice(np.arange(1, 6 * num_images), num_images, replace=False)  # sparse
    images = [{"license": 1, "file_name": f"{int(i):012d}.jpg", "coco_url": "",
               "height": SIZES[s][0][1], "width": SIZES[s][0][0], "date_captured": "",
               "flickr_url": "", "id": int(i)} for i, s in zip(image_ids, size_index)]
    _link_images(image_dir, images, size_index, rng)

    empty = max(1, round(EMPTY_IMAGES * scale))
    owners = rng.integers(empty, num_images, num_anns)       # images [0, empty) get none
    owners[: num_images - empty] = np.arange(empty, num_images)  # every other image gets one
    crowd = rng.random(num_anns) < CROWD_FRACTION
    with gc_paused():                  # 860,001 dicts: ~30 s with the collector on
        annotations = _annotations(images, owners, crowd, rng)
    for ann in annotations[-ZERO_HEIGHT_BOXES:]:  # as the real file: height 0, area 0
        ann["bbox"][3], ann["area"], ann["iscrowd"] = 0.0, 0.0, 0
        x, y, w = ann["bbox"][:3]
        ann["segmentation"] = [[x, y, x + w, y, x + w / 2, y]]
    categories = [{"supercategory": "thing", "id": c, "name": f"category_{c}"}
                  for c in CATEGORY_IDS]
    json_file = os.path.join(ann_dir, "instances_train2017.json")
    with open(json_file, "wb") as f:
        f.write(_compact_json({
            "info": {"description": "wrn_large: COCO 2017 train-shaped synthetic file"},
            "licenses": [{"id": 1, "name": "synthetic", "url": ""}], "images": images,
            "annotations": annotations, "categories": categories}))
    return json_file, image_dir


def _compact_json(obj) -> bytes:
    """JSON without spaces, as the real file is: orjson where installed (~1 s for this ~400 MB
    file), else json's C encoder (dumps, not dump: ~14 s), which writes the same bytes."""
    try:
        import orjson
    except ImportError:
        return json.dumps(obj, separators=(",", ":")).encode()
    return orjson.dumps(obj)


def _annotations(images: list[dict], owners: np.ndarray, crowd: np.ndarray,
                 rng: np.random.Generator) -> list[dict]:
    """One annotation per entry of ``owners`` (an index into ``images``): a box inside its
    image, a polygon (an ellipse of 8-40 points in the box) or, where ``crowd``, an
    uncompressed RLE mask. Drawn for all at once: 860,001 one by one took ~40 s."""
    n_anns = len(owners)
    width = np.array([im["width"] for im in images])[owners]
    height = np.array([im["height"] for im in images])[owners]
    w = np.round(rng.uniform(4, width / 2), 2)
    h = np.round(rng.uniform(4, height / 2), 2)
    x = np.round(rng.uniform(0, width - w), 2)
    y = np.round(rng.uniform(0, height - h), 2)
    category = np.array(CATEGORY_IDS)[rng.integers(80, size=n_anns)]
    points = rng.integers(8, 41, n_anns)
    angle = rng.uniform(0, 2 * np.pi, points.sum())
    # sorted within each polygon: a row each, padded with inf (~10x faster than a lexsort of
    # the 20M points by polygon and angle, with the same result)
    rows = np.full((n_anns, points.max()), np.inf)
    filled = np.arange(points.max()) < points[:, None]
    rows[filled] = angle
    rows.sort(axis=1)
    angle = rows[filled]
    cx, cy, rx, ry = (np.repeat(v, points) for v in (x + w / 2, y + h / 2, w / 2, h / 2))
    coords = np.round(np.stack([cx + rx * np.cos(angle), cy + ry * np.sin(angle)], 1), 2)
    coords = coords.ravel().tolist()
    ends = (2 * np.cumsum(points)).tolist()
    image_id = np.array([im["id"] for im in images])[owners]
    area = np.round(w * h * 0.6, 2)
    columns = zip(image_id.tolist(), w.tolist(), h.tolist(), x.tolist(), y.tolist(),
                  area.tolist(), category.tolist(), crowd.tolist(), width.tolist(),
                  height.tolist(), [0] + ends[:-1], ends)
    annotations = []
    for k, (owner, wk, hk, xk, yk, ak, cat, is_crowd, iw, ih, start, end) in enumerate(columns):
        ann = {"id": k + 1, "image_id": owner, "category_id": cat, "bbox": [xk, yk, wk, hk],
               "area": ak, "iscrowd": int(is_crowd)}
        if is_crowd:  # uncompressed RLE, as the crowd annotations of the real file
            fg, before = int(wk * hk * 0.5), int(yk * iw)
            ann["segmentation"] = {"size": [ih, iw], "counts": [before, fg, ih * iw - before - fg]}
        else:
            ann["segmentation"] = [coords[start:end]]
        annotations.append(ann)
    return annotations


def _link_images(image_dir: str, images: list[dict], size_index: np.ndarray,
                 rng: np.random.Generator) -> None:
    sources: dict[tuple[int, int], str] = {}
    for n, (img, s) in enumerate(zip(images, size_index.tolist())):
        key = (s, n // LINKS_PER_FILE)
        if key not in sources:
            (w, h), _ = SIZES[s]
            sources[key] = os.path.join(image_dir, f".source_{w}x{h}_{key[1]}.jpg")
            pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((w, h)).save(sources[key], quality=75)
        target = os.path.join(image_dir, img["file_name"])
        if not os.path.exists(target):
            os.link(sources[key], target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the real counts (1.0 = 118,287 images)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    json_file, image_dir = make_coco_like(args.out_dir, args.scale, args.seed)
    print(f"{json_file} ({os.path.getsize(json_file) / 1e6:.0f} MB), images in {image_dir}")


if __name__ == "__main__":
    main()
