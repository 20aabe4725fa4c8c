#!/usr/bin/env python
"""How long saving, verifying and loading a full training checkpoint takes: the model, its SGD
momentum and an EMA copy, as the trainer writes them (engine.checkpoint: torch.save to a temp
name, fsync, SHA-256 sidecar, rename). A preempted job has a fixed grace period (torchrun sends
SIGKILL 30 s after SIGTERM; SLURM's --signal lead time), so this must fit well inside it.

  python bench/checkpoint_io.py                        # WRN-50-2-bottleneck, 3 repeats
  python bench/checkpoint_io.py --model wrn34_x2 --dir /scratch/ckpt_bench
  python bench/checkpoint_io.py --tiny                 # the tests: WRN-40-1 (7 MB), once

--stall adds the loop's stall per checkpoint, synchronous vs in the background
(engine/checkpoint_writer.py, run.async_checkpoint), for the weights + SGD momentum the trainer
saves: to the local disk and, with --s3, to an S3 server (moto's, tests/s3_server.py: a
process on this machine, no network) through ``save_file_atomic`` as the trainer calls it
(upload, read-back check, manifest last). Stall = the time the loop is blocked by a save: the whole
save when synchronous; the host copy + hand-over when in the background (the first save also
allocates the host buffers the later ones reuse). Each repeat runs a synchronous save and a
background one side by side.

  python bench/checkpoint_io.py --stall --s3           # WRN-50-2-bottleneck, 3 repeats
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wrn_large  # noqa: E402
from engine.checkpoint import load_file, save_file_atomic, sha256_of, verify  # noqa: E402
from engine.checkpoint_writer import CheckpointWriter  # noqa: E402

TINY = {"model": "wrn_40_1", "repeats": 1}


def training_state(name: str, ema: bool = True) -> dict:
    model = wrn_large.create_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():        # momentum buffers as after a real step
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1,
             "epoch": 0}
    if ema:
        state["ema"] = {k: v.clone() for k, v in model.state_dict().items()}
    return state


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
    parser.add_argument("--stall", action="store_true",
                        help="also the loop's stall per save, synchronous vs in the background")
    parser.add_argument("--s3", action="store_true",
                        help="with --stall: also to an S3 server (moto, tests/s3_server.py)")
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    state = training_state(args.model)
    with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as folder:
        where = Path(args.dir or folder)
        measure(state, where, args)
        if args.stall:
            del state
            measure_stall(training_state(args.model, ema=False), where, args)


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


# ------------------------------------------------------------------ the stall per save
STALL_COLUMNS = ("synchronous: blocked", "background: 1st save blocked",
                 "background: later saves blocked", "background: write took",
                 "blocked, background / synchronous")


def measure_stall(state: dict, folder: Path, args) -> None:
    size = sum(t.numel() * t.element_size() for t in tensors(state)) / 1e9
    print(f"\n{args.model}: the loop's stall per save, weights + SGD momentum "
          f"({number(size)} GB of tensors), seconds, median of {max(2, args.repeats)} "
          f"(1st save: once; later: the rest)\n")
    print("| target | " + " | ".join(STALL_COLUMNS) + " |\n| --- |" + " ---: |" * 5)
    print(stall_row("local disk", state, lambda i: str(folder / f"step_{i:08d}.pt"),
                    save_file_atomic, args.repeats))
    if args.s3:
        with s3_bucket(folder) as prefix:
            print(stall_row("S3 (moto)", state, lambda i: f"{prefix}/step_{i:08d}.pt",
                            save_file_atomic, args.repeats))


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)


def stall_row(target: str, state: dict, location, write, repeats: int) -> str:
    """A synchronous save and a background one per repeat, side by side."""
    writer = CheckpointWriter(write=write)
    sync, blocked, took = [], [], []
    for i in range(max(2, repeats)):     # a first save and at least one later one
        sync.append(timed(lambda: write(state, location(2 * i), checksum=True)))
        blocked.append(timed(lambda: writer.submit(state, location(2 * i + 1))))
        took.append(blocked[-1] + timed(writer.wait))   # nothing else runs meanwhile
    later = statistics.median(blocked[1:])
    sync_s = statistics.median(sync)
    cells = (sync_s, blocked[0], later, statistics.median(took), later / sync_s)
    return f"| {target} | " + " | ".join(number(c) for c in cells) + " |"


@contextmanager
def s3_bucket(folder: Path):
    """A bucket on a moto server of this process's own, as the prefix ``s3://bench/ckpt``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from s3_server import make_bucket, moto_server, s3_env, using_env
    with moto_server(folder) as moto, using_env(s3_env(moto.url)):
        make_bucket(s3_env(moto.url), "bench")
        yield "s3://bench/ckpt"


if __name__ == "__main__":
    main()
