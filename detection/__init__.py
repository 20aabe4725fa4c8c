"""Detectron2 adapter: WRN backbones from the ``wrn_large`` registry for COCO detection.

    import detection                      # registers the backbones in detectron2's BACKBONE_REGISTRY
    cfg = detection.get_wrn_cfg()         # = add_wrn_config(detectron2.config.get_cfg())
    cfg.merge_from_file("configs/detection/faster_rcnn_wrn34_2_fpn_1x.yaml")
    # or, in one's own project:
    cfg.MODEL.BACKBONE.NAME = "build_wrn_fpn_backbone"; cfg.MODEL.WRN.NAME = "wrn34_x2"

Entry points: ``python -m detection.train_net``, ``python -m detection.convert_weights``,
``python -m detection.make_coco``, ``python -m detection.coco_check``. See detection/README.md.
"""
from .config import MODEL_ZOO_URL, NORMS, add_wrn_config, config_file, get_wrn_cfg
from .backbone import (WRNBackbone, WRNRes5ROIHeads, build_wrn_backbone, build_wrn_fpn_backbone,
                       build_wrn_retinanet_fpn_backbone, create_wrn, wrn_backbone)

__all__ = ["MODEL_ZOO_URL", "NORMS", "add_wrn_config", "config_file", "get_wrn_cfg",
           "WRNBackbone", "WRNRes5ROIHeads", "build_wrn_backbone", "build_wrn_fpn_backbone",
           "build_wrn_retinanet_fpn_backbone", "create_wrn", "wrn_backbone"]
