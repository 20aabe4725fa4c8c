"""ImageNet WRNs (Zagoruyko & Komodakis 2016, Tables 7 and 8).

A torchvision-layout ResNet (7x7 stem of 64 channels, max-pool, four stages at strides 4-32,
post-activation blocks as in fb.resnet.torch) whose stages are widened by ``width``:
- depth 18/34, basic blocks: the stages have 64w, 128w, 256w, 512w channels;
- depth 50/101/152, bottleneck blocks: the inner 3x3 width of every block is multiplied by w
  (WRN-50-2-bottleneck = torchvision's wide_resnet50_2); the block outputs keep 256-2048.
Module names follow torchvision, so its state dicts load without conversion.

Stochastic depth (``drop_path_rate``) as in timm's ``resnet.py``, whose blocks these are: every
block adds its residual branch to a shortcut (the identity or a 1x1 projection), and timm's
``DropPath`` drops that branch per sample just before the addition.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import checkpoint_seq, generate_default_cfgs

from ._builder import build_model
from ._features import FeatureInfo
from ._init import init_weights
from ._model_api import WRNBase, batchnorm, drop_path_layer, drop_path_rates
from ._registry import list_models, model_info, register_model


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, width: float,
                 norm_layer=nn.BatchNorm2d, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride, norm_layer)
        self.drop_path = drop_path_layer(drop_path)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.drop_path(self.bn2(self.conv2(out))) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, width: float,
                 norm_layer=nn.BatchNorm2d, drop_path: float = 0.0):
        super().__init__()
        inner = int(planes * width)
        self.conv1 = conv1x1(inplanes, inner)
        self.bn1 = norm_layer(inner)
        self.conv2 = conv3x3(inner, inner, stride)   # stride on the 3x3, as fb.resnet.torch
        self.bn2 = norm_layer(inner)
        self.conv3 = conv1x1(inner, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm_layer)
        self.drop_path = drop_path_layer(drop_path)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.drop_path(self.bn3(self.conv3(out))) + identity)


def _downsample(cin: int, cout: int, stride: int, norm_layer) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), norm_layer(cout))


ARCHS = {  # depth -> (block, blocks per stage)
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class WideResNetImageNet(WRNBase):
    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, depth: int = 34, width: float = 2.0, num_classes: int = 1000,
                 in_chans: int = 3, zero_init_residual: bool = False, global_pool: str = "avg",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 bn_momentum: float | None = None, bn_eps: float | None = None):
        super().__init__()
        if depth not in ARCHS:
            raise ValueError(f"invalid depth {depth} for an ImageNet WRN; "
                             f"valid depths: {', '.join(map(str, ARCHS))}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        block, counts = ARCHS[depth]
        norm_layer = batchnorm(bn_momentum, bn_eps)
        rates = iter(drop_path_rates(drop_path_rate, sum(counts)))
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        # Basic blocks widen the stage itself; bottlenecks widen only their inner 3x3.
        stage_scale = width if block is BasicBlock else 1.0
        inplanes, self.feature_info = 64, []
        for i, count in enumerate(counts):
            planes = int(64 * 2 ** i * stage_scale)
            blocks = []
            for j in range(count):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1, width,
                                    norm_layer, next(rates)))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(FeatureInfo(f"res{i + 2}", inplanes, 4 * 2 ** i,
                                                 f"layer{i + 1}"))
        self.init_head(inplanes, num_classes, global_pool, in_chans, drop_rate)
        # torchvision's init: these networks came from fb.resnet.torch, as torchvision's
        # weights did (_init.py)
        init_weights(self, "torchvision", zero_linear_bias=False)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, C, H/32, W/32)."""
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x,
                               flatten=True)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x


# What timm reads (timm.data.resolve_data_config): the ImageNet recipe's evaluation,
# resize 256 + center crop 224 (configs/imagenet/recipe.yaml), bilinear, ImageNet mean/std.
PRETRAINED_CFG = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                      crop_pct=0.875, interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN,
                      std=IMAGENET_DEFAULT_STD, first_conv="conv1", classifier="fc")


@register_model(family="imagenet", pretrained_cfg=PRETRAINED_CFG)
def wrn_imagenet(depth: int = 34, width: float = 2.0, num_classes: int = 1000, in_chans: int = 3,
                 zero_init_residual: bool = False, pretrained: bool = False, **options):
    """ImageNet WRN of any depth in 18/34 (basic) or 50/101/152 (bottleneck) and any width."""
    return build_model(WideResNetImageNet, "wrn_imagenet", pretrained, depth=depth, width=width,
                       num_classes=num_classes, in_chans=in_chans,
                       zero_init_residual=zero_init_residual, **options)


def _preset(name: str, depth: int, width: float, params_m: str | None, table: str):
    def builder(num_classes: int = 1000, in_chans: int = 3, zero_init_residual: bool = False,
                pretrained: bool = False, **options):
        return build_model(WideResNetImageNet, name, pretrained, depth=depth, width=width,
                           num_classes=num_classes, in_chans=in_chans,
                           zero_init_residual=zero_init_residual, **options)

    builder.__name__ = name
    kind = "-bottleneck" if depth >= 50 else f" width {width}"
    count = f": {params_m}M parameters" if params_m else ""
    builder.__doc__ = f"WRN-{depth}{kind} for ImageNet ({table}{count})"
    register_model(builder, family="imagenet", paper_params_m=params_m, paper_table=table,
                   pretrained_cfg=PRETRAINED_CFG)


for _depth, _width, _p in [(18, 1.0, "11.7"), (18, 1.5, "25.9"), (18, 2.0, "45.6"),
                           (18, 3.0, "101.8"), (34, 1.0, "21.8"), (34, 1.5, "48.6"),
                           (34, 2.0, "86.0")]:
    _suffix = f"{_width:g}".replace(".", "_")
    _preset(f"wrn{_depth}_x{_suffix}", _depth, _width, _p, "Table 7")
_preset("wrn50_2_bottleneck", 50, 2.0, "68.9", "Table 8")
_preset("wrn101_2_bottleneck", 101, 2.0, None, "torchvision")  # wide_resnet101_2

# What timm's register_model reads (timm_compat.py): each name's pretrained cfg, in the module of
# its builder, as in timm's own model files.
default_cfgs = generate_default_cfgs({name: model_info(name).pretrained_cfg
                                      for name in list_models(family="imagenet")})
