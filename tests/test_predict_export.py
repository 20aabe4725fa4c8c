"""python -m engine predict / export on a checkpoint of a real (tiny) run: the checkpoint
holds the class names (and the data set's readable names), predict uses the run's validation
preprocessing, and each export format is checked against the eager model on real images. The
eval preset (pipelines/presets.py) is the one description of that preprocessing: predict,
export's meta.json and the loaders' evaluation all follow a change of data.val_resize."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.checkpoint import checkpoint_dir, list_checkpoints, load_file
from engine.inference import load_trained
from trainer_utils import REPO, base_overrides, make_folder, run_training

NAMES = {"class_0": "red things", "class_1": "green things", "class_2": "blue things"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    data = make_folder(tmp_path_factory.mktemp("folder"))
    (data / "classes.tsv").write_text("index\twnid\tname\n" + "".join(
        f"{i}\t{c}\t{n}\n" for i, (c, n) in enumerate(NAMES.items())))
    out = tmp_path_factory.mktemp("run")
    run_training(base_overrides(data, out, **{"train.epochs": 1}))
    return data, list_checkpoints(checkpoint_dir(out))[0]


def engine_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_checkpoint_holds_the_class_names(checkpoint):
    state = load_file(checkpoint[1])
    assert state["classes"] == list(NAMES) and state["class_names"] == list(NAMES.values())
    assert state["num_classes"] == 3


@pytest.mark.slow
def test_predict_uses_the_runs_preprocessing_and_names(checkpoint):
    from pipelines import LoaderSpec, build_loader
    data, path = checkpoint
    trained = load_trained(path)
    loader = build_loader(trained.cfg.data, LoaderSpec("val", batch_size=21))
    images, labels = next(iter(loader))
    with torch.no_grad():
        want = trained.model(images).softmax(1)
    proc = engine_cli("predict", path, data / "val", "--json", "--topk", "3")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # both in path order: class folders, then file names
    assert [r["image"] for r in got] == sorted(r["image"] for r in got) and len(got) == 21
    for row, probs in zip(got, want):
        top = row["top"][0]
        k = trained.classes.index(top["class"])
        assert top["probability"] == pytest.approx(probs[k].item(), abs=1e-5)
        assert k == probs.argmax().item() and top["name"] == NAMES[top["class"]]
    text = engine_cli("predict", path, data / "val" / "class_0" / "000.jpg")
    assert "(class_" in text.stdout and "%" in text.stdout
    missing = engine_cli("predict", path, data / "nope.jpg")
    assert missing.returncode == 2 and "no such image or folder" in missing.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "exported"])
def test_export_is_checked_against_the_model(checkpoint, tmp_path, fmt):
    _, path = checkpoint
    out = tmp_path / f"model.{fmt}"
    proc = engine_cli("export", path, "--format", fmt, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checked on 4 real images at batch sizes 1 and 4" in proc.stdout
    if fmt == "torchscript":
        extra = {"meta.json": ""}
        torch.jit.load(str(out), _extra_files=extra)
        meta = json.loads(extra["meta.json"])
    elif fmt == "onnx":
        import onnx
        meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["meta.json"])
    else:
        extra = {"meta.json": ""}
        torch.export.load(str(out), extra_files=extra)
        meta = json.loads(extra["meta.json"])
    assert meta["class_names"] == list(NAMES.values())
    assert meta["preprocessing"]["image_size"] == 32
    # every number of the preprocessing (ImageNet's constants, in 0-255 units)
    pre = meta["preprocessing"]
    assert pre["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert pre["std"] == pytest.approx([58.395, 57.12, 57.375])
    assert (pre["resize"], pre["crop"], pre["crop_at"]) == (36, 32, "center")
    assert pre["interpolation"].startswith("bilinear")


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["zca", "meanstd"])
def test_predict_normalises_a_cifar_run_as_its_training_did(tmp_path, normalization):
    """ZCA, and mean/std left null in the config, are fitted on the run's training set: predict
    fits them again from data.root (the ZCA from its cache), and its probabilities are the
    model's on the run's own validation batches. Export carries the fitted mean/std, and
    refuses ZCA (its matrix is not in the file) with what to use instead."""
    from PIL import Image
    from engine.export import export
    from engine.inference import predict
    from pipelines import LoaderSpec, build_loader
    from pipeline_data import write_cifar
    root = tmp_path / "cifar"
    train_x, _, test_x, _ = write_cifar(root, per_batch=20, test=6)
    out = tmp_path / "run"
    run_training(base_overrides(root, out, **{
        "data.dataset": "cifar10", "data.normalization": normalization, "data.mean": "null",
        "data.std": "null", "train.epochs": 1}))
    files = []
    for i, pixels in enumerate(test_x):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(files[-1])
    checkpoint = list_checkpoints(checkpoint_dir(out))[0]
    trained = load_trained(checkpoint)
    images, _ = next(iter(build_loader(trained.cfg.data, LoaderSpec("val", batch_size=6))))
    with torch.no_grad():
        want = trained.model(images).softmax(1)
    got = predict(trained, files, topk=10)
    for row, probs in zip(got, want):
        by_class = {t["class"]: t["probability"] for t in row["top"]}
        assert [by_class[c] for c in trained.classes] == pytest.approx(probs.tolist(), abs=1e-5)
    if normalization == "zca":
        with pytest.raises(ValueError, match="ZCA whitening .* is not: classify with"):
            export(str(checkpoint), "torchscript", str(tmp_path / "m.ts"), [str(f) for f in files])
        return
    export(str(checkpoint), "torchscript", str(tmp_path / "m.ts"), [str(f) for f in files])
    extra = {"meta.json": ""}
    torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    meta = json.loads(extra["meta.json"])["preprocessing"]
    train = train_x.reshape(-1, 3).astype(np.float64)
    assert meta["mean"] == pytest.approx(train.mean(0).tolist(), rel=1e-5)
    assert meta["std"] == pytest.approx(train.std(0, ddof=1).tolist(), rel=1e-5)


def write_checkpoint(path, cfg, classes):
    """A checkpoint as load_trained reads it (the trainer's keys), of an untrained model."""
    import wrn_large
    from engine.config import to_dict
    model = wrn_large.create_model(cfg.model.name, num_classes=len(classes), **cfg.model.kwargs)
    torch.save({"config": to_dict(cfg), "model": model.state_dict(),
                "num_classes": len(classes), "classes": classes}, path)
    return path


def test_a_changed_val_resize_shows_in_predict_export_and_the_loaders(tmp_path):
    """data.val_resize 36 -> 64 (crop 32): predict's preprocessing, the meta.json export
    writes, and the evaluation batches of both loaders (DALI on the CPU, torch) change with it
    and stay equal to one another: one preset, built from the config, used by all."""
    from dataclasses import replace
    from engine.config import load_config
    from engine.export import meta_json
    from engine.inference import image_files, load_images, preprocess
    from pipelines import LoaderSpec, build_loader
    from pipelines.presets import EvalPreset
    data = make_folder(tmp_path / "data", train_per_class=1, val_per_class=3)
    files = image_files([str(data / "val")])
    seen = {}
    for resize in (36, 64):
        cfg = load_config(overrides=base_overrides(data, tmp_path / "run",
                                                   **{"data.val_resize": resize}))
        trained = load_trained(write_checkpoint(tmp_path / f"step_{resize}.pt", cfg,
                                                ["class_0", "class_1", "class_2"]))
        transform = preprocess(trained.cfg)                       # what predict applies
        assert transform == EvalPreset(crop_size=32, resize_size=resize)
        predicted = load_images(files, transform)
        meta = json.loads(meta_json(trained, transform))["preprocessing"]
        assert (meta["resize"], meta["crop"], meta["val_resize"]) == (resize, 32, resize)
        assert meta["mean"] == pytest.approx([123.675, 116.28, 103.53])
        # torch: PIL + the preset itself; DALI: its decoder, then torch_resize with the preset
        # (within float rounding of torchvision), or its GPU graph run on the CPU with the
        # preset's sizes and mean/std (DALI's resampler: within a level on average); in 8-bit
        # levels, mean and max
        for backend, resize_with, tolerance in (("torch", "auto", (1e-6, 1e-5)),
                                                ("dali", "torch", (1e-4, 1e-3)),
                                                ("dali", "dali", (0.5, 1.5))):
            loader = build_loader(replace(trained.cfg.data, backend=backend, workers=1,
                                          resize_with=resize_with),
                                  LoaderSpec("val", batch_size=len(files)))
            (images, labels), = list(loader)
            assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
            levels = ((images - predicted) * torch.tensor(meta["std"]).view(3, 1, 1)).abs()
            assert levels.mean() < tolerance[0] and levels.max() < tolerance[1], (
                backend, resize_with, levels.mean(), levels.max())
        seen[resize] = predicted
    assert (seen[36] - seen[64]).abs().mean() > 0.05        # the change shows: another image
