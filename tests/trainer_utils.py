"""Helpers for the trainer tests: a tiny learnable JPEG folder and a run launcher."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# intra-op threads of a test's single process (in this one or a child): the cores, shared
# among pytest-xdist's workers (two processes each spinning two OpenMP threads on two cores
# lose more to each other than they gain)
THREADS = max(1, min(2, (os.cpu_count() or 1)
                     // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
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
                 check: bool = True, in_process: bool | None = None) -> subprocess.CompletedProcess:
    """train_imagenet.py as a user runs it: its stdout, stderr and exit code. One process runs
    in this one (``cli_in_process``; a new interpreter costs ~5 s of imports here) unless
    ``in_process=False`` or the run is DeepSpeed's (DeepSpeed keeps process-wide state across
    engines); more run under torchrun over gloo."""
    deepspeed = "engine.name=deepspeed" in overrides
    if in_process is None:
        in_process = nproc == 1 and not deepspeed
    if in_process:
        proc = cli_in_process(["--config", "configs/quickstart.yaml", *overrides])
    else:
        proc = run_command(overrides, nproc, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def run_command(overrides: list[str], nproc: int = 1, timeout: int = 600
                ) -> subprocess.CompletedProcess:
    """train_imagenet.py in fresh processes: plain python for 1, torchrun over gloo for more."""
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "train_imagenet.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(REPO / "train_imagenet.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else str(THREADS),
           "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd + ["--config", "configs/quickstart.yaml"] + overrides, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


# In-process runs leave the hang watchdog off: it would end this process (and the test
# session) with os._exit on a long stall; the watchdog is tested with real processes.
IN_PROCESS = ["train.hang_timeout_s=0"]


@contextlib.contextmanager
def isolated():
    """What a run does to this process, undone afterwards: logging (the root logger's handlers
    are set aside, so that basicConfig(force=True) cannot close pytest's), signal handlers,
    environment variables (DeepSpeed's RANK, MASTER_PORT, ...), determinism flags, the global
    RNG streams, torch.compile's caches, the process group, and the loaders' threads (they end
    when the loaders are collected)."""
    import gc
    import logging
    import random
    import signal

    import numpy as np
    import torch
    from engine.distributed import cleanup

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for handler in handlers:
        root.removeHandler(handler)
    signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    environ = dict(os.environ)
    flags = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    rngs = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        cleanup()
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for s, handler in signals.items():
            signal.signal(s, handler)
        os.environ.clear()
        os.environ.update(environ)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[2:]
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        gc.collect()


def cli_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``train_imagenet.main(argv)`` in this process, as if it were its own: stdout and stderr
    captured, an escaping exception as Python prints it (exit code 1); ``isolated``."""
    import io
    import traceback

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import train_imagenet

    out, err = io.StringIO(), io.StringIO()
    argv = [*argv[:2], *IN_PROCESS, *argv[2:]] if argv[:1] == ["--config"] else [*IN_PROCESS, *argv]
    with isolated(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train_imagenet.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - what the interpreter would print, and exit 1
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


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


class InProcessRun:
    """A run of the trainer in this process: the trainer, its summary and what it logged."""

    def __init__(self, trainer, summary: dict | None, log: str):
        self.trainer, self.summary, self.log = trainer, summary, log


def train_in_process(overrides: list[str], patch=None, config: str | Path | None = None
                     ) -> InProcessRun:
    """The trainer built and run in this process, as ``engine.build.train`` runs it but with the
    trainer at hand: ``patch(trainer)`` runs before ``train``; the log (INFO and up) is kept in
    ``.log``; ``isolated``. The run's exceptions propagate."""
    import logging
    from engine.build import build_trainer, train_and_explain
    from engine.config import load_config
    from engine.hooks import SummaryHook
    captured = _LogText()
    with isolated():
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.addHandler(captured)
        cfg = load_config(str(config or REPO / "configs" / "quickstart.yaml"),
                          [*IN_PROCESS, *overrides])
        trainer = build_trainer(cfg)
        if patch is not None:
            patch(trainer)
        train_and_explain(trainer, cfg)
        return InProcessRun(trainer, trainer.hooks.of_type(SummaryHook).result, captured.text())


class _LogText:
    """A logging handler that keeps the formatted records."""

    def __new__(cls):
        import logging

        class Handler(logging.Handler):
            def __init__(self):
                super().__init__(logging.INFO)
                self.lines = []

            def emit(self, record):
                self.lines.append(self.format(record))

            def text(self):
                return "\n".join(self.lines)

        return Handler()


def nan_loss_at(steps: set[int]):
    """A patch for train_in_process: the loss of these optimizer steps (1-based) becomes NaN."""
    def patch(trainer):
        loss_fn = trainer.loss_fn

        def loss(logits, targets):
            value = loss_fn(logits, targets)
            return value * float("nan") if trainer.state.step + 1 in steps else value

        trainer.loss_fn = loss
    return patch


# ----------------------------------------------------------------- the loop in-process
class ListLoader:
    """A Loader (pipelines.base) over a fixed list of batches: the same every epoch."""

    def __init__(self, batches, num_classes=3):
        self.batches, self.num_classes, self.start = batches, num_classes, 0

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        return iter(self.batches[self.start:])

    def __len__(self):
        return len(self.batches)


def batches(n=3, size=4):
    """``n`` (inputs of 5 features, labels of 3 classes) batches, the same on every call."""
    import torch
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 5, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]
