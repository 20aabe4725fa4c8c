"""Multi-scale feature description shared by every model: timm's format (a dict with ``num_chs``,
``reduction``, ``module``: what ``features_only=True`` wraps) with Detectron2's stage name, and
the same values as attributes (``name``, ``channels``, ``stride``) for the Detectron2 adapter."""
from __future__ import annotations


class FeatureInfo(dict):
    def __init__(self, name: str, channels: int, stride: int, module: str):
        super().__init__(num_chs=channels, reduction=stride, module=module, name=name)

    @property
    def name(self) -> str:          # "res2" ... "res5", Detectron2's naming
        return self["name"]

    @property
    def channels(self) -> int:
        return self["num_chs"]

    @property
    def stride(self) -> int:        # input pixels per feature pixel
        return self["reduction"]

    @property
    def module(self) -> str:        # the module whose output it is
        return self["module"]
