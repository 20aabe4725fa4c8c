"""Our registry in timm's: after ``import wrn_large``, ``timm.create_model("wrn_28_10")`` calls the
same builder as ``wrn_large.create_model`` (timm's ``build_model_with_cfg``, _builder.py), and
``timm.list_models("wrn*")``, ``get_pretrained_cfg`` and ``resolve_data_config`` know every
name. Our names never shadow timm's own: a clash is an error at import."""
from __future__ import annotations

import sys

from ._registry import _builders, _model_info

from timm.models import _registry as timm_registry
from timm.models import generate_default_cfgs
from timm.models import register_model as timm_register_model


def register_all() -> list[str]:
    done = []
    for name, builder in _builders.items():
        existing = timm_registry._model_entrypoints.get(name)
        if existing is builder:
            continue
        if existing is not None:
            raise RuntimeError(f"model name {name!r} already exists in timm's registry")
        # timm's register_model reads the pretrained cfg from the builder's module, as in
        # timm's own model files (``default_cfgs`` next to the models)
        module = sys.modules[builder.__module__]
        if not hasattr(module, "default_cfgs"):
            module.default_cfgs = {}
        module.default_cfgs.update(generate_default_cfgs({name: _model_info[name].pretrained_cfg}))
        timm_register_model(builder)
        done.append(name)
    return done


register_all()
