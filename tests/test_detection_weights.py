"""ImageNet WRN weights -> detectron2 MODEL.WEIGHTS: detectron2's own checkpointer reports only
its heads as missing, nothing unexpected, and the backbone tensors equal the source."""
import os

import pytest
import torch

pytest.importorskip("detectron2")

import wrn_large  # noqa: E402
import detection  # noqa: E402
from detection import convert_weights  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "detection")
HEADS = ("backbone.fpn_", "backbone.top_block.", "proposal_generator.", "roi_heads.", "head.")


class RecordingCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, keeping what it would report as incompatible."""

    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


def trained_like_wrn(name="wrn_imagenet", **kw):
    """A registry WRN with non-trivial BN statistics (as after ImageNet training)."""
    torch.manual_seed(1)
    model = wrn_large.create_model(name, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
                m.num_batches_tracked.fill_(1234)
    return model


def cfg_for(config, norm=None):
    cfg = detection.get_wrn_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config))
    cfg.MODEL.DEVICE = "cpu"
    if norm:
        cfg.MODEL.WRN.NORM = norm
    return cfg


def load_and_check(cfg, path, source_state, prefix="backbone.bottom_up."):
    model = build_model(cfg)
    ck = RecordingCheckpointer(model)
    ck.resume_or_load(path, resume=False)
    inc = ck.incompatible
    assert inc.unexpected_keys == [] and inc.incorrect_shapes == []
    assert inc.missing_keys, "a detector's heads cannot come from an ImageNet checkpoint"
    stray = [k for k in inc.missing_keys if not k.startswith(HEADS)]
    assert stray == [], f"backbone keys not loaded: {stray[:5]}"
    loaded = model.state_dict()
    compared = 0
    for k, v in source_state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[prefix + k], v), k
        compared += 1
    assert compared > 50
    return model


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_trainer_checkpoint_round_trip_faster_rcnn(tmp_path, norm):
    model = trained_like_wrn(depth=18, width=0.5)
    state = model.state_dict()
    # as our trainer writes it: {"model": ...}, here with DDP's "module." prefix
    src = tmp_path / "step_00001000.pt"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "step": 1000}, src)
    dst = tmp_path / "wrn18_0_5_d2.pth"
    convert_weights.main([str(src), str(dst)])
    saved = torch.load(dst, weights_only=True)
    assert saved["matching_heuristics"] is False and "wrn_large" in saved["__author__"]
    assert not any(k.startswith("backbone.bottom_up.fc.") for k in saved["model"])
    det = load_and_check(cfg_for("toy_faster_rcnn_wrn18_0_5_fpn.yaml", norm), str(dst), state)
    # the loaded detector computes the registry model's features
    det.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.feature_maps(x)
        got = det.backbone.bottom_up(x)
    for k in got:
        torch.testing.assert_close(got[k], want[k])


def test_deepspeed_dir_round_trip_retinanet(tmp_path):
    model = trained_like_wrn(depth=18, width=0.5)
    ds_dir = tmp_path / "step_00000500"
    ds_dir.mkdir()
    torch.save({"model": model.state_dict()}, ds_dir / "weights.pt")
    dst = tmp_path / "retina.pth"
    convert_weights.main([str(ds_dir), str(dst), "--fpn"])
    load_and_check(cfg_for("toy_retinanet_wrn18_0_5_fpn.yaml"), str(dst), model.state_dict())


def test_plain_backbone_round_trip(tmp_path):
    model = trained_like_wrn(depth=18, width=0.5)
    src = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, src)
    dst = tmp_path / "plain.pth"
    convert_weights.main([str(src), str(dst), "--plain"])
    # a GeneralizedRCNN on the plain backbone: RPN and box head on res5
    cfg = detection.get_wrn_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_wrn_backbone"
    cfg.MODEL.WRN.NAME, cfg.MODEL.WRN.DEPTH, cfg.MODEL.WRN.WIDTH = "wrn_imagenet", 18, 0.5
    cfg.MODEL.WRN.OUT_FEATURES = ["res5"]
    cfg.MODEL.RPN.IN_FEATURES = ["res5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128]]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    load_and_check(cfg, str(dst), model.state_dict(), prefix="backbone.")


def test_torchvision_wide_resnet50_2_into_the_wrn50_2_config(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.wide_resnet50_2(weights=None)
    src = tmp_path / "wide_resnet50_2.pth"
    torch.save(tv.state_dict(), src)  # a bare state dict, as torchvision distributes them
    dst = tmp_path / "wrn50_2_d2.pth"
    convert_weights.main([str(src), str(dst), "--name", "wrn50_2_bottleneck"])
    load_and_check(cfg_for("faster_rcnn_wrn50_2_fpn_1x.yaml"), str(dst), tv.state_dict())


def test_conversion_errors(tmp_path):
    model = trained_like_wrn(depth=18, width=0.5)
    src = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, src)
    with pytest.raises(ValueError, match="does not match wrn34_x2"):
        convert_weights.convert(str(src), str(tmp_path / "o.pth"), name="wrn34_x2")
    d2 = tmp_path / "d2.pth"
    convert_weights.convert(str(src), str(d2))
    with pytest.raises(ValueError, match="looks like a detectron2 checkpoint"):
        convert_weights.convert(str(d2), str(tmp_path / "again.pth"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="without weights.pt"):
        convert_weights.convert(str(tmp_path / "empty_dir"), str(tmp_path / "x.pth"))


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_c4_round_trip_res5_head_is_the_wrns_last_stage(tmp_path, norm):
    """--c4: the trunk under backbone., layer4 under roi_heads.res5. (WRNRes5ROIHeads)."""
    model = trained_like_wrn(depth=18, width=0.5).eval()
    src = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, src)
    dst = tmp_path / "c4.pth"
    convert_weights.main([str(src), str(dst), "--c4"])
    cfg = cfg_for("faster_rcnn_wrn34_2_c4_1x.yaml", norm)
    cfg.MODEL.WRN.NAME, cfg.MODEL.WRN.DEPTH, cfg.MODEL.WRN.WIDTH = "wrn_imagenet", 18, 0.5
    det = build_model(cfg).eval()
    ck = RecordingCheckpointer(det)
    ck.resume_or_load(str(dst), resume=False)
    inc = ck.incompatible
    assert inc.unexpected_keys == [] and inc.incorrect_shapes == []
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in inc.missing_keys} <= \
        {"proposal_generator.rpn_head", "roi_heads.box_predictor"}, inc.missing_keys
    loaded = det.state_dict()
    assert any(k.startswith("roi_heads.res5.") for k in loaded)
    for k, v in model.state_dict().items():
        if not (k.startswith("fc.") or k.endswith("num_batches_tracked")):
            assert torch.equal(loaded[convert_weights._c4_name(k)], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        res4 = model.feature_maps(x)["res4"]
        torch.testing.assert_close(det.backbone(x)["res4"], res4)
        torch.testing.assert_close(det.roi_heads.res5(res4), model.layer4(res4))
