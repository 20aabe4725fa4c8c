"""Weight initialisation shared by the WRN families."""
from __future__ import annotations

import torch.nn as nn


def he_init(model: nn.Module, zero_linear_bias: bool) -> None:
    """Convolutions N(0, sqrt(2 / (k*k*out_channels))) (He et al., "MSRinit" in the official WRN
    code, torchvision's ResNet init), BatchNorm weight 1 and bias 0; Linear biases 0 if asked
    (the official CIFAR code), else Linear layers keep torch's default (torchvision)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)
