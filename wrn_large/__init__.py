"""wrn_large: every Wide Residual Network of Zagoruyko & Komodakis (2016) in one registry.

    import wrn_large
    model = wrn_large.create_model("wrn_cifar", depth=28, widen_factor=10, dropout=0.3)
    model = wrn_large.create_model("wrn34_x2")          # the paper's WRN-34-2 (ImageNet, COCO)
    wrn_large.list_models("wrn_40*")
"""
from ._features import FeatureInfo
from ._registry import (ModelInfo, argument_problem, create_model, is_model, list_models,
                        model_info, register_model)
from . import cifar, imagenet  # noqa: F401  (registers the models)
from .stats import count_params, count_macs
from . import timm_compat  # noqa: F401  (mirrors the registry into timm's)

__all__ = ["FeatureInfo", "ModelInfo", "argument_problem", "create_model", "is_model",
           "list_models", "model_info", "register_model", "count_params", "count_macs"]
