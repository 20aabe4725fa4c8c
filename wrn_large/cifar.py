"""WRN-n-k for CIFAR-10/100 and SVHN (Zagoruyko & Komodakis 2016, Table 1).

Pre-activation blocks (BN-ReLU-conv), a 3x3 stem of 16 channels, three groups of 16k/32k/64k
channels at strides 1/2/4, then BN-ReLU, global average pooling and a linear classifier. The
block type B(M) lists the kernel sizes of the block's convolutions (B(3,3) is the basic block);
its length is the deepening factor l.

Blocks per group: N = (depth - 4) / 6 whatever the block type, as in the official code; this is
what reproduces Table 2's counts (e.g. WRN-40-2-B(1,3,1) has 6 blocks of 3 convolutions per
group, 1.4M parameters). Table 3 instead keeps the parameter count fixed while l varies, so its
networks set ``blocks_per_group`` explicitly (12, 6, 4, 3 for l = 1..4).

``dropout`` is the paper's, inside the blocks; timm's ``drop_rate`` is another dropout, on the
pooled features before the classifier (both 0 by default). Stochastic depth (``drop_path_rate``)
applies to every block type: each block adds its residual branch (its convolutions) to a
shortcut, the identity or a 1x1 projection, as in timm's ResNets and in the pre-activation
CIFAR ResNets where stochastic depth was introduced (Huang et al. 2016); timm's ``DropPath``
drops the branch per sample just before the addition. A projection shortcut still reads the
block's first BN-ReLU, which runs whether the branch is dropped or not.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import checkpoint_seq, generate_default_cfgs

from ._builder import build_model
from ._features import FeatureInfo
from ._init import InitScheme, init_weights
from ._model_api import WRNBase, batchnorm, drop_path_layer, drop_path_rates
from ._registry import list_models, model_info, register_model

# The block types studied in the paper (Tables 2 and 3); any sequence of 1s and 3s is accepted.
PAPER_BLOCK_TYPES = ("B(3,3)", "B(3,1,3)", "B(1,3,1)", "B(1,3)", "B(3,1)", "B(3,1,1)",
                     "B(3)", "B(3,3,3)", "B(3,3,3,3)")


def parse_block_type(block_type: str | Sequence[int]) -> tuple[int, ...]:
    """``"B(3,1)"``, ``"3,1"`` or ``(3, 1)`` -> ``(3, 1)``."""
    if isinstance(block_type, str):
        body = re.fullmatch(r"\s*(?:B\s*\()?\s*([0-9,\s]+?)\s*\)?\s*", block_type)
        kernels = tuple(int(k) for k in body.group(1).split(",") if k.strip()) if body else ()
    else:
        kernels = tuple(int(k) for k in block_type)
    if not kernels or any(k not in (1, 3) for k in kernels):
        raise ValueError(f"invalid block_type {block_type!r}: kernel sizes must be 1 or 3, "
                         f"e.g. one of {', '.join(PAPER_BLOCK_TYPES)}")
    return kernels


def blocks_per_group_for(depth: int) -> int:
    n, rest = divmod(depth - 4, 6)
    if rest or n < 1:
        raise ValueError(f"invalid depth {depth}: depth must be 6*N + 4 for N >= 1 blocks per "
                         f"group, e.g. {', '.join(str(6 * n + 4) for n in range(1, 9))}")
    return n


class PreActBlock(nn.Module):
    """BN-ReLU-conv repeated once per kernel size, dropout before every conv but the first."""

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 kernels: tuple[int, ...], dropout: float, norm_layer=nn.BatchNorm2d,
                 drop_path: float = 0.0):
        super().__init__()
        self.bns = nn.ModuleList()
        self.convs = nn.ModuleList()
        channels = in_channels
        for i, k in enumerate(kernels):
            self.bns.append(norm_layer(channels))
            self.convs.append(nn.Conv2d(channels, out_channels, k, stride if i == 0 else 1,
                                        padding=k // 2, bias=False))
            channels = out_channels
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, pre = x, x
        for i, (bn, conv) in enumerate(zip(self.bns, self.convs)):  # unrolled by TorchScript
            a = F.relu(bn(y))
            if i == 0:
                pre = a
            else:
                a = self.dropout(a)
            y = conv(a)
        # As in the official code, a projection shortcut reads the pre-activated input.
        return self.drop_path(y) + (x if self.shortcut is None else self.shortcut(pre))


class WideResNetCIFAR(WRNBase):
    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int = 28, widen_factor: float = 10, dropout: float = 0.0,
                 block_type: str | Sequence[int] = "B(3,3)", num_classes: int = 10,
                 in_chans: int = 3, blocks_per_group: int | None = None,
                 init: InitScheme = "official", global_pool: str = "avg",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 bn_momentum: float | None = None, bn_eps: float | None = None):
        super().__init__()
        kernels = parse_block_type(block_type)
        n = blocks_per_group or blocks_per_group_for(depth)
        if widen_factor <= 0:
            raise ValueError(f"widen_factor must be positive, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [int(round(16 * widen_factor * m)) for m in (1, 2, 4)]
        self.depth, self.widen_factor, self.kernels = depth, widen_factor, kernels
        self.blocks_per_group = n
        norm_layer = batchnorm(bn_momentum, bn_eps)
        rates = iter(drop_path_rates(drop_path_rate, 3 * n))
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        channels, groups = 16, []
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = [PreActBlock(channels if i == 0 else width, width, stride if i == 0 else 1,
                                  kernels, dropout, norm_layer, next(rates)) for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            channels = width
        self.layer1, self.layer2, self.layer3 = groups
        # pre-activation blocks leave their output un-normalised: a last BN-ReLU
        self.bn = norm_layer(channels)
        self.act = nn.ReLU()
        # the last level is taken after that BN-ReLU
        self.feature_info = [FeatureInfo(f"res{i + 2}", w, s, m) for i, (w, s, m) in
                             enumerate(zip(widths, (1, 2, 4), ("layer1", "layer2", "act")))]
        self.init_head(channels, num_classes, global_pool, in_chans, drop_rate)
        init_weights(self, init, zero_linear_bias=True)  # see _init.py

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_post(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, 64k, H/4, W/4), after the final BN-ReLU."""
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
        return self.forward_post(x)


# What timm reads (timm.data.resolve_data_config): the CIFAR recipe's inputs, CIFAR-10's
# mean/std as the official code uses them (configs/cifar/recipe.yaml), no resize or crop.
CIFAR_MEAN = tuple(m / 255 for m in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(s / 255 for s in (63.0, 62.1, 66.7))
PRETRAINED_CFG = dict(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                      interpolation="bilinear", mean=CIFAR_MEAN, std=CIFAR_STD,
                      first_conv="conv1", classifier="fc")


@register_model(family="cifar", pretrained_cfg=PRETRAINED_CFG)
def wrn_cifar(depth: int = 28, widen_factor: float = 10, dropout: float = 0.0,
              block_type: str = "B(3,3)", num_classes: int = 10, in_chans: int = 3,
              blocks_per_group: int | None = None, init: InitScheme = "official",
              pretrained: bool = False, **options):
    """WRN-n-k for 32x32 inputs (CIFAR-10/100, SVHN), any depth, width and block type."""
    return build_model(WideResNetCIFAR, "wrn_cifar", pretrained, depth=depth,
                       widen_factor=widen_factor, dropout=dropout, block_type=block_type,
                       num_classes=num_classes, in_chans=in_chans,
                       blocks_per_group=blocks_per_group, init=init, **options)


def _preset(name: str, depth: int, k: int, params_m: str | None, table: str,
            block_type: str = "B(3,3)", blocks_per_group: int | None = None):
    def builder(dropout: float = 0.0, num_classes: int = 10, in_chans: int = 3,
                init: InitScheme = "official", pretrained: bool = False, **options):
        return build_model(WideResNetCIFAR, name, pretrained, depth=depth, widen_factor=k,
                           dropout=dropout, block_type=block_type, num_classes=num_classes,
                           in_chans=in_chans, blocks_per_group=blocks_per_group, init=init,
                           **options)

    builder.__name__ = name
    count = f": {params_m}M parameters" if params_m else ""
    builder.__doc__ = f"WRN-{depth}-{k}-{block_type} ({table}{count})"
    register_model(builder, family="cifar", paper_params_m=params_m, paper_table=table,
                   pretrained_cfg=PRETRAINED_CFG)


# Parameter counts as printed in the paper (None where it prints none).
for _d, _k, _p, _table in [
        (40, 1, "0.6", "Table 4"), (40, 2, "2.2", "Table 4"), (40, 4, "8.9", "Table 4"),
        (40, 8, "35.7", "Table 4"), (28, 10, "36.5", "Table 4"), (28, 12, "52.5", "Table 4"),
        (22, 8, "17.2", "Table 4"), (22, 10, "26.8", "Table 4"), (16, 8, "11.0", "Table 4"),
        (16, 10, "17.1", "Table 4"), (16, 4, None, "Table 6"), (52, 1, None, "Table 6"),
        (40, 10, "56", "Table 9")]:
    _preset(f"wrn_{_d}_{_k}", _d, _k, _p, _table)

# Table 2: block types at k = 2.
for _d, _bt, _code, _p in [(40, "B(1,3,1)", "b131", "1.4"), (40, "B(3,1)", "b31", "1.2"),
                           (40, "B(1,3)", "b13", "1.3"), (40, "B(3,1,1)", "b311", "1.3"),
                           (28, "B(3,3)", "b33", "1.5"), (22, "B(3,1,3)", "b313", "1.1")]:
    _preset(f"wrn_{_d}_2_{_code}", _d, 2, _p, "Table 2", _bt)

# Table 3: WRN-40-2 with deepening factor l = 1..4, blocks per group adjusted to keep 2.2M.
for _l in (1, 2, 3, 4):
    _preset(f"wrn_40_2_l{_l}", 40, 2, "2.2", "Table 3", "B(" + ",".join("3" * _l) + ")",
            blocks_per_group=12 // _l)

# What timm's register_model reads (timm_compat.py): each name's pretrained cfg, in the module of
# its builder, as in timm's own model files.
default_cfgs = generate_default_cfgs({name: model_info(name).pretrained_cfg
                                      for name in list_models(family="cifar")})
