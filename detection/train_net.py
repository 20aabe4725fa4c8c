"""Train and evaluate detectron2 models with WRN backbones (detectron2's tools/train_net.py,
plus COCO-format data sets registered from paths).

    python -m detection.train_net --config-file configs/detection/faster_rcnn_wrn34_2_fpn_1x.yaml \
        --train-json ann/instances_train.json --train-images train/ \
        --val-json ann/instances_val.json --val-images val/ \
        --num-gpus 8 MODEL.WEIGHTS wrn34_x2_d2.pth OUTPUT_DIR output/frcnn_wrn34_2
    ... --resume                       # continue from OUTPUT_DIR/last_checkpoint
    ... --eval-only MODEL.WEIGHTS output/frcnn_wrn34_2/model_final.pth

Without --train-json/--val-json, DATASETS.TRAIN/TEST of the config are used (e.g. detectron2's
builtin coco_2017_train with DETECTRON2_DATASETS set). Annotation files given by path are
validated once per job, before the worker processes start (``detection.coco_check.check_once``:
cached by file size and mtime, so a restart does not pay again); the quirks real releases carry
(zero-height boxes, crowd regions, ...) are counted, listed in ``OUTPUT_DIR/coco_quirks_*.json``
and passed to detectron2 unchanged (``--strict`` refuses them). The number of classes is taken
from the files.

``--num-gpus N`` starts N processes: one per GPU with CUDA, N CPU processes over gloo without.
Multi-machine: --num-machines N --machine-rank R --dist-url tcp://HOST:PORT, as detectron2.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm

import detection  # noqa: F401  (registers the WRN backbones: always imported here)
from detection.coco_check import CocoFormatError, CocoReport, check_once, gc_paused
from detection.config import get_wrn_cfg

log = logging.getLogger("detection.train_net")

NUM_CLASSES_KEYS = ("MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES")


@contextlib.contextmanager
def cpu_aware_ddp():
    """DefaultTrainer wraps its model with ``create_ddp_model``, which passes
    ``device_ids=[local rank]``: DistributedDataParallel refuses that for a CPU model. Within
    this block a CPU model gets ``device_ids=None`` (gloo); CUDA models are untouched."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and not next(model.parameters()).is_cuda:
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer evaluating with COCOEvaluator (pycocotools), on GPUs or, with
    several processes, on CPUs over gloo."""

    def __init__(self, cfg):
        with cpu_aware_ddp():
            super().__init__(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's, with the cycle collector paused while it reads the annotations
        (train2017's 860,001: load_coco_json ~25 s -> ~15 s)."""
        with gc_paused():
            return super().build_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True,
                             output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate the model that is saved: with several processes and plain BN, each rank's
        running statistics have drifted apart (DefaultTrainer does not broadcast buffers), and
        checkpoints hold rank 0's, so every rank first takes rank 0's buffers."""
        broadcast_buffers(model)
        return super().test(cfg, model, evaluators)

    def train(self):
        """Train; returns the final evaluation results, None without DATASETS.TEST
        (DefaultTrainer.train() returns them only when TEST.EXPECTED_RESULTS is set; its
        EvalHook keeps them in _last_eval_results)."""
        results = super().train()
        return results if results is not None else getattr(self, "_last_eval_results", None)


def check_datasets(args) -> dict[str, CocoReport]:
    """Check --train-json/--val-json once, before any worker starts: split -> report."""
    reports = {}
    for split in ("train", "val"):
        js, images = getattr(args, f"{split}_json"), getattr(args, f"{split}_images")
        if bool(js) != bool(images):
            raise SystemExit(f"--{split}-json and --{split}-images go together")
        if js:
            reports[split] = check_once(js, images, for_eval=split == "val", strict=args.strict)
    return reports


def broadcast_buffers(model: torch.nn.Module) -> None:
    if comm.get_world_size() == 1:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def register_dataset(name: str, json_file: str, image_root: str, report: CocoReport,
                     output_dir: str) -> int:
    """Register one checked COCO-format data set; returns its number of categories."""
    if comm.is_main_process():  # printed: detectron2's logger is set up after registration
        print(report.summary_line(), flush=True)
        if report.quirks:
            listing = os.path.join(output_dir, f"coco_quirks_{name}.json")
            report.write_quirks(listing)
            print(f"{name}: the quirks with their ids are listed in {listing}", flush=True)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (getattr(meta, "json_file", None) != os.path.abspath(json_file)
                or getattr(meta, "image_root", None) != os.path.abspath(image_root)):
            raise ValueError(f"data set name {name!r} is already registered for other files "
                             f"({getattr(meta, 'json_file', '?')}); choose another name")
        return len(report.categories)
    register_coco_instances(name, {}, os.path.abspath(json_file), os.path.abspath(image_root))
    log.info("registered %s: %s (categories %s)", name, json_file,
             list(report.categories.values()))
    return len(report.categories)


def add_dataset_arguments(parser):
    g = parser.add_argument_group("COCO-format data sets from paths")
    g.add_argument("--train-json", help="instances json of the training set")
    g.add_argument("--train-images", help="image folder of the training set")
    g.add_argument("--val-json", help="instances json of the evaluation set")
    g.add_argument("--val-images", help="image folder of the evaluation set")
    g.add_argument("--train-name", default="wrn_coco_train", help="name to register it under")
    g.add_argument("--val-name", default="wrn_coco_val", help="name to register it under")
    g.add_argument("--strict", action="store_true",
                   help="refuse annotation files with the quirks of real releases (zero-size "
                        "boxes, crowd regions, images without annotations, ...), which are "
                        "otherwise counted, listed and handled as detectron2 does")
    return parser


def register_from_args(args, cfg: CfgNode) -> None:
    """Register --train-*/--val-* and point cfg.DATASETS at them (cfg not frozen)."""
    reports = getattr(args, "coco_reports", None)
    if reports is None:  # main() called directly rather than through cli()
        reports = args.coco_reports = check_datasets(args)
    num_classes = None
    if args.train_json:
        num_classes = register_dataset(args.train_name, args.train_json, args.train_images,
                                       reports["train"], cfg.OUTPUT_DIR)
        cfg.DATASETS.TRAIN = (args.train_name,)
    if args.val_json:
        n_val = register_dataset(args.val_name, args.val_json, args.val_images, reports["val"],
                                 cfg.OUTPUT_DIR)
        cfg.DATASETS.TEST = (args.val_name,)
        if num_classes is not None and n_val != num_classes:
            raise ValueError(f"{args.val_json} has {n_val} categories but {args.train_json} has "
                             f"{num_classes}")
        num_classes = num_classes or n_val
    if num_classes is not None:
        opts = list(args.opts or [])[::2]
        for key in NUM_CLASSES_KEYS:
            node, leaf = key.rsplit(".", 1)
            target = cfg
            for part in node.split("."):
                target = target[part]
            if key in opts and target[leaf] != num_classes:
                raise ValueError(f"{key} {target[leaf]} was given but the data set has "
                                 f"{num_classes} categories")
            target[leaf] = num_classes


def setup(args) -> CfgNode:
    cfg = get_wrn_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"  # detectron2's default is cuda; this machine has none
    register_from_args(args, cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    if not cfg.DATASETS.TRAIN:
        raise SystemExit("no training data: give --train-json/--train-images or DATASETS.TRAIN")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    return add_dataset_arguments(default_argument_parser())


def cli(argv=None):
    args = get_parser().parse_args(argv)
    print("Command Line Args:", args)
    try:
        args.coco_reports = check_datasets(args)  # once per job, here, before any worker
    except CocoFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if not torch.cuda.is_available() and args.num_gpus > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_gpus)))
    return launch(main, args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    from engine import exit_frozen
    cli(sys.argv[1:])
    exit_frozen()
