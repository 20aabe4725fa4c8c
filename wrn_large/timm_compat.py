"""Our registry in timm's: after ``import wrn_large``, ``timm.create_model("wrn_28_10")`` calls the
same builder as ``wrn_large.create_model`` (timm's ``build_model_with_cfg``, _builder.py), and
``timm.list_models("wrn*")``, ``get_pretrained_cfg`` and ``resolve_data_config`` know every
name. Our names never shadow timm's own: a clash is an error at import.

Only timm's public registry API: ``is_model``/``model_entrypoint`` to see what timm has, and
``register_model``, which reads each name's pretrained cfg from the ``default_cfgs`` of its
builder's module (``generate_default_cfgs`` in cifar.py and imagenet.py, as in timm's own model
files)."""
from __future__ import annotations

from timm.models import is_model, model_entrypoint, register_model

from ._registry import _builders


def register_all() -> list[str]:
    """Register each of our names that timm lacks; return them. A name timm has with our builder
    is skipped (a re-import); a name timm has with another builder is an error, raised before
    anything is registered."""
    clashes = [f"{name!r} (timm's is {model_entrypoint(name).__module__})"
               for name, builder in _builders.items()
               if is_model(name) and model_entrypoint(name) is not builder]
    if clashes:
        raise RuntimeError(f"model name(s) of wrn_large already in timm's registry: "
                           f"{', '.join(clashes)}; rename ours (it would shadow timm's)")
    todo = [builder for name, builder in _builders.items() if not is_model(name)]
    for builder in todo:
        register_model(builder)
    return [builder.__name__ for builder in todo]


register_all()
