"""``python -m engine export CHECKPOINT --format torchscript|onnx|exported``: a checkpoint of
``train_imagenet.py`` as a file for serving, with its class names and preprocessing inside
(``meta.json``: TorchScript and torch.export extra files, ONNX metadata), proven before it is
kept: the exported model's logits on real images, at two batch sizes (the batch dimension is
dynamic), equal the eager model's within ``RTOL``/``ATOL`` (ONNX run with onnxruntime)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .inference import Trained, image_files, load_images, load_trained, preprocess

RTOL, ATOL = 1e-4, 1e-4
SUFFIX = {"torchscript": ".ts.pt", "onnx": ".onnx", "exported": ".pt2"}


def meta_json(trained: Trained, transform) -> str:
    """The names and the preprocessing a server must apply, every number of it, as ``transform``
    (``inference.preprocess``: the run's eval preset, or a CIFAR/SVHN run's transform with its
    fitted normalisation) describes itself."""
    d = trained.cfg.data
    return json.dumps({
        "model": trained.cfg.model.name, "classes": trained.classes,
        "class_names": trained.names, "input": "float32 (N, 3, H, W), RGB",
        "preprocessing": {"dataset": d.dataset, "image_size": d.image_size,
                          "val_resize": d.val_resize, "normalization": d.normalization,
                          **transform.describe()}})


def export_torchscript(model, example, path: Path, meta: str):
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(path), _extra_files={"meta.json": meta})
    return torch.jit.load(str(path))


def export_exported(model, example, path: Path, meta: str):
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path), extra_files={"meta.json": meta})
    return torch.export.load(str(path)).module()


def export_onnx(model, example, path: Path, meta: str):
    import onnx
    import onnxruntime as ort
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example,), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True,
                      external_data=False,
                      verbose=False)
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="meta.json", value=meta)
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


EXPORTERS = {"torchscript": export_torchscript, "onnx": export_onnx, "exported": export_exported}


def default_images(trained: Trained) -> list[str]:
    root = trained.cfg.data.root
    val = Path(root) / "val" if root else None
    if val is None or not val.is_dir():
        raise FileNotFoundError("give --images: the checkpoint's data.root has no val/ folder")
    return [str(p) for p in image_files([str(val)])[:4]]


@torch.no_grad()
def export(checkpoint: str, fmt: str, out: str | None = None, images: list[str] | None = None,
           use_ema: bool = False) -> dict:
    trained = load_trained(checkpoint, use_ema)
    transform = preprocess(trained.cfg)
    meta = meta_json(trained, transform)
    files = image_files(images or default_images(trained))
    batch = load_images(files, transform)
    if len(batch) < 2:
        batch = torch.cat([batch, batch.flip(-1)])   # two images: the batch size must vary
    path = Path(out or Path(checkpoint).with_suffix(SUFFIX[fmt]))
    run = EXPORTERS[fmt](trained.model, batch[:2], path, meta)
    worst = 0.0
    for x in (batch[:1], batch):                      # batch sizes 1 and N
        want, got = trained.model(x), run(x)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{fmt} export differs from the model: {m}")
        worst = max(worst, (got - want).abs().max().item())
    return {"file": str(path), "format": fmt, "images": len(batch), "max_abs_diff": worst}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m engine export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_N.pt of a run")
    p.add_argument("--format", choices=sorted(EXPORTERS), required=True)
    p.add_argument("--out", help=f"output file (default: next to the checkpoint, {SUFFIX})")
    p.add_argument("--images", nargs="+", help="images or folders to check the export on "
                                               "(default: 4 from the run's data.root/val)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    a = p.parse_args(argv)
    try:
        result = export(a.checkpoint, a.format, a.out, a.images, a.ema)
    except (FileNotFoundError, ValueError, AssertionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['file']} ({a.format}); checked on {result['images']} real images at "
          f"batch sizes 1 and {result['images']}: max |logit difference| "
          f"{result['max_abs_diff']:.2e} (tolerance rtol {RTOL}, atol {ATOL})")
    return 0
