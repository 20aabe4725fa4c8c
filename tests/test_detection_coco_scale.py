"""The README's detection command on a file with the shape and quirks of the real
instances_train2017.json (118,287 images, 860,001 annotations, zero-height boxes, crowd RLE,
images without annotations; detection.coco_like), at full scale: the check passes with the
quirks counted, runs once per job (a second job reads the cached verdict), and detectron2
trains on it with finite losses. Slow: ~4 minutes and ~5 GB (detectron2's own load)."""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

from detection.coco_like import NUM_ANNOTATIONS, NUM_IMAGES, make_coco_like  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "detection", "toy_faster_rcnn_wrn18_0_5_fpn.yaml")


@pytest.fixture(scope="module")
def coco2017(tmp_path_factory):
    return make_coco_like(str(tmp_path_factory.mktemp("coco2017")))


def train(json_file, images, out, cache, *extra):
    cmd = [sys.executable, "-m", "detection.train_net", "--config-file", CONFIG,
           "--train-json", json_file, "--train-images", images, *extra,
           "MODEL.ROI_HEADS.NUM_CLASSES", "80", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS",
           "1", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
           "OUTPUT_DIR", str(out)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": ROOT, "WRN_LARGE_CACHE": str(cache)})


@pytest.mark.slow
def test_train2017_shaped_file_trains_with_its_quirks_checked_once(coco2017, tmp_path):
    json_file, images = coco2017
    first = train(json_file, images, tmp_path / "run1", tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-4000:]
    log = first.stdout + first.stderr
    assert f"OK, {NUM_IMAGES} images, {NUM_ANNOTATIONS} annotations, 80 categories" in log
    assert "2 zero size box" in log and "crowd" in log and "image without annotations" in log
    quirks = json.load(open(tmp_path / "run1" / "coco_quirks_wrn_coco_train.json"))["quirks"]
    assert len(quirks["zero_size_box"]["ids"]) == 2
    assert 900 < len(quirks["image_without_annotations"]["ids"]) < 1100
    assert 0.008 < len(quirks["crowd"]["ids"]) / NUM_ANNOTATIONS < 0.013
    with open(tmp_path / "run1" / "metrics.json") as f:
        rows = [json.loads(line) for line in f if "total_loss" in line]
    assert rows and all(math.isfinite(r["total_loss"]) for r in rows)
    cached = list((tmp_path / "cache" / "coco_check").glob("*.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    # a second job's check (train_net's check_once, in a new process: detectron2's own load of
    # the file, ~1 minute, is not what is tested here) reads the verdict, not rewriting it
    second = subprocess.run(
        [sys.executable, "-c", "import sys; from detection.coco_check import check_once; "
         "print(check_once(sys.argv[1], sys.argv[2]).summary_line())", json_file, images],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "WRN_LARGE_CACHE": str(tmp_path / "cache")})
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"OK, {NUM_IMAGES} images, {NUM_ANNOTATIONS} annotations" in second.stdout
    assert cached[0].stat().st_mtime_ns == stamp
    # --strict keeps the old refusal, naming the zero-height boxes, from the cached verdict
    strict = train(json_file, images, tmp_path / "run3", tmp_path / "cache", "--strict")
    assert strict.returncode != 0 and "bbox width or height 0 (--strict)" in strict.stderr
    assert list((tmp_path / "cache" / "coco_check").glob("*.json")) == cached   # from the verdict
