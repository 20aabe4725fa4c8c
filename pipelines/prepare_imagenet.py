"""``python -m pipelines prepare-imagenet``: the ImageNet (ILSVRC2012) release as distributed ->
our layout (``OUT/train/<wnid>/*.JPEG``, ``OUT/val/<wnid>/*.JPEG``), without copying images.

- train: ``--train`` is the folder of the 1,000 per-class tar files (``n01440764.tar``, what
  ``ILSVRC2012_img_train.tar`` unpacks to; they are extracted into OUT/train) or of class folders
  already extracted (linked).
- val: ``--val`` is the flat folder of ``ILSVRC2012_val_00000001.JPEG``..; its labels come from
  the devkit (``--devkit ILSVRC2012_devkit_t12``: ``data/ILSVRC2012_validation_ground_truth.txt``
  holds ILSVRC2012 ids, which ``data/meta.mat`` maps to wnids; these ids are not the sorted-wnid
  order) or from Kaggle's ``--val-csv LOC_val_solution.csv`` (first wnid of each row; class names
  from ``--synsets LOC_synset_mapping.txt``).
- images are hard-linked (``--link hard``, the default: same file system) or symlinked
  (``--link sym``); a re-run skips what is already in place.
- ``OUT/classes.tsv``: index, wnid, name, in our loaders' label order (sorted wnids).

Missing or partial inputs (a label without its image, an image without a label, a class without
training images) are refused with what is missing, before anything is written; the run ends with
the per-split counts of the folder loader, checked against the inputs.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tarfile
from pathlib import Path

from .class_names import CLASSES_TSV, write_classes_tsv
from .folder import IMAGE_EXTENSIONS, scan_folder


class PrepareError(ValueError):
    pass


def devkit_labels(devkit: Path) -> tuple[list[str], dict[str, str]]:
    """(wnid of each validation image in file order, wnid -> name) from the devkit."""
    from scipy.io import loadmat
    truth = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    meta = devkit / "data" / "meta.mat"
    for path in (truth, meta):
        if not path.is_file():
            raise PrepareError(f"{path} is missing: --devkit must be the extracted "
                               "ILSVRC2012_devkit_t12 folder")
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    wnid_of, names = {}, {}
    for s in synsets:
        if int(s["num_children"]) == 0:                 # the 1,000 leaves are the classes
            wnid_of[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
            names[str(s["WNID"])] = str(s["words"])
    ids = [int(line) for line in truth.read_text().split()]
    unknown = sorted(set(ids) - set(wnid_of))
    if unknown:
        raise PrepareError(f"{truth}: ILSVRC2012 ids {unknown[:5]} are not classes in {meta}")
    return [wnid_of[i] for i in ids], names


def csv_labels(val_csv: Path, synsets: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """(image id -> wnid, wnid -> name) from Kaggle's LOC_val_solution.csv."""
    if not val_csv.is_file():
        raise PrepareError(f"{val_csv} is missing")
    with open(val_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise PrepareError(f"{val_csv}: expected the columns ImageId,PredictionString")
    labels = {r["ImageId"]: r["PredictionString"].split()[0] for r in rows}
    names = {}
    if synsets is not None:
        for line in synsets.read_text().splitlines():
            wnid, _, name = line.partition(" ")
            if wnid:
                names[wnid] = name.strip()
    return labels, names


def val_images(val: Path) -> dict[str, Path]:
    """Image id (file name without extension) -> path, for the flat validation folder."""
    if not val.is_dir():
        raise PrepareError(f"{val} is missing: --val must be the flat folder of "
                           "ILSVRC2012_val_*.JPEG")
    return {p.stem: p for p in sorted(val.iterdir())
            if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)}


def val_plan(val: Path, devkit: Path | None, val_csv: Path | None, synsets: Path | None
             ) -> tuple[dict[Path, str], dict[str, str]]:
    """(source image -> wnid, wnid -> name); refuses labels and images that do not pair up."""
    images = val_images(val)
    if devkit is not None:
        wnids, names = devkit_labels(devkit)
        # the ground truth lists the images in file order: ILSVRC2012_val_00000001 first
        labels = {f"ILSVRC2012_val_{i + 1:08d}": w for i, w in enumerate(wnids)}
    else:
        labels, names = csv_labels(val_csv, synsets)
    missing = sorted(set(labels) - set(images))
    unlabelled = sorted(set(images) - set(labels))
    if missing or unlabelled:
        raise PrepareError(
            f"{val}: {len(missing)} labelled image(s) missing (e.g. {missing[:3]}), "
            f"{len(unlabelled)} image(s) without a label (e.g. {unlabelled[:3]}); "
            f"{len(labels)} labels, {len(images)} images")
    return {images[i]: w for i, w in labels.items()}, names


def train_sources(train: Path) -> dict[str, Path]:
    """wnid -> its tar file or its folder of images."""
    if not train.is_dir():
        raise PrepareError(f"{train} is missing: --train must hold n*.tar files or class folders")
    out = {}
    for p in sorted(train.iterdir()):
        if p.is_file() and p.name.endswith(".tar"):
            out[p.name[:-4]] = p
        elif p.is_dir():
            out[p.name] = p
    if not out:
        raise PrepareError(f"{train} holds neither per-class .tar files nor class folders")
    return out


def place(src: Path, dst: Path, link: str) -> bool:
    """Link ``src`` at ``dst``; False if it is already there (a re-run)."""
    if dst.is_symlink() or dst.exists():
        same = (os.path.realpath(dst) == os.path.realpath(src)) if link == "sym" \
            else os.path.samefile(dst, src)
        if same:
            return False
        raise PrepareError(f"{dst} exists and is not {src}: remove it or choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "sym":
        dst.symlink_to(src.resolve())
    else:
        os.link(src, dst)
    return True


def extract_tar(tar_path: Path, dest: Path) -> int:
    """A class tar into ``dest`` (only image files, no paths); returns the image count."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if not (member.isfile() and name.lower().endswith(IMAGE_EXTENSIONS)):
                continue
            count += 1
            target = dest / name
            if target.exists() and target.stat().st_size == member.size:
                continue
            with tar.extractfile(member) as f, open(target.with_suffix(".part"), "wb") as out:
                out.write(f.read())
            os.replace(target.with_suffix(".part"), target)
    return count


def prepare(train: Path, val: Path, out: Path, devkit: Path | None = None,
            val_csv: Path | None = None, synsets: Path | None = None, link: str = "hard") -> dict:
    val_labels, names = val_plan(val, devkit, val_csv, synsets)
    sources = train_sources(train)
    val_classes = set(val_labels.values())
    if set(sources) != val_classes:
        raise PrepareError(
            f"train and val classes differ: {len(sources)} in {train}, {len(val_classes)} "
            f"labelled in val; only in train: {sorted(set(sources) - val_classes)[:5]}, "
            f"only in val: {sorted(val_classes - set(sources))[:5]}")
    folders = {wnid: [p for p in sorted(src.iterdir()) if p.name.lower().endswith(IMAGE_EXTENSIONS)]
               for wnid, src in sources.items() if src.is_dir()}
    empty = [str(sources[w]) for w, files in folders.items() if not files]
    if empty:
        raise PrepareError(f"class folder(s) without images: {', '.join(empty[:5])}")
    expected = {"train": sum(map(len, folders.values())), "val": len(val_labels)}
    for wnid, files in folders.items():
        for image in files:
            place(image, out / "train" / wnid / image.name, link)
    for wnid, src in sources.items():
        if wnid not in folders:
            extracted = extract_tar(src, out / "train" / wnid)
            if not extracted:
                raise PrepareError(f"{src} holds no images")
            expected["train"] += extracted
    for src, wnid in val_labels.items():
        place(src, out / "val" / wnid / src.name, link)
    classes = sorted(sources)
    write_classes_tsv(out / CLASSES_TSV, classes, names)
    counts = {}
    for split in ("train", "val"):
        samples = scan_folder(out / split)
        counts[split] = (len(samples.files), len(samples.classes))
        if counts[split] != (expected[split], len(classes)):
            raise PrepareError(f"{out / split}: {counts[split][0]} images in "
                               f"{counts[split][1]} classes, expected {expected[split]} in "
                               f"{len(classes)} (images without an image extension?)")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines prepare-imagenet",
                                description=__doc__.replace("``", "`"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="folder of n*.tar or class folders")
    p.add_argument("--val", type=Path, required=True, help="flat folder of ILSVRC2012_val_*.JPEG")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--devkit", type=Path, help="extracted ILSVRC2012_devkit_t12 folder")
    labels.add_argument("--val-csv", type=Path, help="Kaggle's LOC_val_solution.csv")
    p.add_argument("--synsets", type=Path, help="Kaggle's LOC_synset_mapping.txt (class names)")
    p.add_argument("--out", type=Path, required=True, help="the data.root to train from")
    p.add_argument("--link", choices=["hard", "sym"], default="hard",
                   help="hard links (default; same file system) or symbolic links")
    a = p.parse_args(argv)
    try:
        counts = prepare(a.train, a.val, a.out, a.devkit, a.val_csv, a.synsets, a.link)
    except (PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, (n, c) in counts.items():
        print(f"{split}: {n} images in {c} classes -> {a.out / split}")
    print(f"classes: {a.out / CLASSES_TSV}; train with data.root={a.out}")
    return 0
