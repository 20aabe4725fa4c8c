"""python -m pipelines prepare-imagenet on small fakes of the release: per-class train tars or
folders, the flat val folder with the devkit (whose ILSVRC2012 ids are not the sorted-wnid
order) or Kaggle's LOC_val_solution.csv. Each image's colour encodes its true class, so the
test reads the labels back through our folder loader."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines.folder import scan_folder
from trainer_utils import REPO

# ILSVRC2012 ids 1..4 in the devkit's order (not sorted by wnid), plus two inner synsets
CLASSES = [(1, "n04000001", "zebra"), (2, "n01000002", "tench, Tinca tinca"),
           (3, "n03000003", "garbage truck"), (4, "n02000004", "goldfish")]
INNER = [(5, "n00000005", "animal"), (6, "n00000006", "entity")]
VAL_IDS = [3, 1, 4, 4, 2, 1, 3, 2, 1]          # ground truth of val images 1..9


def colour(wnid: str) -> tuple[int, int, int]:
    i = [c[1] for c in CLASSES].index(wnid)
    return (40 + 60 * i, 200 - 40 * i, 90)


def jpeg(path, wnid):
    Image.new("RGB", (24, 20), colour(wnid)).save(path, quality=95)


def make_release(root, train_as="tar", labels="devkit"):
    train, val = root / "train_src", root / "val_src"
    train.mkdir(parents=True)
    val.mkdir()
    for _, wnid, _ in CLASSES:
        folder = train / wnid
        folder.mkdir()
        for k in range(3):
            jpeg(folder / f"{wnid}_{k}.JPEG", wnid)
        if train_as == "tar":
            with tarfile.open(train / f"{wnid}.tar", "w") as tar:
                for p in sorted(folder.iterdir()):
                    tar.add(p, arcname=p.name)
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
    wnid_of = {i: w for i, w, _ in CLASSES}
    for n, i in enumerate(VAL_IDS, 1):
        jpeg(val / f"ILSVRC2012_val_{n:08d}.JPEG", wnid_of[i])
    args = ["--train", str(train), "--val", str(val)]
    if labels == "devkit":
        from scipy.io import savemat
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                 ("num_children", "O"), ("children", "O"), ("wordnet_height", "O"),
                 ("num_train_images", "O")]
        rows = [(i, w, n, "a gloss", 0, np.zeros(0), 0, 3) for i, w, n in CLASSES]
        rows += [(i, w, n, "inner", 2, np.array([1, 2]), 1, 0) for i, w, n in INNER]
        savemat(data / "meta.mat", {"synsets": np.array(rows, dtype=dtype).reshape(-1, 1)})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "\n".join(map(str, VAL_IDS)) + "\n")
        args += ["--devkit", str(root / "ILSVRC2012_devkit_t12")]
    else:
        with open(root / "LOC_val_solution.csv", "w") as f:
            f.write("ImageId,PredictionString\n")
            for n, i in enumerate(VAL_IDS, 1):
                w = wnid_of[i]
                f.write(f"ILSVRC2012_val_{n:08d},{w} 10 12 80 90 {w} 5 5 20 20 \n")
        (root / "LOC_synset_mapping.txt").write_text(
            "".join(f"{w} {n}\n" for _, w, n in sorted(CLASSES, key=lambda c: c[1])))
        args += ["--val-csv", str(root / "LOC_val_solution.csv"),
                 "--synsets", str(root / "LOC_synset_mapping.txt")]
    return args


def prepare(args, out):
    return subprocess.run([sys.executable, "-m", "pipelines", "prepare-imagenet", *args,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def assert_labels_are_the_truth(out):
    """Through the folder loader: every image's colour is its label's class colour."""
    for split, count in (("train", 12), ("val", len(VAL_IDS))):
        samples = scan_folder(out / split)
        assert len(samples.files) == count
        assert samples.classes == sorted(w for _, w, _ in CLASSES)
        for rel, label in zip(samples.files, samples.labels):
            pixel = Image.open(out / split / rel).convert("RGB").getpixel((5, 5))
            want = colour(samples.classes[label])
            assert max(abs(a - b) for a, b in zip(pixel, want)) < 8, (split, rel)


@pytest.mark.parametrize("train_as, labels, link", [("tar", "devkit", "hard"),
                                                     ("folders", "devkit", "sym"),
                                                     ("folders", "csv", "hard")])
def test_release_becomes_our_layout(tmp_path, train_as, labels, link):
    args = make_release(tmp_path, train_as, labels) + ["--link", link]
    out = tmp_path / "imagenet"
    proc = prepare(args, out)
    assert proc.returncode == 0, proc.stderr
    assert "val: 9 images in 4 classes" in proc.stdout
    assert_labels_are_the_truth(out)
    rows = (out / "classes.tsv").read_text().splitlines()
    assert rows[0] == "index\twnid\tname"
    assert rows[1:] == [f"{i}\t{w}\t{n}" for i, (_, w, n) in
                        enumerate(sorted(CLASSES, key=lambda c: c[1]))]
    val_file = out / "val" / "n03000003" / "ILSVRC2012_val_00000001.JPEG"
    source = tmp_path / "val_src" / "ILSVRC2012_val_00000001.JPEG"
    if link == "sym":
        assert val_file.is_symlink() and os.path.samefile(val_file, source)
    else:
        assert not val_file.is_symlink() and os.path.samefile(val_file, source)
    again = prepare(args, out)                                      # safe to re-run
    assert again.returncode == 0, again.stderr
    assert_labels_are_the_truth(out)


@pytest.mark.parametrize("damage, message", [
    ("missing_val", r"1 labelled image\(s\) missing \(e.g. \['ILSVRC2012_val_00000004'\]"),
    ("extra_val", r"1 image\(s\) without a label \(e.g. \['ILSVRC2012_val_00000010'\]"),
    ("missing_class", r"train and val classes differ.*only in val: \['n02000004'\]"),
    ("no_devkit_truth", r"ILSVRC2012_validation_ground_truth.txt is missing"),
])
def test_partial_release_is_refused_naming_what_is_missing(tmp_path, damage, message):
    args = make_release(tmp_path, "tar", "devkit")
    if damage == "missing_val":
        (tmp_path / "val_src" / "ILSVRC2012_val_00000004.JPEG").unlink()
    elif damage == "extra_val":
        jpeg(tmp_path / "val_src" / "ILSVRC2012_val_00000010.JPEG", "n01000002")
    elif damage == "missing_class":
        (tmp_path / "train_src" / "n02000004.tar").unlink()
    else:
        (tmp_path / "ILSVRC2012_devkit_t12" / "data" /
         "ILSVRC2012_validation_ground_truth.txt").unlink()
    out = tmp_path / "imagenet"
    proc = prepare(args, out)
    assert proc.returncode == 2
    import re
    assert re.search(message, proc.stderr), proc.stderr
    assert not (out / "val").exists()                       # refused before writing
