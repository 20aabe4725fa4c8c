"""Validate a COCO instances json before detectron2 reads it.

detectron2 trusts its annotation files: a box outside its image, an unknown category or a
missing image file shows up much later as a cryptic failure (or silently as bad training).
``check_coco_json`` reads the file once and tells two things apart:

- **problems** make the file unusable (not JSON, missing keys, unknown category or image ids,
  duplicate ids, boxes far outside their image, negative sizes, missing image files): one
  ``CocoFormatError`` lists them (up to ``max_problems``), each naming the file, the id and
  what is wrong;
- **quirks** are what real releases carry and detectron2 already handles (``QUIRKS``: zero or
  sub-pixel boxes, area 0, crowd regions, images without annotations, boxes a pixel past the
  border, annotations without ``iscrowd``): counted with their ids in the returned
  ``CocoReport``, never fatal, and the data is passed on unchanged, so detectron2 trains on
  exactly what it would train on by itself. ``strict=True`` turns them into problems.

The official ``instances_train2017.json`` has 2 annotations of height 0 (area 0), ~1% crowd
annotations and ~1,000 images without annotations: it passes with those counted.

    python -m detection.coco_check annotations/instances_train2017.json --images train2017/
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TOP_LEVEL_KEYS = ("images", "annotations", "categories")
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")
CHECK_VERSION = 2    # bump when the rules change: cached verdicts of older rules are not reused
IN_PROCESS_BYTES = 32 << 20  # smaller files are checked without a child process
BOX_TOLERANCE = 1.0  # pixels a box may extend past the image border (rounding in exports)

# What real releases contain and detectron2 handles: kind -> what detectron2 does with it.
QUIRKS = {
    "zero_size_box": "bbox width or height 0: kept by load_coco_json, dropped by the training "
                     "DatasetMapper (filter_empty_instances)",
    "sub_pixel_box": "bbox width or height under 1 pixel: trained on, as detectron2 does",
    "zero_area": "area 0: used only by COCO evaluation's area ranges",
    "past_border": f"bbox up to {BOX_TOLERANCE:g} pixel past the image border: clipped to the "
                   "image by detectron2's mapper",
    "crowd": "iscrowd=1 region: ignored in training, an ignore region in COCO evaluation",
    "no_iscrowd": "annotation without 'iscrowd': read as 0 (not crowd) in training",
    "image_without_annotations": "dropped from training by DATALOADER.FILTER_EMPTY_ANNOTATIONS "
                                 "(default True); evaluated as usual",
}


@contextlib.contextmanager
def gc_paused():
    """Python's cycle collector off while a COCO file's millions of dicts and lists are built
    (none of them garbage): its collections would walk the growing heap again and again, half
    of the time it takes to read train2017's annotations (orjson's parse ~9 s -> ~4 s)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class CocoFormatError(ValueError):
    """A COCO json that detectron2 must not read; ``problems`` lists what is wrong."""

    def __init__(self, json_file: str, problems: list[str], total: int | None = None):
        total = len(problems) if total is None else total
        self.json_file, self.problems, self.total = json_file, problems, total
        more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
        super().__init__(f"{json_file}: {total} problem{'s' * (total != 1)} in the COCO "
                         f"annotations:\n" + "\n".join(f"  - {p}" for p in problems) + more)


    def __reduce__(self):  # raised in a child process by check_once
        return type(self), (self.json_file, self.problems, self.total)


@dataclass
class CocoReport:
    """What ``check_coco_json`` found in a usable file."""

    json_file: str
    num_images: int
    num_annotations: int
    categories: dict[int, str]
    quirks: dict[str, list[int]] = field(default_factory=dict)  # kind -> annotation/image ids

    def summary_line(self) -> str:
        counts = ", ".join(f"{len(ids)} {kind.replace('_', ' ')}" for kind, ids in
                           self.quirks.items() if ids)
        tolerated = f"; tolerated as detectron2 does: {counts}" if counts else ""
        return (f"{self.json_file}: OK, {self.num_images} images, {self.num_annotations} "
                f"annotations, {len(self.categories)} categories{tolerated}")

    def write_quirks(self, path: str) -> None:
        """The quirks with their ids, as JSON: {kind: {"what": ..., "ids": [...]}}."""
        listing = {kind: {"what": QUIRKS[kind], "ids": ids} for kind, ids in self.quirks.items()
                   if ids}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"json_file": self.json_file, "quirks": listing}, f, indent=1)


class _Problems:
    def __init__(self, cap: int):
        self.cap, self.items, self.total = cap, [], 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.items) < self.cap:
            self.items.append(message)


def _is_int(v) -> bool:
    return type(v) is int  # not bool (a subclass of int); json gives no other int types


def _is_number(v) -> bool:
    return (type(v) is float or type(v) is int) and math.isfinite(v)


def _is_box(box) -> bool:
    return (type(box) is list and len(box) == 4
            and all(type(v) is float or type(v) is int for v in box)
            and all(map(math.isfinite, box)))


def _where(kind: str, index: int, record: dict) -> str:
    """How a problem names a record: "image id 7", else "image #3"."""
    return f"{kind} id {record['id']!r}" if "id" in record else f"{kind} #{index}"


def _usable(kind: str, index: int, record, required: tuple, problems: _Problems) -> bool:
    """Whether ``record`` is an object with every ``required`` key (else the problem is added)."""
    if type(record) is not dict:
        problems.add(f"{kind} #{index}: is a {type(record).__name__}, expected an object")
        return False
    if all(k in record for k in required):
        return True
    missing = [k for k in required if k not in record]
    note = (" (COCO evaluation needs it; box width*height is the usual value)"
            if missing == ["area"] else "")
    problems.add(f"{_where(kind, index, record)}: missing key(s) "
                 f"{', '.join(map(repr, missing))}{note}")
    return False


def check_coco_json(json_file: str, image_root: str | None = None, *, for_eval: bool = False,
                    strict: bool = False, check_files: bool = True,
                    max_problems: int = 20) -> CocoReport:
    """Raise ``CocoFormatError`` if ``json_file`` is not a usable COCO instances file; else
    return a ``CocoReport`` with the quirks it carries (module docstring).

    ``image_root``: folder the images' ``file_name`` are relative to (checked to exist unless
    ``check_files`` is False). ``for_eval``: COCO evaluation (pycocotools) also needs each
    annotation's ``area`` and ``iscrowd``; training does not. ``strict``: quirks are problems.
    """
    json_file = os.fspath(json_file)
    data = _load(json_file)
    problems = _Problems(max_problems)
    if image_root is not None and check_files and not os.path.isdir(image_root):
        raise CocoFormatError(json_file, [f"image folder {image_root} does not exist"])
    quirks: dict[str, list[int]] = {kind: [] for kind in QUIRKS}
    categories = _check_categories(data["categories"], problems)
    images = _check_images(data["images"], image_root if check_files else None, problems)
    annotated = _check_annotations(data["annotations"], categories, images, for_eval, problems,
                                   quirks)
    quirks["image_without_annotations"] = [i for i in images if i not in annotated]
    if problems.total:
        raise CocoFormatError(json_file, problems.items, problems.total)
    report = CocoReport(json_file, len(images), len(data["annotations"]), categories,
                        {k: v for k, v in quirks.items() if v})
    if strict:
        refuse_quirks(report, max_problems)
    return report


def refuse_quirks(report: CocoReport, max_problems: int = 20) -> None:
    """``--strict``: raise ``CocoFormatError`` naming each quirk of a usable file."""
    problems = _Problems(max_problems)
    for kind, ids in report.quirks.items():
        for i in ids:
            problems.add(f"{'image' if kind.startswith('image') else 'annotation'} id {i}: "
                         f"{QUIRKS[kind].split(':')[0]} (--strict)")
    if problems.total:
        raise CocoFormatError(report.json_file, problems.items, problems.total)


def check_once(json_file: str, image_root: str | None = None, *, for_eval: bool = False,
               strict: bool = False) -> CocoReport:
    """``check_coco_json``'s verdict on a usable file, computed once per file version.

    The verdict is cached under ``cache_dir()`` (never in the data folder), keyed on the file's
    path, size and mtime and the options, so a restarted or second job does not pay for it
    again; ``strict`` is applied to the verdict, so ``--strict`` after a plain run reads the
    file no more. A new check of a large file runs in a child process: parsing train2017's
    annotations takes ~4 GB, which a child returns to the OS when it exits instead of keeping
    it for the whole training (files under ``IN_PROCESS_BYTES`` are checked here).
    """
    stat = os.stat(json_file) if os.path.isfile(json_file) else None
    if stat is None:
        raise CocoFormatError(os.fspath(json_file), ["annotation file does not exist"])
    key = json.dumps([os.path.abspath(json_file), stat.st_size, stat.st_mtime_ns,
                      image_root and os.path.abspath(image_root), for_eval, CHECK_VERSION])
    cached = cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()}.json"
    report = _read_verdict(cached)
    if report is None:
        if stat.st_size < IN_PROCESS_BYTES:
            report = check_coco_json(json_file, image_root, for_eval=for_eval)
        else:
            # fork: no re-import of torch/detectron2 in the child (~6 s); train_net checks before
            # CUDA is initialised, and the child only parses JSON
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                report = pool.submit(check_coco_json, json_file, image_root,
                                     for_eval=for_eval).result()
        _write_verdict(cached, report)
    if strict:
        refuse_quirks(report)
    return report


def _read_verdict(cached: Path) -> CocoReport | None:
    """The cached verdict; None if there is none or it is damaged (then the file is checked again)."""
    if not cached.is_file():
        return None
    try:
        saved = json.loads(cached.read_text())
        saved["categories"] = {int(k): v for k, v in saved["categories"].items()}
        return CocoReport(**saved)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _write_verdict(cached: Path, report: CocoReport) -> None:
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dataclasses.asdict(report)))
        os.replace(tmp, cached)
    except OSError as e:  # an unwritable cache only costs the next job a check
        print(f"coco_check: cannot cache the verdict in {cached.parent}: {e}", file=sys.stderr)


def cache_dir() -> Path:
    """``$WRN_LARGE_CACHE/coco_check``, default ``~/.cache/wrn_large/coco_check``."""
    root = os.environ.get("WRN_LARGE_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wrn_large"
    return Path(root) / "coco_check"


def _load(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise CocoFormatError(json_file, ["annotation file does not exist"])
    try:
        with open(json_file, "rb") as f, gc_paused():
            data = _parse_json(f.read())
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
    images = data["images"]
    if images and isinstance(images[0], dict) and "coco_url" in images[0] \
            and "file_name" not in images[0]:
        raise CocoFormatError(json_file, [
            "images have 'coco_url' but no 'file_name': an LVIS file, which detectron2 reads "
            "with load_lvis_json (its builtin lvis_v1_* data sets), not as COCO instances"])
    return data


def _parse_json(raw: bytes):
    """orjson where installed (train2017: ~11 s instead of ~19 s), else the standard library.
    orjson's JSONDecodeError is a json.JSONDecodeError."""
    try:
        import orjson
    except ImportError:
        return json.loads(raw)
    return orjson.loads(raw)


def _check_categories(records: list, problems: _Problems) -> dict[int, str]:
    categories: dict[int, str] = {}
    for i, cat in enumerate(records):
        if not _usable("category", i, cat, CATEGORY_KEYS, problems):
            continue
        if not _is_int(cat["id"]):
            problems.add(f"{_where('category', i, cat)}: id must be an integer")
        elif cat["id"] in categories:
            problems.add(f"category id {cat['id']}: duplicate category id")
        else:
            categories[cat["id"]] = str(cat["name"])
    if not records:
        problems.add("'categories' is empty: a detection data set needs at least one category")
    return categories


def _check_images(records: list, image_root: str | None, problems: _Problems) -> dict[int, tuple]:
    images: dict[int, tuple] = {}
    for i, img in enumerate(records):
        if not _usable("image", i, img, IMAGE_KEYS, problems):
            continue
        where = f"image id {img['id']!r}"
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
        images[img["id"]] = (w, h)
        if image_root is not None:
            path = os.path.join(image_root, img["file_name"])
            if not os.path.isfile(path):
                problems.add(f"{where}: image file does not exist: {path}")
    return images


def _check_annotations(records: list, categories: dict, images: dict, for_eval: bool,
                       problems: _Problems, quirks: dict[str, list[int]]) -> set[int]:
    """Problems and quirks of every annotation; returns the ids of the annotated images.
    (The hot loop of a check: 860,001 times for train2017.)"""
    ann_ids: set = set()
    annotated: set = set()
    required = ANNOTATION_KEYS + (("area", "iscrowd") if for_eval else ())
    zero_area, crowd, no_iscrowd = quirks["zero_area"], quirks["crowd"], quirks["no_iscrowd"]
    for i, ann in enumerate(records):
        if not _usable("annotation", i, ann, required, problems):
            continue
        aid, image_id, category_id = ann["id"], ann["image_id"], ann["category_id"]
        if not (type(aid) is int and type(image_id) is int and type(category_id) is int):
            not_int = [k for k in ("id", "image_id", "category_id") if not _is_int(ann[k])]
            problems.add(f"annotation id {aid!r}: {', '.join(not_int)} must be integer(s)")
            continue
        if aid in ann_ids:
            problems.add(f"annotation id {aid}: duplicate annotation id")
        ann_ids.add(aid)
        annotated.add(image_id)
        if category_id not in categories:
            problems.add(f"annotation id {aid}: unknown category_id {category_id!r} "
                         f"(categories: {', '.join(map(str, sorted(categories)))})")
        size = images.get(image_id)
        if size is None:
            problems.add(f"annotation id {aid}: image_id {image_id!r} is not in 'images'")
        _check_box(aid, ann["bbox"], image_id, size, problems, quirks)
        area = ann.get("area", 1)
        if area == 0 and _is_number(area):
            zero_area.append(aid)
        elif not (_is_number(area) and area > 0):
            problems.add(f"annotation id {aid}: area must be a non-negative number, got {area!r}")
        iscrowd = ann.get("iscrowd", -1)
        if iscrowd == 1:
            crowd.append(aid)
        elif iscrowd == -1:
            no_iscrowd.append(aid)
        elif iscrowd != 0:
            problems.add(f"annotation id {aid}: iscrowd must be 0 or 1, got {iscrowd!r}")
        segm = ann.get("segmentation")
        if segm is not None and type(segm) is not list and type(segm) is not dict:
            problems.add(f"annotation id {aid}: segmentation must be a list of polygons or an "
                         "RLE object")
    return annotated


def _check_box(aid: int, box, image_id: int, image_size: tuple | None, problems: _Problems,
               quirks: dict[str, list[int]]) -> None:
    if not _is_box(box):
        problems.add(f"annotation id {aid}: bbox must be 4 finite numbers [x, y, width, height], "
                     f"got {box!r}")
        return
    x, y, bw, bh = box
    if bw < 0 or bh < 0:
        problems.add(f"annotation id {aid}: bbox {box} has a negative width or height")
        return
    if bw == 0 or bh == 0:
        quirks["zero_size_box"].append(aid)
    elif bw < 1 or bh < 1:
        quirks["sub_pixel_box"].append(aid)
    if image_size is None:
        return
    w, h = image_size
    if x >= 0 and y >= 0 and x + bw <= w and y + bh <= h:
        return
    if (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE
            or y + bh > h + BOX_TOLERANCE):
        problems.add(f"annotation id {aid}: bbox {box} (x, y, w, h) lies outside image "
                     f"{image_id} of size {w}x{h}")
    else:
        quirks["past_border"].append(aid)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_file")
    parser.add_argument("--images", help="image folder (file_name is relative to it)")
    parser.add_argument("--for-eval", "--require-area", action="store_true",
                        help="require 'area' and 'iscrowd' on every annotation (COCO "
                             "evaluation with pycocotools reads both)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse the quirks of real releases too (zero-size boxes, crowd "
                             "regions, images without annotations, ...)")
    parser.add_argument("--quirks-file", help="write the quirks with their ids to this JSON file")
    parser.add_argument("--max-problems", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        report = check_coco_json(args.json_file, args.images, for_eval=args.for_eval,
                                 strict=args.strict, max_problems=args.max_problems)
    except CocoFormatError as e:
        print(e, file=sys.stderr)
        return 1
    print(report.summary_line())
    if args.quirks_file:
        report.write_quirks(args.quirks_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
