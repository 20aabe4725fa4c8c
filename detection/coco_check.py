"""Validate a COCO instances json before detectron2 reads it.

detectron2 trusts its annotation files: a box outside its image, an unknown category or a
missing image file shows up much later as a cryptic failure (or silently as bad training).
``check_coco_json`` reads the file once and raises one ``CocoFormatError`` listing the problems
(up to ``max_problems``), each naming the json file, the offending id and what is wrong.

    python -m detection.coco_check annotations/instances_val.json --images val/
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

TOP_LEVEL_KEYS = ("images", "annotations", "categories")
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")
BOX_TOLERANCE = 1.0  # pixels a box may extend past the image border (rounding in exports)


class CocoFormatError(ValueError):
    """A COCO json that detectron2 must not read; ``problems`` lists what is wrong."""

    def __init__(self, json_file: str, problems: list[str], total: int | None = None):
        self.json_file, self.problems = json_file, problems
        total = len(problems) if total is None else total
        more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
        super().__init__(f"{json_file}: {total} problem{'s' * (total != 1)} in the COCO "
                         f"annotations:\n" + "\n".join(f"  - {p}" for p in problems) + more)


@dataclass
class CocoSummary:
    json_file: str
    num_images: int
    num_annotations: int
    categories: dict[int, str]


class _Problems:
    def __init__(self, cap: int):
        self.cap, self.items, self.total = cap, [], 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.items) < self.cap:
            self.items.append(message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _record_name(kind: str, index: int, record, required: tuple, problems: _Problems) -> str | None:
    """How to name ``record`` in a problem ("image id 7", else "image #3"), or None (after
    logging the problem) if it is not an object with every ``required`` key."""
    if not isinstance(record, dict):
        problems.add(f"{kind} #{index}: is a {type(record).__name__}, expected an object")
        return None
    where = f"{kind} id {record['id']!r}" if "id" in record else f"{kind} #{index}"
    missing = [k for k in required if k not in record]
    if missing:
        note = (" (COCO evaluation needs it; box width*height is the usual value)"
                if missing == ["area"] else "")
        problems.add(f"{where}: missing key(s) {', '.join(map(repr, missing))}{note}")
        return None
    return where


def check_coco_json(json_file: str, image_root: str | None = None, *, require_area: bool = False,
                    check_files: bool = True, max_problems: int = 20) -> CocoSummary:
    """Raise ``CocoFormatError`` if ``json_file`` is not a usable COCO instances file.

    ``image_root``: folder the images' ``file_name`` are relative to (checked to exist unless
    ``check_files`` is False). ``require_area``: COCO evaluation (pycocotools) needs each
    annotation's ``area``; training does not.
    """
    json_file = os.fspath(json_file)
    if not os.path.isfile(json_file):
        raise CocoFormatError(json_file, ["annotation file does not exist"])
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(json_file, [f"not valid JSON: {e}"]) from e
    if not isinstance(data, dict):
        raise CocoFormatError(json_file, [f"top level is a {type(data).__name__}, expected an "
                                          f"object with keys {', '.join(TOP_LEVEL_KEYS)}"])
    bad_top = [f"missing top-level key '{k}'" if k not in data else
               f"top-level '{k}' is a {type(data[k]).__name__}, expected a list"
               for k in TOP_LEVEL_KEYS if not isinstance(data.get(k), list)]
    if bad_top:
        raise CocoFormatError(json_file, bad_top)

    problems = _Problems(max_problems)
    if image_root is not None and check_files and not os.path.isdir(image_root):
        raise CocoFormatError(json_file, [f"image folder {image_root} does not exist"])

    categories: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        where = _record_name("category", i, cat, CATEGORY_KEYS, problems)
        if where is None:
            continue
        if not _is_int(cat["id"]):
            problems.add(f"{where}: id must be an integer")
        elif cat["id"] in categories:
            problems.add(f"category id {cat['id']}: duplicate category id")
        else:
            categories[cat["id"]] = str(cat["name"])
    if not data["categories"]:
        problems.add("'categories' is empty: a detection data set needs at least one category")

    images: dict[int, tuple] = {}
    for i, img in enumerate(data["images"]):
        where = _record_name("image", i, img, IMAGE_KEYS, problems)
        if where is None:
            continue
        if not _is_int(img["id"]):
            problems.add(f"{where}: id must be an integer")
            continue
        if img["id"] in images:
            problems.add(f"{where}: duplicate image id")
            continue
        w, h = img["width"], img["height"]
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            problems.add(f"{where}: width/height must be positive integers, got {w!r}x{h!r}")
            continue
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            problems.add(f"{where}: file_name must be a non-empty string")
            continue
        images[img["id"]] = (img["file_name"], w, h)
        if image_root is not None and check_files:
            path = os.path.join(image_root, img["file_name"])
            if not os.path.isfile(path):
                problems.add(f"{where}: image file does not exist: {path}")

    ann_ids: set = set()
    required = ANNOTATION_KEYS + (("area",) if require_area else ())
    for i, ann in enumerate(data["annotations"]):
        where = _record_name("annotation", i, ann, required, problems)
        if where is None:
            continue
        not_int = [k for k in ("id", "image_id", "category_id") if not _is_int(ann[k])]
        if not_int:
            problems.add(f"{where}: {', '.join(not_int)} must be integer(s)")
            continue
        if ann["id"] in ann_ids:
            problems.add(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if ann["category_id"] not in categories:
            problems.add(f"{where}: unknown category_id {ann['category_id']!r} (categories: "
                         f"{', '.join(map(str, sorted(categories)))})")
        image = images.get(ann["image_id"])
        if image is None:
            problems.add(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
            problems.add(f"{where}: bbox must be 4 finite numbers [x, y, width, height], "
                         f"got {box!r}")
            continue
        x, y, bw, bh = box
        if bw <= 0 or bh <= 0:
            problems.add(f"{where}: bbox {box} has non-positive width or height")
        elif image is not None:
            _, w, h = image
            if (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE
                    or y + bh > h + BOX_TOLERANCE):
                problems.add(f"{where}: bbox {box} (x, y, w, h) lies outside image "
                             f"{ann['image_id']} of size {w}x{h}")
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            problems.add(f"{where}: area must be a non-negative number, got {ann['area']!r}")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            problems.add(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        segm = ann.get("segmentation")
        if segm is not None and not isinstance(segm, (list, dict)):
            problems.add(f"{where}: segmentation must be a list of polygons or an RLE object")

    if problems.total:
        raise CocoFormatError(json_file, problems.items, problems.total)
    return CocoSummary(json_file, len(images), len(data["annotations"]), categories)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_file")
    parser.add_argument("--images", help="image folder (file_name is relative to it)")
    parser.add_argument("--require-area", action="store_true",
                        help="require 'area' on every annotation (COCO evaluation needs it)")
    parser.add_argument("--max-problems", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        s = check_coco_json(args.json_file, args.images, require_area=args.require_area,
                            max_problems=args.max_problems)
    except CocoFormatError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{s.json_file}: OK, {s.num_images} images, {s.num_annotations} annotations, "
          f"{len(s.categories)} categories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
