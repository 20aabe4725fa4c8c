"""Helpers for the trainer tests: a tiny learnable JPEG folder and a run launcher."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
COLOURS = [(200, 40, 40), (40, 180, 40), (40, 60, 200)]


def make_folder(root: Path, train_per_class: int = 16, val_per_class: int = 7,
                size: int = 36) -> Path:
    """ImageNet layout, 3 classes told apart by colour, with noise (learnable in 1-2 epochs)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.normal(loc=colour, scale=40, size=(size, size, 3)).clip(0, 255)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def base_overrides(data: Path, out: Path, **extra) -> list[str]:
    values = {"model.name": "wrn_cifar", "model.kwargs": "{depth: 10, widen_factor: 2}",
              "data.dataset": "imagenet", "data.root": str(data), "data.backend": "torch",
              "data.workers": 0, "data.image_size": 32, "data.val_resize": 36,
              "data.min_crop_area": 0.5, "train.epochs": 2, "train.batch_size": 8,
              "optim.lr": 0.05, "optim.lr_batch": 8, "schedule.milestones": "[100]",
              "run.output_dir": str(out), "run.log_every_steps": 1, "run.progress": False,
              "run.keep_checkpoints": 100}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------- reproduce.py
PAPER = {"a": {"top1": 40.0, "top5": 1.5}, "b": {"top1": 30.0, "top5": 0.5}}


def write_table_configs(folder: Path) -> list[Path]:
    """Two networks of a made-up table, each with its paper numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, width in (("a", 1), ("b", 2)):
        path = folder / f"net_{name}.yaml"
        path.write_text(
            f"base: {REPO / 'configs' / 'quickstart.yaml'}\n"
            f"model: {{name: wrn_cifar, kwargs: {{depth: 10, widen_factor: {width}}}}}\n"
            f"paper: {{table: T1, row: 'WRN-10-{width}', top1: {PAPER[name]['top1']}, "
            f"top5: {PAPER[name]['top5']}, runs: 3, statistic: median}}\n")
        paths.append(path)
    return paths


def sweep_overrides(data: Path, **extra) -> list[str]:
    skip = ("model.name", "model.kwargs", "run.output_dir")
    return [o for o in base_overrides(data, Path("unused"), **extra) if o.split("=")[0] not in skip]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(overrides: list[str], nproc: int = 1, timeout: int = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """train_imagenet.py in fresh processes: plain python for 1, torchrun over gloo for more."""
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "train_imagenet.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(REPO / "train_imagenet.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd + ["--config", "configs/quickstart.yaml"] + overrides, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def live_processes_mentioning(text: str) -> list[str]:
    """Command lines of the live (not zombie) processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue   # not a process, or gone
        if text in cmd and state != "Z":
            found.append(cmd)
    return found


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if m["type"] == "train"}


def epochs(out: Path) -> list[dict]:
    return [m for m in read_metrics(out) if m["type"] == "epoch"]


def train_in_process(overrides: list[str], patch=None):
    """The trainer in this process, for tests that reach into it (``patch(trainer)`` before
    ``fit``). Returns (trainer, summary). The signal handlers it installs and the torchrun
    variables a DeepSpeed job of one sets (RANK, MASTER_PORT, ...) are undone afterwards."""
    import signal
    from engine.config import load_config
    from engine.trainer import Trainer
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    environ = dict(os.environ)
    try:
        trainer = Trainer(load_config(str(REPO / "configs" / "quickstart.yaml"), overrides))
        if patch is not None:
            patch(trainer)
        return trainer, trainer.fit()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        os.environ.clear()
        os.environ.update(environ)


def nan_loss_at(steps: set[int]):
    """A patch for train_in_process: the loss of these optimizer steps (1-based) becomes NaN."""
    def patch(trainer):
        loss_fn = trainer.loss_fn

        def loss(logits, targets):
            value = loss_fn(logits, targets)
            return value * float("nan") if trainer.state.step + 1 in steps else value

        trainer.loss_fn = loss
    return patch
