#!/usr/bin/env python
"""Train a Wide Residual Network (ImageNet, CIFAR-10/100 or SVHN: the config decides).

  python train_imagenet.py                                  # built-in demo data, a few CPU minutes
  torchrun --nproc_per_node=8 train_imagenet.py --config configs/imagenet/wrn50_2_bottleneck.yaml \\
      data.root=/data/imagenet
  python train_imagenet.py --config configs/cifar/table4/wrn_28_10.yaml data.root=/data/cifar-10-batches-py \\
      train.epochs=10 model.kwargs.dropout=0.3

  python train_imagenet.py --eval-only --config configs/imagenet/wrn34_x2.yaml \\
      data.root=/data/imagenet model.pretrained=runs/imagenet/checkpoints/step_00450000.pt

Any config key can be overridden as KEY=VALUE (see --list-keys). The resolved config, metrics.jsonl,
TensorBoard events, checkpoints and training_curves.png go to run.output_dir; rerunning the same
command resumes from the newest valid checkpoint there (run.resume=auto).
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = "configs/quickstart.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML recipe under configs/ (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=10 optim.lr=0.05")
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate model.pretrained (our checkpoint, model.pretrained_ema="
                             "true for its EMA, or a torchvision state dict) on the config's "
                             "validation split and write eval.json; torchrun splits the images")
    parser.add_argument("--per-class", action="store_true",
                        help="with --eval-only: per-class top-1 in eval.json and confusion.png "
                             "(up to 100 classes)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    # overrides may come before and after --config (launch scripts put run.output_dir first)
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.config import ConfigError, check_paths, describe_keys, load_config, to_dict

    if args.list_keys:
        print("\n".join(describe_keys()))
        return 0
    try:  # every value, then the paths the run reads: before torch, before the run directory
        cfg = load_config(args.config, args.overrides)
        if not args.print_config:
            check_paths(cfg, training=not args.eval_only)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    if args.eval_only:
        from engine.checkpoint import CheckpointError
        from engine.run_eval import run_evaluation
        try:
            run_evaluation(cfg, per_class=args.per_class)
        except (FileNotFoundError, NotADirectoryError, ValueError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    from engine.build import console_logging, train
    from engine.checkpoint import CheckpointError, ResumeMismatch
    from engine.errors import RunDirInUse, TrainingDiverged
    from pipelines.quarantine import TooManyBadImages
    from pipelines.read_guard import SourceUnusable
    from wrn_large.weights import WeightsError

    console_logging(int(os.environ.get("RANK", 0)))
    try:
        result = train(cfg)
    except ConfigError as e:                        # a name no registry knows (model, engine, ...)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except RunDirInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except (ResumeMismatch, CheckpointError) as e:  # an explicit run.resume=PATH, unusable
        print(f"error: {e}", file=sys.stderr)
        return 5
    except TooManyBadImages as e:                   # data.max_bad_images: a broken mount
        print(f"error: {e}", file=sys.stderr)
        return 6
    except SourceUnusable as e:     # data.root=s3://...: credentials, permission, bucket gone
        line = str(e).strip().splitlines()[-1]      # a DataLoader worker's: its traceback's last
        print(f"error: {line.split('SourceUnusable: ', 1)[-1]}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, WeightsError) as e:  # data.root, model.pretrained
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result["status"] in ("finished", "max_steps") else 143  # 143: preempted (SIGTERM)


if __name__ == "__main__":
    from engine import exit_frozen
    exit_frozen(main())
