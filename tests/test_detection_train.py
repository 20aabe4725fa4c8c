"""detection.train_net on generated COCO data: Faster R-CNN and RetinaNet training iterations
with detectron2's DefaultTrainer, COCOEvaluator results, resume and eval-only (real detectron2
on the CPU; the multi-iteration ones are marked slow)."""
import json
import math
import os

import pytest

pytest.importorskip("detectron2")

from detection import train_net  # noqa: E402
from detection.coco_check import CocoFormatError  # noqa: E402
from detection.make_coco import make_coco  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRCNN = os.path.join(ROOT, "configs", "detection", "toy_faster_rcnn_wrn18_0_5_fpn.yaml")
RETINA = os.path.join(ROOT, "configs", "detection", "toy_retinanet_wrn18_0_5_fpn.yaml")
AP_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    splits = make_coco(str(root), num_train=16, num_val=6)
    return {"train": splits["train"], "val": splits["val"]}


def args_for(config, data, out, name, *extra_flags, opts=()):
    argv = ["--config-file", config,
            "--train-json", data["train"][0], "--train-images", data["train"][1],
            "--val-json", data["val"][0], "--val-images", data["val"][1],
            "--train-name", f"{name}_train", "--val-name", f"{name}_val", *extra_flags,
            "OUTPUT_DIR", str(out), *opts]
    return train_net.get_parser().parse_args(argv)


def metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_ap(results, dataset):
    bbox = results[dataset]["bbox"] if dataset in results else results["bbox"]
    assert AP_KEYS <= set(bbox)
    assert all(isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 100.0)
               for k, v in bbox.items() if k in AP_KEYS)
    return bbox


@pytest.mark.slow
def test_faster_rcnn_train_resume_and_eval_only(data, tmp_path):
    out = tmp_path / "frcnn"
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2"]
    results = train_net.main(args_for(FRCNN, data, out, "t1", opts=opts))
    check_ap(results, "t1_val")
    rows = [r for r in metrics(out) if "total_loss" in r]
    assert rows and all(math.isfinite(r["total_loss"]) for r in rows)
    assert (out / "model_final.pth").is_file() and (out / "model_0000001.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"

    # --resume continues at iteration 4 (the saved one), up to the new MAX_ITER
    args = args_for(FRCNN, data, out, "t1", "--resume",
                    opts=opts[:1] + ["6"] + opts[2:])
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    trainer.train()
    iters = [r["iteration"] for r in metrics(out) if "total_loss" in r]
    assert max(iters) == 5

    # --eval-only with the final weights: COCOEvaluator (pycocotools) numbers
    res = train_net.main(args_for(FRCNN, data, out, "t1", "--eval-only",
                                  opts=["MODEL.WEIGHTS", str(out / "model_final.pth")]))
    check_ap(res, "t1_val")
    assert (out / "inference" / "t1_val" / "coco_instances_results.json").is_file()


@pytest.mark.slow
def test_retinanet_trains_and_evaluates(data, tmp_path):
    out = tmp_path / "retina"
    results = train_net.main(args_for(RETINA, data, out, "t2", opts=[
        "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "2"]))
    check_ap(results, "t2_val")
    rows = [r for r in metrics(out) if "loss_cls" in r]
    assert rows and all(math.isfinite(r["loss_cls"]) and math.isfinite(r["loss_box_reg"])
                        for r in rows)


@pytest.mark.slow
def test_faster_rcnn_learns_the_toy_set(tmp_path_factory, tmp_path):
    """AP clearly above zero after a short CPU run (the README's demo, shortened)."""
    root = tmp_path_factory.mktemp("coco_ap")
    splits = make_coco(str(root), num_train=32, num_val=8, seed=5)
    data = {"train": splits["train"], "val": splits["val"]}
    results = train_net.main(args_for(FRCNN, data, tmp_path / "ap", "t3", opts=[
        "SOLVER.MAX_ITER", "120", "SOLVER.STEPS", "(100,)", "SOLVER.WARMUP_ITERS", "30",
        "SOLVER.CHECKPOINT_PERIOD", "1000"]))
    bbox = check_ap(results, "t3_val")
    assert bbox["AP50"] > 20.0, bbox


def test_bad_annotations_stop_before_training(data, tmp_path):
    bad = json.load(open(data["train"][0]))
    bad["annotations"][0]["category_id"] = 99
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    d = dict(data, train=(str(path), data["train"][1]))
    with pytest.raises(CocoFormatError, match=r"(?s)bad.json: .*unknown category_id 99"):
        train_net.main(args_for(FRCNN, d, tmp_path / "o", "t4"))
    assert not (tmp_path / "o" / "model_final.pth").exists()


def test_num_classes_from_the_data_and_conflicts(data, tmp_path):
    cfg = train_net.setup(args_for(FRCNN, data, tmp_path / "o", "t5"))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.MODEL.RETINANET.NUM_CLASSES == 3
    assert cfg.DATASETS.TRAIN == ("t5_train",) and cfg.DATASETS.TEST == ("t5_val",)
    assert cfg.MODEL.DEVICE == "cpu"
    with pytest.raises(ValueError, match="NUM_CLASSES 80 was given but the data set has 3"):
        train_net.setup(args_for(FRCNN, data, tmp_path / "o", "t6",
                                 opts=["MODEL.ROI_HEADS.NUM_CLASSES", "80"]))
    # the same name for other files is refused
    other = make_coco(str(tmp_path / "other"), num_train=2, num_val=0)["train"]
    d = dict(data, train=other)
    with pytest.raises(ValueError, match="already registered for other files"):
        train_net.setup(args_for(FRCNN, d, tmp_path / "o", "t5"))


def assert_same_detections(found, expected, tol=1e-3):
    """Each detection has its twin in the other list: same image and category, box and score
    within ``tol``. Matched, not sorted: an untrained model scores many boxes alike, and two
    runs may order near-equal scores differently."""
    unmatched = {}
    for d in expected:
        unmatched.setdefault((d["image_id"], d["category_id"]), []).append(d)
    for d in found:
        twins = unmatched.get((d["image_id"], d["category_id"]), [])
        twin = next((t for t in twins if abs(t["score"] - d["score"]) <= tol and
                     max(abs(x - y) for x, y in zip(t["bbox"], d["bbox"])) <= tol), None)
        assert twin is not None, f"no twin for {d} among {twins[:5]}"
        twins.remove(twin)


@pytest.mark.slow
def test_two_cpu_processes_train_and_evaluate_like_one(data, tmp_path):
    """`--num-gpus 2` without a GPU: two gloo processes (distributed sampler, DDP, gathered
    COCO evaluation, rank-0 checkpoints). The final evaluation of the 2-process run scores the
    same predictions, and so the same AP, as a 1-process evaluation of its saved model."""
    import subprocess
    import sys

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "detection.train_net", "--num-gpus", "2",
           "--config-file", FRCNN, "--train-json", data["train"][0], "--train-images",
           data["train"][1], "--val-json", data["val"][0], "--val-images", data["val"][1],
           "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "2", "OUTPUT_DIR", str(two)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (two / "log.txt.rank1").is_file() and (two / "model_final.pth").is_file()
    rows = metrics(two)
    assert any("total_loss" in r for r in rows)
    two_ap = next(r for r in rows if "bbox/AP" in r)
    preds_two = json.load(open(two / "inference" / "wrn_coco_val" / "coco_instances_results.json"))

    one = tmp_path / "one"
    res = train_net.main(args_for(FRCNN, data, one, "t7", "--eval-only",
                                  opts=["MODEL.WEIGHTS", str(two / "model_final.pth")]))
    preds_one = json.load(open(one / "inference" / "t7_val" / "coco_instances_results.json"))
    assert len(preds_two) == len(preds_one) > 0
    assert {p["image_id"] for p in preds_two} == {p["image_id"] for p in preds_one}
    assert_same_detections(preds_two, preds_one)
    bbox = check_ap(res, "t7_val")
    for k in AP_KEYS:
        assert math.isnan(bbox[k]) == math.isnan(two_ap[f"bbox/{k}"])
        if not math.isnan(bbox[k]):
            assert two_ap[f"bbox/{k}"] == pytest.approx(bbox[k], abs=1e-6), k


COCO_WRN34_2 = [os.path.join(ROOT, "configs", "detection", name) for name in
                ("faster_rcnn_wrn34_2_fpn_1x.yaml", "retinanet_wrn34_2_fpn_1x.yaml")]


def coco_config_on_toy_data(data, out, config, name, device, *sizes):
    """A COCO recipe (WRN-34-2, FrozenBN, COCO's input sizes unless ``sizes``) for 4
    iterations on the toy set, then COCO evaluation; returns its results."""
    opts = ["MODEL.DEVICE", device, "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4",
            "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "100", *sizes]
    return train_net.main(args_for(config, data, out, name, opts=opts))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", COCO_WRN34_2, ids=["faster_rcnn_wrn34_2", "retinanet_wrn34_2"])
def test_coco_recipes_train_and_evaluate_on_the_gpu(data, tmp_path, config):
    name = "gpu_" + os.path.basename(config).split("_")[0]
    results = coco_config_on_toy_data(data, tmp_path / "gpu", config, name, "cuda")
    check_ap(results, f"{name}_val")
    rows = [r for r in metrics(tmp_path / "gpu") if "total_loss" in r]
    assert rows and all(math.isfinite(r["total_loss"]) for r in rows)
