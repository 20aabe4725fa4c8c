#!/usr/bin/env python
"""Wall time and peak memory of reading a COCO-2017-train-sized annotation file, side by side:
our check (``detection.coco_check``) cold and cached, pycocotools' ``COCO()``, detectron2's
``load_coco_json``, and ``train_net`` up to 2 training iterations. Each step runs in a fresh
process that reports its own peak RSS (``VmHWM``: ``ru_maxrss`` would include the RSS of the
process it was forked from), so one step's memory never counts for another.

  python bench/coco_scale.py                  # generates the file (detection.coco_like) first
  python bench/coco_scale.py --json FILE --images DIR
  python bench/coco_scale.py --tiny           # the tests: the same steps on a file of 12 images
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "detection" / "toy_faster_rcnn_wrn18_0_5_fpn.yaml"

# this process's own peak RSS in kB; a child's ru_maxrss (RUSAGE_CHILDREN) starts from the
# RSS of this process when it was forked (~0.45 GB with detectron2 imported)
PEAK = ("own = next(int(line.split()[1]) for line in open('/proc/self/status') "
        "if line.startswith('VmHWM'))")

STEPS = {
    "our check, cold (child process)": (
        "from detection.coco_check import check_once\n"
        "r = check_once(JSON, IMAGES)\nprint(r.summary_line())"),
    "our check, cached (a second job)": (
        "from detection.coco_check import check_once\n"
        "r = check_once(JSON, IMAGES)\nprint(r.summary_line())"),
    "pycocotools COCO()": "from pycocotools.coco import COCO\nCOCO(JSON)",
    "detectron2 load_coco_json": (
        "from detectron2.data.datasets import load_coco_json\n"
        "print(len(load_coco_json(JSON, IMAGES, 'bench')))"),
}


def run_step(code: str, json_file: str, images: str, env: dict) -> tuple[float, float, float, str]:
    """(seconds, peak RSS in GB of the step's process, of its children, last output line)."""
    program = (f"import resource, sys\nJSON, IMAGES = {json_file!r}, {images!r}\n{code}\n"
               f"{PEAK}\nkids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
               "print('PEAK_KB', own, kids)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"step failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    own, kids = (int(v) / 2**20 for v in lines[-1].split()[1:])
    return seconds, own, kids, lines[-2] if len(lines) > 1 else ""


def run_training(json_file: str, images: str, out: str, env: dict) -> tuple[float, float]:
    """train_net for 2 iterations, as a user starts it (the check, then detectron2's load)."""
    cmd = [sys.executable, "-c",
           f"import sys\nfrom detection import train_net\ntrain_net.cli(sys.argv[1:])\n{PEAK}\n"
           "print('PEAK_KB', own)",
           "--config-file", str(CONFIG), "--train-json", json_file, "--train-images", images,
           "MODEL.ROI_HEADS.NUM_CLASSES", "80", "SOLVER.MAX_ITER", "2",
           "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    return seconds, int(proc.stdout.strip().splitlines()[-1].split()[1]) / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="an instances json (default: generate one)")
    parser.add_argument("--images", help="its image folder")
    parser.add_argument("--scale", type=float, default=1.0, help="for the generated file")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--tiny", action="store_true",
                        help="the tests' check that the command runs: --scale 0.0001 unless "
                             "given (12 images, 86 annotations)")
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(scale=0.0001)
        args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="coco_scale_") as work:
        measure(args, work)


def measure(args, work: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WRN_LARGE_CACHE": os.path.join(work, "cache")}
    if args.json is None:  # in a child process: its ~3 GB must not stay in this one
        t0 = time.perf_counter()
        coco = os.path.join(work, "coco")
        subprocess.run([sys.executable, "-m", "detection.coco_like", coco, "--scale",
                        str(args.scale)], cwd=ROOT, env=env, check=True, capture_output=True)
        args.json = os.path.join(coco, "annotations", "instances_train2017.json")
        args.images = os.path.join(coco, "train2017")
        print(f"generated {args.json} ({os.path.getsize(args.json) / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f} s")
    rows = []
    for name, code in STEPS.items():
        seconds, own, kids, said = run_step(code, args.json, args.images, env)
        rows.append({"step": name, "seconds": round(seconds, 1), "peak_gb": round(own, 2),
                     "child_peak_gb": round(kids, 2)})
        print(f"{name:38s} {seconds:7.1f} s {own:6.2f} GB (children {kids:.2f} GB)  "
              f"{said[:100]}", flush=True)
    env["WRN_LARGE_CACHE"] = os.path.join(work, "cache_for_training")  # the check included
    seconds, peak = run_training(args.json, args.images, os.path.join(work, "train"), env)
    rows.append({"step": "train_net, check + load + 2 iterations", "seconds": round(seconds, 1),
                 "peak_gb": round(peak, 2), "child_peak_gb": None})
    print(f"{rows[-1]['step']:38s} {seconds:7.1f} s {peak:6.2f} GB")
    print("\n| step | wall s | peak RSS GB (process) | (its child processes) |\n"
          "| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r['peak_gb']} | {r['child_peak_gb'] or '-'} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
