#!/usr/bin/env python
"""How long saving, verifying and loading a full training checkpoint takes: the model, its SGD
momentum and an EMA copy, as the trainer writes them (engine.checkpoint: torch.save to a temp
name, fsync, SHA-256 sidecar, rename). A preempted job has a fixed grace period (torchrun sends
SIGKILL 30 s after SIGTERM; SLURM's --signal lead time), so this must fit well inside it.

  python bench/checkpoint_io.py                        # WRN-50-2-bottleneck, 3 repeats
  python bench/checkpoint_io.py --model wrn34_x2 --dir /scratch/ckpt_bench
  python bench/checkpoint_io.py --tiny                 # the tests: WRN-40-1 (7 MB), once
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wrn_large  # noqa: E402
from engine.checkpoint import load_file, save_file_atomic, sha256_of, verify  # noqa: E402

TINY = {"model": "wrn_40_1", "repeats": 1}


def training_state(name: str) -> dict:
    model = wrn_large.create_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():        # momentum buffers as after a real step
        p.grad = torch.randn_like(p)
    optimizer.step()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema,
            "step": 1, "epoch": 0}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def number(x: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a --tiny run's milliseconds)."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wrn50_2_bottleneck")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tests' check that the command runs: "
                             + " ".join(f"--{k} {v}" for k, v in TINY.items()) + " unless given")
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    state = training_state(args.model)
    if args.dir:
        measure(state, Path(args.dir), args)
    else:
        with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as folder:
            measure(state, Path(folder), args)


def measure(state: dict, folder: Path, args) -> None:
    path = folder / "step_00000001.pt"
    rows = {"save (torch.save + fsync + SHA-256 + rename)": [], "SHA-256 alone": [],
            "verify (re-read + SHA-256)": [], "load (torch.load, weights_only)": []}
    for _ in range(args.repeats):
        rows["save (torch.save + fsync + SHA-256 + rename)"].append(
            timed(lambda: save_file_atomic(state, path, checksum=True)))
        rows["SHA-256 alone"].append(timed(lambda: sha256_of(path)))
        rows["verify (re-read + SHA-256)"].append(timed(lambda: verify(path)))
        rows["load (torch.load, weights_only)"].append(timed(lambda: load_file(path)))
    gb = path.stat().st_size / 1e9
    print(f"{args.model}: checkpoint of {number(gb)} GB (model + SGD momentum + EMA), "
          f"median of {args.repeats}\n")
    print("| step | seconds | s/GB |\n| --- | ---: | ---: |")
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"| {name} | {number(median)} | {number(median / gb)} |")


if __name__ == "__main__":
    main()
