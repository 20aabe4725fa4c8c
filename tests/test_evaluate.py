"""train_imagenet.py --eval-only: a saved checkpoint (or its EMA) evaluated alone gives the
accuracy the training run reported, with one process or two; per-class accuracy and the
confusion matrix; a clear error for a missing checkpoint."""
import json

import pytest

from engine.checkpoint import checkpoint_dir, list_checkpoints
from trainer_utils import base_overrides, epochs, make_folder, run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = make_folder(tmp_path_factory.mktemp("folder"))
    out = tmp_path_factory.mktemp("run")
    run_training(base_overrides(data, out, **{"train.epochs": 1, "train.ema_decay": 0.5}))
    return data, out, epochs(out)[-1], list_checkpoints(checkpoint_dir(out))[0]


def evaluate(data, out, checkpoint, *flags, nproc=1, **overrides):
    proc = run_training(["--eval-only", *flags, *base_overrides(
        data, out, **{"model.pretrained": checkpoint, **overrides})], nproc=nproc)
    return json.loads((out / "eval.json").read_text()), proc.stdout


def test_checkpoint_alone_gives_the_reported_accuracy(trained, tmp_path):
    data, _, reported, checkpoint = trained
    got, stdout = evaluate(data, tmp_path / "one", checkpoint)
    assert got["val_samples"] == reported["val_samples"] == 21
    assert got["top1"] == reported["top1"]
    assert got["val_loss"] == pytest.approx(reported["val_loss"], rel=1e-6)
    assert "top-1 / top-5 (%)" in stdout and not got["ema"]
    ema, _ = evaluate(data, tmp_path / "ema", checkpoint, **{"model.pretrained_ema": True})
    assert ema["ema"] and ema["top1"] == reported["top1_ema"]
    assert ema["val_loss"] == pytest.approx(reported["val_loss_ema"], rel=1e-6)


def test_two_processes_count_every_image_once(trained, tmp_path):
    data, _, reported, checkpoint = trained
    got, _ = evaluate(data, tmp_path / "two", checkpoint, nproc=2)
    assert got["processes"] == 2 and got["val_samples"] == 21
    assert got["top1"] == pytest.approx(reported["top1"])
    assert got["val_loss"] == pytest.approx(reported["val_loss"], rel=1e-5)


def test_per_class_accuracy_and_confusion_matrix(trained, tmp_path):
    data, _, reported, checkpoint = trained
    got, _ = evaluate(data, tmp_path / "classes", checkpoint, "--per-class")
    per_class = got["per_class_top1"]
    assert list(per_class) == ["class_0", "class_1", "class_2"]
    assert sum(per_class.values()) / 3 == pytest.approx(got["top1"])   # 7 val images each
    assert (tmp_path / "classes" / "confusion.png").stat().st_size > 1000


def test_missing_checkpoint_is_a_clear_error(trained, tmp_path):
    data = trained[0]
    proc = run_training(["--eval-only", *base_overrides(
        data, tmp_path, **{"model.pretrained": str(tmp_path / "nope.pt")})], check=False)
    assert proc.returncode == 2
    assert f"checkpoint not found: {tmp_path / 'nope.pt'}" in proc.stderr
