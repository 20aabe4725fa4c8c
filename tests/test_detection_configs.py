"""configs/detection/*.yaml load with `cfg.merge_from_file` as they are and build with
detectron2's build_model (real detectron2, CPU)."""
import glob
import os

import pytest
import torch

pytest.importorskip("detectron2")

import detection  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "detection")

EXPECTED = {  # file: (meta architecture, backbone builder, WRN, FPN levels, res2 channels or None)
    "faster_rcnn_wrn34_2_fpn_1x.yaml": ("GeneralizedRCNN", "build_wrn_fpn_backbone", "wrn34_x2",
                                        ["p2", "p3", "p4", "p5", "p6"], 128),
    "retinanet_wrn34_2_fpn_1x.yaml": ("RetinaNet", "build_wrn_retinanet_fpn_backbone", "wrn34_x2",
                                      ["p3", "p4", "p5", "p6", "p7"], None),
    "faster_rcnn_wrn50_2_fpn_1x.yaml": ("GeneralizedRCNN", "build_wrn_fpn_backbone",
                                        "wrn50_2_bottleneck", ["p2", "p3", "p4", "p5", "p6"], 256),
    "toy_faster_rcnn_wrn18_0_5_fpn.yaml": ("GeneralizedRCNN", "build_wrn_fpn_backbone",
                                           "wrn_imagenet", ["p2", "p3", "p4", "p5", "p6"], 32),
    "toy_retinanet_wrn18_0_5_fpn.yaml": ("RetinaNet", "build_wrn_retinanet_fpn_backbone",
                                         "wrn_imagenet", ["p3", "p4", "p5", "p6", "p7"], None),
    "faster_rcnn_wrn34_2_c4_1x.yaml": ("GeneralizedRCNN", "build_wrn_backbone", "wrn34_x2",
                                       None, None),  # C4: no FPN
}


def load(name):
    cfg = get_cfg()
    detection.add_wrn_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_every_config_file_is_covered():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))) \
        == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_with_detectron2(name):
    arch, builder, wrn, levels, res2 = EXPECTED[name]
    cfg = load(name)
    # what the zoo _BASE_ contributed (served from the installed detectron2, not downloaded)
    assert cfg.MODEL.META_ARCHITECTURE == arch
    assert cfg.SOLVER.STEPS and cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[0.5, 1.0, 2.0]]
    assert cfg.MODEL.BACKBONE.NAME == builder and cfg.MODEL.WRN.NAME == wrn
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.WEIGHTS == ""
    model = build_model(cfg)
    assert type(model).__name__ == arch
    if levels is None:
        return check_c4(cfg, model)
    shapes = model.backbone.output_shape()
    assert list(shapes) == levels
    assert [s.stride for s in shapes.values()] == [2 ** int(p[1]) for p in levels]
    assert {s.channels for s in shapes.values()} == {cfg.MODEL.FPN.OUT_CHANNELS}
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, detection.WRNBackbone)
    assert list(bottom_up.output_shape()) == list(cfg.MODEL.WRN.OUT_FEATURES)
    if res2:
        assert bottom_up.output_shape()["res2"].channels == res2
    # FrozenBN + FREEZE_AT 2 for the COCO files: stem and res2 frozen
    if not name.startswith("toy"):
        assert not any(p.requires_grad for p in bottom_up.layer1.parameters())
        assert all(p.requires_grad for p in bottom_up.layer2.parameters())


def check_c4(cfg, model):
    """res2-res4 as the backbone (stride 16), the WRN's own layer4 as the per-region res5."""
    import wrn_large

    assert isinstance(model.backbone, detection.WRNBackbone)
    assert {k: (s.channels, s.stride) for k, s in model.backbone.output_shape().items()} == \
        {"res4": (512, 16)}
    assert not hasattr(model.backbone, "layer4")
    assert isinstance(model.roi_heads, detection.WRNRes5ROIHeads)
    ref = wrn_large.create_model(cfg.MODEL.WRN.NAME).layer4
    assert [tuple(v.shape) for k, v in model.roi_heads.res5.state_dict().items()
            if not k.endswith("num_batches_tracked")] == \
        [tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert model.roi_heads.box_predictor.cls_score.in_features == 1024
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())


@pytest.mark.parametrize("name", ["faster_rcnn_wrn34_2_fpn_1x.yaml", "faster_rcnn_wrn34_2_c4_1x.yaml"])
def test_wrn34_2_faster_rcnn_runs_inference_on_a_small_image(name):
    cfg = load(name)
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8),
                      "height": 96, "width": 128}])
    inst = out[0]["instances"]
    assert inst.image_size == (96, 128) and inst.pred_boxes.tensor.shape[1] == 4


def test_own_project_use_after_one_import():
    """`cfg.MODEL.BACKBONE.NAME = "build_wrn_fpn_backbone"` on detectron2's own zoo config."""
    from detectron2 import model_zoo

    cfg = get_cfg()
    detection.add_wrn_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_wrn_fpn_backbone"
    cfg.MODEL.WRN.NAME = "wrn_imagenet"
    cfg.MODEL.WRN.DEPTH, cfg.MODEL.WRN.WIDTH = 18, 0.25
    model = build_model(cfg)
    assert model.backbone.bottom_up.output_shape()["res5"].channels == 128


def test_zoo_base_address_is_served_locally():
    from detectron2.utils.file_io import PathManager

    url = detection.MODEL_ZOO_URL + "COCO-Detection/../Base-RCNN-FPN.yaml"
    assert PathManager.isfile(url)
    local = PathManager.get_local_path(url)
    assert os.path.isfile(local)
    assert local.endswith(os.path.join("detectron2", "model_zoo", "configs", "Base-RCNN-FPN.yaml"))
    with pytest.raises(FileNotFoundError, match="no such file in the installed detectron2"):
        PathManager.open(detection.MODEL_ZOO_URL + "COCO-Detection/nope.yaml")
