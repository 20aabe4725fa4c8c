"""WRN backbones for detectron2, built from the ``wrn_large`` registry.

``WRNBackbone`` holds the registry model's modules under their own (torchvision) names, minus
the classifier: a WRN checkpoint of our trainer maps onto a detectron2 model by one prefix
(``backbone.bottom_up.`` with FPN, ``backbone.`` without; see ``detection.convert_weights``).

Three builders are registered in detectron2's ``BACKBONE_REGISTRY`` (``import detection``):
``build_wrn_backbone`` (res2..res5 at strides 4..32), ``build_wrn_fpn_backbone`` (P2..P6, as
``build_resnet_fpn_backbone``) and ``build_wrn_retinanet_fpn_backbone`` (P3..P7 with
``LastLevelP6P7``, as ``build_retinanet_resnet_fpn_backbone``). For C4 models,
``WRNRes5ROIHeads`` (in ``ROI_HEADS_REGISTRY``) is detectron2's ``Res5ROIHeads`` whose per-region
res5 is the same registry WRN's last stage, on top of ``build_wrn_backbone`` with
``OUT_FEATURES: ["res4"]``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, Backbone
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

import wrn_large

from .config import NORMS

# The modules before the first stage, in forward order (CIFAR WRNs: conv1 alone).
_STEM = ("conv1", "bn1", "relu", "maxpool")
_DROPPED = ("avgpool", "fc")  # the classifier head


def create_wrn(name: str, depth: int = 0, width: float = 0.0, in_chans: int = 3) -> nn.Module:
    """The registry model for ``MODEL.WRN.NAME/DEPTH/WIDTH`` (see ``detection.config``)."""
    info = wrn_large.model_info(name)  # unknown names: an error listing the valid ones
    width_arg = "width" if info.family == "imagenet" else "widen_factor"
    kwargs = {"in_chans": in_chans}
    if depth or width:
        generic = "depth" in info.defaults
        if generic:
            if depth:
                kwargs["depth"] = int(depth)
            if width:
                kwargs[width_arg] = float(width)
    model = wrn_large.create_model(name, **kwargs)
    got_width = getattr(model, width_arg)
    if (depth and model.depth != depth) or (width and float(got_width) != float(width)):
        raise ValueError(
            f"MODEL.WRN.NAME={name!r} is WRN-{model.depth} of width {got_width:g}, but "
            f"MODEL.WRN.DEPTH={depth} / WIDTH={width:g} were set; leave DEPTH and WIDTH at 0 for "
            f"a preset, or use NAME 'wrn_imagenet' to choose them")
    return model


class WRNBackbone(Backbone):
    """A registry WRN as a detectron2 ``Backbone``: ``forward`` returns the ``out_features``
    of res2..res5 (ImageNet WRNs: strides 4, 8, 16, 32; CIFAR WRNs: res2..res4, strides 1-4).

    Stages after the last requested feature are dropped (as detectron2's ResNet does), so every
    parameter takes part in the loss (DistributedDataParallel requires it).
    """

    def __init__(self, model: nn.Module, family: str, out_features=("res2", "res3", "res4", "res5"),
                 norm: str = "FrozenBN", freeze_at: int = 0):
        super().__init__()
        infos = {f.name: f for f in model.feature_info}
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in infos]
        if not out_features or unknown:
            raise ValueError(f"MODEL.WRN.OUT_FEATURES {out_features}: this WRN has only "
                             f"{', '.join(infos)}")
        self.family = family
        names = list(infos)
        last = max(names.index(f) for f in out_features)
        # As detectron2's ResNet (scriptable): static names, modules under their own names
        self.stage_names = tuple(names[:last + 1])  # res2, res3, ...
        for name in _STEM:  # CIFAR WRNs have only conv1: Identity for the rest
            self.add_module(name, getattr(model, name, nn.Identity()))
        for i in range(len(self.stage_names)):
            self.add_module(f"layer{i + 1}", getattr(model, f"layer{i + 1}"))
        # CIFAR WRNs are pre-activation: their last feature is taken after a final BN-ReLU.
        self.post_bn = family == "cifar" and self.stage_names[-1] == names[-1]
        self.bn = model.bn if self.post_bn else nn.Identity()  # Identity: no weights, no keys
        self._rebuild_lists()

        self._out_features = out_features
        self._out_feature_channels = {f: infos[f].channels for f in out_features}
        self._out_feature_strides = {f: infos[f].stride for f in out_features}
        self.depth = model.depth
        self.width = getattr(model, "width", getattr(model, "widen_factor", None))

        self.freeze(freeze_at)
        convert_norm(self, norm)
        self._rebuild_lists()  # the conversions may have replaced a stage
        # Checkpoints may or may not hold BN's step counter (a FrozenBatchNorm2d has none, and
        # BatchNorm2d's momentum makes it unused): never report it as missing or unexpected.
        self.register_load_state_dict_post_hook(_ignore_num_batches_tracked)

    def _rebuild_lists(self) -> None:
        """The stages in forward order, the list the (scriptable) forward iterates, as in
        detectron2's ResNet; the modules stay registered under their torchvision names."""
        self.stages = [getattr(self, f"layer{i + 1}") for i in range(len(self.stage_names))]

    def __prepare_scriptable__(self) -> "WRNBackbone":
        """What ``torch.jit.script`` compiles: a copy whose stages are an ``nn.ModuleList``
        (a Python list of modules is not scriptable), as detectron2 does for its ResNet
        (``detectron2.export.torchscript_patch``). The copy's weights are named
        ``stages.N.*``; the eager model is unchanged."""
        ret = copy.deepcopy(self)
        ret.stages = nn.ModuleList(ret.stages)
        for i in range(len(self.stage_names)):
            delattr(ret, f"layer{i + 1}")
        return ret

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError("WRNBackbone takes (N, C, H, W) input, got " + str(x.dim())
                             + " dimensions")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs: dict[str, torch.Tensor] = {}
        last = len(self.stage_names) - 1
        for i, (name, stage) in enumerate(zip(self.stage_names, self.stages)):
            x = stage(x)
            if self.post_bn and i == last:
                x = F.relu(self.bn(x))
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}

    def freeze(self, freeze_at: int = 0) -> "WRNBackbone":
        """As detectron2's ``ResNet.freeze``: 1 freezes the stem, 2 the stem and res2, ...
        Frozen parameters stop requiring gradients and their BNs become FrozenBatchNorm2d."""
        if freeze_at < 0:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must be >= 0, got {freeze_at}")
        groups = []
        if freeze_at >= 1:
            groups += list(_STEM)
        groups += [f"layer{i + 1}" for i in range(min(freeze_at - 1, len(self.stage_names)))]
        if self.post_bn and freeze_at - 1 >= len(self.stage_names):
            groups.append("bn")
        for name in groups:
            module = FrozenBatchNorm2d.convert_frozen_batchnorm(getattr(self, name))
            for p in module.parameters():
                p.requires_grad_(False)
            setattr(self, name, module)
        self._rebuild_lists()
        return self


def _convert_bn(module: nn.Module, cls) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = cls(child.num_features, child.eps, child.momentum, child.affine,
                      child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            _convert_bn(child, cls)
    return module


def _ignore_num_batches_tracked(module, incompatible_keys) -> None:
    counters = {f"{name}.num_batches_tracked" for name, m in module.named_modules()
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))}

    def is_counter(key: str) -> bool:  # key is relative to the model load_state_dict was called on
        parts = key.split(".")
        return any(".".join(parts[i:]) in counters for i in range(len(parts)))

    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if not is_counter(k)]


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """``MODEL.WRN.NORM`` applied to a module's BatchNorm2d layers."""
    if norm not in NORMS:
        raise ValueError(f"MODEL.WRN.NORM={norm!r}; valid: {', '.join(NORMS)}")
    if norm == "FrozenBN":
        return FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    if norm == "SyncBN":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)  # FrozenBatchNorm2d is left alone
    if norm == "naiveSyncBN":
        return _convert_bn(module, NaiveSyncBatchNorm)
    return module


def wrn_backbone(name: str = "wrn34_x2", depth: int = 0, width: float = 0.0,
                 out_features=("res2", "res3", "res4", "res5"), norm: str = "FrozenBN",
                 freeze_at: int = 0, in_chans: int = 3) -> WRNBackbone:
    """A ``WRNBackbone`` by keyword, for detectron2's LazyConfig files (FCOS, the ``.py``
    configs): ``model.backbone.bottom_up = L(wrn_backbone)(name="wrn34_x2", ...)``."""
    model = create_wrn(name, depth, width, in_chans=in_chans)
    family = wrn_large.model_info(name).family
    return WRNBackbone(model, family, out_features, norm, freeze_at)


def build_wrn_from_cfg(cfg, input_shape: ShapeSpec) -> WRNBackbone:
    w = cfg.MODEL.WRN
    return wrn_backbone(w.NAME, w.DEPTH, w.WIDTH, w.OUT_FEATURES, w.NORM,
                        cfg.MODEL.BACKBONE.FREEZE_AT, input_shape.channels)


def _check_fpn_inputs(cfg, bottom_up: WRNBackbone) -> None:
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(f"MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} asks for "
                         f"{missing}, not in MODEL.WRN.OUT_FEATURES "
                         f"{list(cfg.MODEL.WRN.OUT_FEATURES)}")


@BACKBONE_REGISTRY.register()
def build_wrn_backbone(cfg, input_shape: ShapeSpec) -> WRNBackbone:
    """The WRN alone: its ``MODEL.WRN.OUT_FEATURES`` (res2..res5, strides 4..32)."""
    return build_wrn_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_wrn_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """WRN + FPN with a max-pooled top level (P2..P6 from res2..res5), for Faster R-CNN."""
    bottom_up = build_wrn_from_cfg(cfg, input_shape)
    _check_fpn_inputs(cfg, bottom_up)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_wrn_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """WRN + FPN with P6/P7 computed from the last input feature (P3..P7 from res3..res5)."""
    bottom_up = build_wrn_from_cfg(cfg, input_shape)
    _check_fpn_inputs(cfg, bottom_up)
    last = cfg.MODEL.FPN.IN_FEATURES[-1]
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()[last].channels, out_channels, last),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@ROI_HEADS_REGISTRY.register()
class WRNRes5ROIHeads(Res5ROIHeads):
    """detectron2's C4 ROI heads (``Res5ROIHeads``) with the WRN's own last stage as the
    per-region res5: the ``layer4`` of ``MODEL.WRN.NAME/DEPTH/WIDTH`` (first block stride 2, as
    ResNet's res5), normalised by ``MODEL.WRN.NORM``. detectron2's own res5 is built from
    ``MODEL.RESNETS`` for R-50's channel counts, which no WRN has. ImageNet weights: ``layer4.*``
    go to ``roi_heads.res5.*`` (``python -m detection.convert_weights --c4``)."""

    @classmethod
    def _build_res5_block(cls, cfg):
        w = cfg.MODEL.WRN
        if wrn_large.model_info(w.NAME).family != "imagenet":
            raise ValueError(f"MODEL.WRN.NAME={w.NAME!r}: C4 heads need an ImageNet WRN (four "
                             f"stages); CIFAR WRNs have three")
        model = create_wrn(w.NAME, w.DEPTH, w.WIDTH)
        res5 = convert_norm(model.layer4, w.NORM)
        res5.register_load_state_dict_post_hook(_ignore_num_batches_tracked)
        return res5, model.feature_info[-1].channels
