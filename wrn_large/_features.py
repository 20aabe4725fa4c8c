"""Multi-scale feature description shared by every model (read by the Detectron2 adapter)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureInfo:
    name: str      # "res2" ... "res5", Detectron2's naming
    channels: int
    stride: int    # input pixels per feature pixel
