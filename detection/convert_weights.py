"""Convert an ImageNet WRN checkpoint into backbone weights for detectron2's ``MODEL.WEIGHTS``.

    python -m detection.convert_weights runs/wrn34_x2/checkpoints/last.pt wrn34_x2_d2.pth
    python -m detection.convert_weights wide_resnet50_2-95faca4b.pth wrn50_2_d2.pth --name wrn50_2_bottleneck

The input is one of our trainer's checkpoints (``{"model": state_dict, ...}``; DDP/compile
prefixes are stripped; ``--ema`` takes the EMA copy), a DeepSpeed checkpoint directory of ours
(its ``weights.pt``), or a torchvision state dict. The classifier (``fc.*``) is dropped, BN's
step counters too, and every key is prefixed with where detectron2 keeps the WRN: ``backbone.bottom_up.`` for
the FPN backbones (default), ``backbone.`` for ``build_wrn_backbone`` (``--plain``); for C4
models (``--c4``) the stem and res2-res4 go under ``backbone.`` and the last stage (``layer4.``)
under ``roi_heads.res5.``, where ``WRNRes5ROIHeads`` keeps it. The output
is a detectron2 checkpoint ``{"model": ..., "__author__": ..., "matching_heuristics": False}``:
names match exactly, so detectron2 reports only its own heads (FPN, RPN, ROI/RetinaNet heads)
as missing.
"""
from __future__ import annotations

import argparse
import os

import torch

from wrn_large.weights import read_state_dict

FPN_PREFIX = "backbone.bottom_up."
PLAIN_PREFIX = "backbone."
C4 = "c4"                 # as a prefix: backbone. for the trunk, roi_heads.res5. for layer4
C4_RES5 = ("layer4.", "roi_heads.res5.")
CLASSIFIER_PREFIXES = ("fc.",)


def checkpoint_file(path: str) -> str:
    """A checkpoint file, or the ``weights.pt`` inside one of our DeepSpeed checkpoint dirs."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, "weights.pt")
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"{path} is a directory without weights.pt: not a DeepSpeed "
                                    f"checkpoint directory of our trainer")
        return inner
    return path


def convert_state_dict(state: dict[str, torch.Tensor], prefix: str = FPN_PREFIX,
                       source: str = "<state dict>", name: str | None = None) -> dict:
    """Backbone weights under ``prefix``, classifier and BN step counters dropped.

    ``name``: a ``wrn_large`` registry name to check the shapes against (optional)."""
    if any(k.startswith("backbone.") for k in state):
        raise ValueError(f"{source}: keys already start with 'backbone.'; this looks like a "
                         f"detectron2 checkpoint, not an ImageNet WRN")
    if "conv1.weight" not in state or not any(k.startswith("layer1.") for k in state):
        raise ValueError(f"{source}: no 'conv1.weight' / 'layer1.*' keys: not a WRN state dict "
                         f"with torchvision names (first keys: {list(state)[:5]})")
    kept = {k: v for k, v in state.items()
            if not k.startswith(CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked")}
    if name is not None:
        import wrn_large

        model = wrn_large.create_model(name)
        own = {k: v for k, v in model.state_dict().items()
               if not k.startswith(CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked")}
        missing = sorted(set(own) - set(kept))
        unexpected = sorted(set(kept) - set(own))
        shapes = [f"{k}: {tuple(kept[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in kept and kept[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{source} does not match {name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, shapes {shapes[:5]}")
    if prefix == C4:
        return {_c4_name(k): v.detach().clone() for k, v in kept.items()}
    return {prefix + k: v.detach().clone() for k, v in kept.items()}


def _c4_name(key: str) -> str:
    stage, head = C4_RES5
    return head + key[len(stage):] if key.startswith(stage) else PLAIN_PREFIX + key


def convert(src: str, dst: str, plain: bool = False, use_ema: bool = False,
            name: str | None = None, c4: bool = False) -> dict:
    src_file = checkpoint_file(src)
    state = read_state_dict(src_file, use_ema=use_ema)
    prefix = C4 if c4 else PLAIN_PREFIX if plain else FPN_PREFIX
    model = convert_state_dict(state, prefix, src_file, name)
    out = {"model": model, "__author__": f"wrn_large ({os.path.basename(src_file)})",
           "matching_heuristics": False}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp"
    torch.save(out, tmp)
    os.replace(tmp, dst)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="our checkpoint (.pt), DeepSpeed checkpoint dir, or a "
                                    "torchvision state dict")
    parser.add_argument("dst", help="output .pth for MODEL.WEIGHTS")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fpn", action="store_true",
                       help="for build_wrn_fpn_backbone / build_wrn_retinanet_fpn_backbone "
                            "(keys under backbone.bottom_up.; the default)")
    group.add_argument("--plain", action="store_true",
                       help="for build_wrn_backbone (keys under backbone.)")
    group.add_argument("--c4", action="store_true",
                       help="for C4 models (build_wrn_backbone + WRNRes5ROIHeads: layer4 under "
                            "roi_heads.res5., the rest under backbone.)")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights")
    parser.add_argument("--name", help="wrn_large registry name to check the shapes against, "
                                       "e.g. wrn34_x2")
    args = parser.parse_args(argv)
    out = convert(args.src, args.dst, plain=args.plain, use_ema=args.ema, name=args.name,
                  c4=args.c4)
    n = sum(v.numel() for v in out["model"].values())
    where = ("backbone. and roi_heads.res5." if args.c4 else
             PLAIN_PREFIX if args.plain else FPN_PREFIX)
    print(f"wrote {args.dst}: {len(out['model'])} tensors, {n / 1e6:.1f}M values, keys under "
          f"{where}")


if __name__ == "__main__":
    main()
