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
        summary = check_coco_json(js, images, require_area=True)
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
    msg = problems_of(write(tmp_path, data), images, require_area=True)
    aid0, aid1, iid1 = data["annotations"][0]["id"], data["annotations"][1]["id"], data["images"][1]["id"]
    assert f"annotation id {aid0}: missing key(s) 'bbox'" in msg
    assert f"image id {iid1}: missing key(s) 'height'" in msg
    assert f"annotation id {aid1}: missing key(s) 'area' (COCO evaluation needs it" in msg
    # area is only required for evaluation
    data["annotations"][0]["bbox"] = [1, 1, 5, 5]
    data["images"][1]["height"] = 80
    check_coco_json(write(tmp_path, data, "ok.json"), images, require_area=False)


def test_box_outside_image_and_degenerate_box(toy, tmp_path):
    data, images = base(toy)
    a, b, c = data["annotations"][:3]
    a["bbox"] = [90, 10, 20, 20]         # image is 96 wide
    b["bbox"] = [-5, 0, 10, 10]
    c["bbox"] = [10, 10, 0, 4]
    msg = problems_of(write(tmp_path, data), images)
    assert f"annotation id {a['id']}: bbox [90, 10, 20, 20] (x, y, w, h) lies outside image " \
           f"{a['image_id']} of size 96x80" in msg
    assert f"annotation id {b['id']}: bbox [-5, 0, 10, 10] (x, y, w, h) lies outside" in msg
    assert f"annotation id {c['id']}: bbox [10, 10, 0, 4] has non-positive width or height" in msg
    assert "3 problems" in msg
    # within the 1-pixel tolerance is accepted
    a["bbox"], b["bbox"], c["bbox"] = [76.5, 10, 20, 20], [-0.5, 0, 10, 10], [10, 10, 3, 4]
    check_coco_json(write(tmp_path, data, "ok.json"), images)


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


def test_cli_exit_codes(toy, tmp_path, capsys):
    data, images = base(toy)
    assert coco_check_main([toy[1]["val"][0], "--images", images, "--require-area"]) == 0
    assert "OK, 3 images" in capsys.readouterr().out
    data["annotations"][0]["bbox"] = [0, 0, 500, 5]
    assert coco_check_main([write(tmp_path, data), "--images", images]) == 1
    assert "lies outside image" in capsys.readouterr().err
