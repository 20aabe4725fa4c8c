"""The toy COCO generator and the annotation checks (bad files rejected with clear messages)."""
import copy
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("detectron2")

from detection.coco_check import CocoFormatError, check_coco_json, main as coco_check_main  # noqa: E402
from detection.make_coco import make_coco  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_coco")
    splits = make_coco(str(root), num_train=6, num_val=3, size=(96, 80), seed=3)
    return root, splits


def test_generated_set_is_valid_coco(toy):
    root, splits = toy
    from pycocotools.coco import COCO

    for split, (js, images) in splits.items():
        summary = check_coco_json(js, images, for_eval=True)
        assert summary.categories == {1: "rectangle", 2: "ellipse", 3: "triangle"}
        coco = COCO(js)
        assert len(coco.getImgIds()) == {"train": 6, "val": 3}[split]
        assert len(coco.getAnnIds()) >= summary.num_images  # at least one object per image
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(os.path.join(images, img["file_name"])) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"]) == (96, 80)


def test_boxes_and_categories_match_the_drawn_shapes(toy):
    """The pixel at each box centre has its category's colour; just outside the box it has not."""
    from detection.make_coco import _BASE_COLOURS

    root, splits = toy
    js, images = splits["train"]
    data = json.load(open(js))
    for ann in data["annotations"]:
        img = data["images"][ann["image_id"] - 1]
        pix = np.asarray(Image.open(os.path.join(images, img["file_name"])), dtype=float)
        x, y, w, h = ann["bbox"]
        colour = np.array(_BASE_COLOURS[ann["category_id"]], dtype=float)
        assert np.abs(pix[y + h // 2, x + w // 2] - colour).max() < 70, ann
        if x + w + 1 < img["width"]:  # one pixel right of the box: background
            assert np.abs(pix[y + h // 2, x + w + 1] - colour).max() > 40, ann
        assert ann["area"] == w * h and len(ann["segmentation"][0]) >= 6


def write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def base(toy):
    _, splits = toy
    return json.load(open(splits["val"][0])), splits["val"][1]


def problems_of(path, images, **kw):
    with pytest.raises(CocoFormatError) as info:
        check_coco_json(path, images, **kw)
    msg = str(info.value)
    assert msg.startswith(path + ":"), msg  # every error names the file
    return msg


def test_missing_top_level_key(toy, tmp_path):
    data, images = base(toy)
    del data["categories"]
    msg = problems_of(write(tmp_path, data), images)
    assert "missing top-level key 'categories'" in msg


def test_missing_annotation_and_image_keys(toy, tmp_path):
    data, images = base(toy)
    del data["annotations"][0]["bbox"]
    del data["images"][1]["height"]
    data["annotations"][1].pop("area")
    msg = problems_of(write(tmp_path, data), images, for_eval=True)
    aid0, aid1, iid1 = data["annotations"][0]["id"], data["annotations"][1]["id"], data["images"][1]["id"]
    assert f"annotation id {aid0}: missing key(s) 'bbox'" in msg
    assert f"image id {iid1}: missing key(s) 'height'" in msg
    assert f"annotation id {aid1}: missing key(s) 'area' (COCO evaluation needs it" in msg
    # area is only required for evaluation
    data["annotations"][0]["bbox"] = [1, 1, 5, 5]
    data["images"][1]["height"] = 80
    check_coco_json(write(tmp_path, data, "ok.json"), images, for_eval=False)


def test_box_outside_image_and_negative_box(toy, tmp_path):
    data, images = base(toy)
    a, b, c = data["annotations"][:3]
    a["bbox"] = [90, 10, 20, 20]         # image is 96 wide
    b["bbox"] = [-5, 0, 10, 10]
    c["bbox"] = [10, 10, -2, 4]
    msg = problems_of(write(tmp_path, data), images)
    assert f"annotation id {a['id']}: bbox [90, 10, 20, 20] (x, y, w, h) lies outside image " \
           f"{a['image_id']} of size 96x80" in msg
    assert f"annotation id {b['id']}: bbox [-5, 0, 10, 10] (x, y, w, h) lies outside" in msg
    assert f"annotation id {c['id']}: bbox [10, 10, -2, 4] has a negative width or height" in msg
    assert "3 problems" in msg
    # within the 1-pixel tolerance: accepted, counted as past the border
    a["bbox"], b["bbox"], c["bbox"] = [76.5, 10, 20, 20], [-0.5, 0, 10, 10], [10, 10, 3, 4]
    report = check_coco_json(write(tmp_path, data, "ok.json"), images)
    assert report.quirks == {"past_border": [a["id"], b["id"]]}


def quirky(toy):
    """The val split with one of each quirk of the real train2017 / val2017 / Objects365."""
    data, images = base(toy)
    anns = data["annotations"]
    anns[0]["bbox"][3], anns[0]["area"] = 0.0, 0.0          # train2017: height 0, area 0
    anns[1]["bbox"][2] = 0.6                                # sub-pixel width
    anns[2]["iscrowd"] = 1                                  # crowd region
    anns[2]["segmentation"] = {"counts": [0, 4, 92], "size": [80, 96]}
    del anns[3]["iscrowd"]                                  # Objects365-like
    emptied = data["images"][-1]["id"]
    data["annotations"] = [a for a in anns if a["image_id"] != emptied]
    return data, images, emptied


def test_quirks_of_real_releases_are_counted_not_fatal(toy, tmp_path):
    data, images, emptied = quirky(toy)
    path = write(tmp_path, data, "quirky.json")
    report = check_coco_json(path, images)
    a = data["annotations"]
    assert report.quirks == {"zero_size_box": [a[0]["id"]], "sub_pixel_box": [a[1]["id"]],
                             "zero_area": [a[0]["id"]], "crowd": [a[2]["id"]],
                             "no_iscrowd": [a[3]["id"]], "image_without_annotations": [emptied]}
    line = report.summary_line()
    assert line.startswith(f"{path}: OK, 3 images") and "1 zero size box" in line
    report.write_quirks(str(tmp_path / "q" / "quirks.json"))
    listing = json.load(open(tmp_path / "q" / "quirks.json"))["quirks"]
    assert listing["crowd"]["ids"] == [a[2]["id"]] and "ignored in training" in listing["crowd"]["what"]
    # evaluation with pycocotools reads iscrowd on every annotation: there it is a problem
    msg = problems_of(path, images, for_eval=True)
    assert f"annotation id {a[3]['id']}: missing key(s) 'iscrowd'" in msg
    # --strict refuses every quirk, naming each id
    msg = problems_of(path, images, strict=True)
    assert f"annotation id {a[0]['id']}: bbox width or height 0 (--strict)" in msg
    assert f"image id {emptied}: dropped from training" in msg and "6 problems" in msg


def test_the_data_detectron2_trains_on_is_unchanged_by_the_check(toy, tmp_path):
    """load_coco_json reads the quirky file in full; its training mapper drops the zero-height
    box and the crowd region itself (what detectron2 does without us)."""
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json
    from detection.config import get_wrn_cfg

    data, images, emptied = quirky(toy)
    path = write(tmp_path, data, "quirky.json")
    check_coco_json(path, images)
    before = json.load(open(path))
    assert before == data                                   # the file is not rewritten
    dicts = load_coco_json(path, images, "quirky_probe")
    assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"])
    cfg = get_wrn_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.RANDOM_FLIP = (80,), 96, "none"
    mapper = DatasetMapper(cfg, is_train=True)
    degenerate = data["annotations"][0]
    record = next(d for d in dicts if d["image_id"] == degenerate["image_id"])
    kept = len([a for a in record["annotations"] if a.get("iscrowd", 0) == 0]) - 1
    assert len(mapper(record)["instances"]) == kept         # the zero-height box is gone


def test_unknown_category_and_image_ids_and_duplicates(toy, tmp_path):
    data, images = base(toy)
    data["annotations"][0]["category_id"] = 7
    data["annotations"][1]["image_id"] = 999
    data["annotations"][2]["id"] = data["annotations"][3]["id"]
    data["images"].append(copy.deepcopy(data["images"][0]))
    msg = problems_of(write(tmp_path, data), images)
    assert f"annotation id {data['annotations'][0]['id']}: unknown category_id 7 (categories: 1, 2, 3)" in msg
    assert f"annotation id {data['annotations'][1]['id']}: image_id 999 is not in 'images'" in msg
    assert f"annotation id {data['annotations'][3]['id']}: duplicate annotation id" in msg
    assert f"image id {data['images'][0]['id']}: duplicate image id" in msg


def test_missing_image_file_and_folder(toy, tmp_path):
    data, images = base(toy)
    data["images"][2]["file_name"] = "nowhere.jpg"
    path = write(tmp_path, data)
    msg = problems_of(path, images)
    assert f"image id {data['images'][2]['id']}: image file does not exist: " \
           f"{os.path.join(images, 'nowhere.jpg')}" in msg
    msg = problems_of(path, str(tmp_path / "no_such_dir"))
    assert "image folder" in msg and "does not exist" in msg


def test_not_json_not_a_file_and_capped_list(toy, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{\"images\": [")
    assert "not valid JSON" in problems_of(str(bad), None)
    assert "annotation file does not exist" in problems_of(str(tmp_path / "none.json"), None)
    data, images = base(toy)
    for ann in data["annotations"]:
        ann["category_id"] = 42
    n = len(data["annotations"])
    msg = problems_of(write(tmp_path, data), images, max_problems=2)
    assert f"{n} problems" in msg and f"... and {n - 2} more" in msg
    assert msg.count("unknown category_id 42") == 2


def test_lvis_style_file_is_named(toy, tmp_path):
    data, images = base(toy)
    for img in data["images"]:
        img["coco_url"] = "http://images.cocodataset.org/val2017/" + img.pop("file_name")
    assert "an LVIS file" in problems_of(write(tmp_path, data), images)


def test_check_once_caches_the_verdict_by_size_and_mtime(toy, tmp_path, monkeypatch):
    from detection import coco_check

    monkeypatch.setenv("WRN_LARGE_CACHE", str(tmp_path / "cache"))
    data, images, _ = quirky(toy)
    path = write(tmp_path, data, "quirky.json")
    first = coco_check.check_once(path, images)
    (entry,) = (tmp_path / "cache" / "coco_check").glob("*.json")
    marked = json.loads(entry.read_text())
    marked["num_images"] = 999                      # mark the cached verdict
    entry.write_text(json.dumps(marked))
    again = coco_check.check_once(path, images)
    assert again.num_images == 999 and again.quirks == first.quirks    # read from the cache
    assert again.categories == first.categories
    # --strict after a plain check: the cached verdict's quirks refused, the file not read again
    monkeypatch.setattr(coco_check, "_load", lambda f: pytest.fail("read the file again"))
    with pytest.raises(CocoFormatError, match=r"bbox width or height 0 \(--strict\)"):
        coco_check.check_once(path, images, strict=True)
    assert len(list((tmp_path / "cache" / "coco_check").glob("*.json"))) == 1
    monkeypatch.undo()
    monkeypatch.setenv("WRN_LARGE_CACHE", str(tmp_path / "cache"))
    data["annotations"][0]["category_id"] = 77      # a new version of the file: checked again
    with pytest.raises(CocoFormatError, match="unknown category_id 77"):
        coco_check.check_once(write(tmp_path, data, "quirky.json"), images)


def test_check_once_runs_large_files_in_a_child_process(toy, tmp_path, monkeypatch):
    from detection import coco_check

    monkeypatch.setenv("WRN_LARGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(coco_check, "IN_PROCESS_BYTES", 0)
    data, images, _ = quirky(toy)
    report = coco_check.check_once(write(tmp_path, data, "quirky.json"), images)
    assert report.quirks["crowd"] and report.categories == {1: "rectangle", 2: "ellipse", 3: "triangle"}
    data["annotations"][0]["category_id"] = 77
    with pytest.raises(CocoFormatError, match="unknown category_id 77"):   # pickled back whole
        coco_check.check_once(write(tmp_path, data, "bad.json"), images)


def test_cli_exit_codes(toy, tmp_path, capsys):
    data, images = base(toy)
    assert coco_check_main([toy[1]["val"][0], "--images", images, "--for-eval"]) == 0
    assert "OK, 3 images" in capsys.readouterr().out
    data["annotations"][0]["bbox"] = [0, 0, 500, 5]
    assert coco_check_main([write(tmp_path, data), "--images", images]) == 1
    assert "lies outside image" in capsys.readouterr().err
