"""Weight initialisation of the WRN families, by name.

- ``official``: the authors' CIFAR/SVHN code (szagoruyko/wide-residual-networks at ae6d0d0).
  Convolutions N(0, sqrt(2 / (k*k*in_channels))): ``models/utils.lua`` MSRinit L3-9
  (``n = v.kW*v.kH*v.nInputPlane``, fan-in since the 2016-09-08 "fix MSRA init") and
  ``pytorch/utils.py`` L18-19 (``kaiming_normal_``, fan_in by default). BatchNorm weight
  U(0, 1), bias 0: Lua torch's ``BatchNormalization:reset`` (``weight:uniform()``) and
  ``pytorch/utils.py`` ``bnparams`` L26-30 (``torch.rand``).
- ``torchvision``: torchvision's ResNet init, which the ImageNet WRNs keep (they came from
  fb.resnet.torch, and torchvision's weights were trained so): convolutions fan-out
  N(0, sqrt(2 / (k*k*out_channels))), BatchNorm weight 1. On CIFAR it is the common modern
  choice: every block starts at the same scale whatever its width.

Linear layers keep torch's default U(+-1/sqrt(in_features)), which is Lua torch's
``nn.Linear:reset`` too; the CIFAR family zeroes their bias (``utils.lua`` FCinit).
"""
from __future__ import annotations

from typing import Literal

import torch.nn as nn

InitScheme = Literal["official", "torchvision"]
INIT_SCHEMES = ("official", "torchvision")


def init_weights(model: nn.Module, scheme: InitScheme, zero_linear_bias: bool) -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(INIT_SCHEMES)}")
    official = scheme == "official"
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in" if official else "fan_out",
                                    nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.0, 1.0) if official else nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)
