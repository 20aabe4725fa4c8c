"""A registry WRN in every meta-architecture detectron2 offers, from detectron2's own model-zoo
configs with only the backbone keys changed (docs in detection/README.md): built, one training
step with finite losses, inference. Real detectron2 on the CPU, tiny images."""
import math

import pytest
import torch

pytest.importorskip("detectron2")

import detection  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import LazyCall as L, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

SMALL_WRN = {"MODEL.WRN.NAME": "wrn_imagenet", "MODEL.WRN.DEPTH": 18, "MODEL.WRN.WIDTH": 0.25,
             "MODEL.WRN.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": 0}
FPN = {"MODEL.BACKBONE.NAME": "build_wrn_fpn_backbone", "MODEL.FPN.OUT_CHANNELS": 32}
RETINA = {"MODEL.BACKBONE.NAME": "build_wrn_retinanet_fpn_backbone",
          "MODEL.WRN.OUT_FEATURES": ["res3", "res4", "res5"], "MODEL.FPN.OUT_CHANNELS": 32}
C4 = {"MODEL.BACKBONE.NAME": "build_wrn_backbone", "MODEL.WRN.OUT_FEATURES": ["res4"],
      "MODEL.ROI_HEADS.NAME": "WRNRes5ROIHeads"}

YAML_ARCHS = {  # zoo file: the keys a user changes
    "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml": FPN,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml": FPN,
    "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml": C4,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml": C4,
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml": RETINA,
    "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml": FPN,
}


def batch(num_classes=80, stuff_classes=54, size=(96, 128)):
    torch.manual_seed(0)
    h, w = size
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]))
    inst.gt_classes = torch.tensor([3, num_classes - 1])
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:70, 8:60] = masks[1, 20:90, 50:120] = True
    inst.gt_masks = BitMasks(masks)
    return [{"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8), "height": h,
             "width": w, "instances": inst,
             "sem_seg": torch.randint(0, stuff_classes, (h, w), dtype=torch.long)}]


def step_and_infer(model):
    model.train()
    with EventStorage():        # what detectron2's trainers wrap every step in
        losses = model(batch())
    assert losses and all(math.isfinite(v.item()) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "bottom_up" in n or n.startswith(
                   ("backbone.layer", "roi_heads.res5")))
    model.eval()
    with torch.no_grad():
        return model([{k: v for k, v in batch()[0].items() if k in ("image", "height", "width")}])


@pytest.mark.parametrize("zoo_file", sorted(YAML_ARCHS))
def test_yaml_meta_architectures_train_and_infer_with_a_wrn(zoo_file):
    cfg = detection.get_wrn_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_file))
    opts = {**SMALL_WRN, **YAML_ARCHS[zoo_file], "MODEL.DEVICE": "cpu", "MODEL.WEIGHTS": ""}
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    model = build_model(cfg)
    assert any(isinstance(m, detection.WRNBackbone) for m in model.modules())
    out = step_and_infer(model)
    assert isinstance(out, list) and out[0]


def test_fcos_lazy_config_with_a_wrn():
    """FCOS exists only as a LazyConfig (.py) in detectron2's zoo: swap its bottom_up."""
    cfg = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
    cfg.model.backbone.bottom_up = L(detection.wrn_backbone)(
        name="wrn_imagenet", depth=18, width=0.25, out_features=["res3", "res4", "res5"],
        norm="FrozenBN", freeze_at=2)                       # as the zoo file's ResNet
    # 64, not 32: the head's GroupNorm(32) needs 2 values per group at the 1x1 P7 of a tiny image
    cfg.model.backbone.out_channels = 64
    cfg.model.backbone.top_block.in_channels = 64          # FCOS: P6 from P5
    cfg.model.head.input_shape = [ShapeSpec(channels=64)] * 5
    cfg.model.head.conv_dims = [64, 64]
    model = instantiate(cfg.model)
    assert isinstance(model.backbone.bottom_up, detection.WRNBackbone)
    out = step_and_infer(model)
    assert "instances" in out[0]
