"""``add_wrn_config(cfg)``: the ``MODEL.WRN`` keys, and ``_BASE_`` resolution of model-zoo files.

Which WRN is built (one scheme, two forms):

- ``MODEL.WRN.NAME`` is a name of the ``wrn_large`` registry: a preset such as ``"wrn34_x2"``
  (the paper's WRN-34-2, the default) or ``"wrn50_2_bottleneck"``, or a generic builder;
- ``MODEL.WRN.DEPTH`` / ``MODEL.WRN.WIDTH`` are that builder's depth and width. They are needed
  only for the generic builders (``NAME: "wrn_imagenet"`` with ``DEPTH: 18``, ``WIDTH: 0.5``;
  for ``wrn_cifar`` WIDTH is the widen factor k). 0 means "the builder's own value"; set on a
  preset they must agree with it (a mismatch is an error, never silently ignored).

The rest: ``OUT_FEATURES`` (subset of res2..res5), ``NORM`` (``FrozenBN``, ``BN``, ``SyncBN``,
``naiveSyncBN``). Freezing uses detectron2's own ``MODEL.BACKBONE.FREEZE_AT`` (0: train all,
1: freeze the stem, 2: stem and res2, ... 5: everything), as for its ResNets.

Config files under ``configs/detection`` put detectron2's model-zoo files in ``_BASE_`` as the
GitHub address of the file (``MODEL_ZOO_URL + "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"``).
fvcore resolves any other ``_BASE_`` relative to the including file, which cannot reach the
installed package. Importing ``detection`` registers a detectron2 ``PathManager`` handler that
serves that address prefix from the installed ``detectron2/model_zoo/configs`` (nothing is
downloaded; the copy matches the installed detectron2).
"""
from __future__ import annotations

import os

from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathHandler, PathManager

MODEL_ZOO_URL = "https://raw.githubusercontent.com/facebookresearch/detectron2/main/configs/"
NORMS = ("FrozenBN", "BN", "SyncBN", "naiveSyncBN")

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "detection")


def add_wrn_config(cfg: CN) -> CN:
    """Add the ``MODEL.WRN`` node (in place; returns ``cfg``). Safe to call twice."""
    if "WRN" in cfg.MODEL:
        return cfg
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.WRN = CN()
    cfg.MODEL.WRN.NAME = "wrn34_x2"
    cfg.MODEL.WRN.DEPTH = 0
    cfg.MODEL.WRN.WIDTH = 0.0
    cfg.MODEL.WRN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.WRN.NORM = "FrozenBN"
    if was_frozen:
        cfg.freeze()
    return cfg


def get_wrn_cfg() -> CN:
    """detectron2's default config with the ``MODEL.WRN`` keys."""
    from detectron2.config import get_cfg

    return add_wrn_config(get_cfg())


def config_file(name: str) -> str:
    """Path of one of this repository's detection configs, e.g. ``"faster_rcnn_wrn34_2_fpn_1x.yaml"``."""
    path = os.path.join(_REPO_CONFIGS, name)
    if not os.path.isfile(path):
        have = sorted(f for f in os.listdir(_REPO_CONFIGS) if f.endswith(".yaml"))
        raise FileNotFoundError(f"no detection config {name!r} in {_REPO_CONFIGS}; "
                                f"available: {', '.join(have)}")
    return path


class ModelZooConfigHandler(PathHandler):
    """Serves ``MODEL_ZOO_URL + X`` from the installed ``detectron2/model_zoo/configs/X``."""

    PREFIX = MODEL_ZOO_URL

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    @staticmethod
    def _local(path: str) -> str:
        import detectron2.model_zoo

        root = os.path.join(os.path.dirname(detectron2.model_zoo.__file__), "configs")
        local = os.path.normpath(os.path.join(root, path[len(ModelZooConfigHandler.PREFIX):]))
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{path}: no such file in the installed detectron2 model "
                                    f"zoo ({local})")
        return local

    def _get_local_path(self, path, **kwargs):
        return self._local(path)

    def _open(self, path, mode="r", **kwargs):
        return open(self._local(path), mode)

    def _exists(self, path, **kwargs):
        try:
            self._local(path)
            return True
        except FileNotFoundError:
            return False

    _isfile = _exists


if MODEL_ZOO_URL not in PathManager._path_handlers:  # import once per process
    PathManager.register_handler(ModelZooConfigHandler())
