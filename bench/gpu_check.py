#!/usr/bin/env python
"""One command for a GPU machine: run the GPU tests, then measure side by side on the local GPU.

    python bench/gpu_check.py            # tests + WRN-50-2, WRN-34-2, WRN-18-2, compile off/on
    python bench/gpu_check.py --quick    # quick tests + WRN-18-2, compile off

1. ``pytest -m gpu`` (DALI mixed decoding, the trainer with bf16/channels_last/compile, fp16,
   DeepSpeed, Detectron2 and NCCL on CUDA); ``--quick`` leaves out the multi-run trainer tests
   (``-m "gpu and not slow"``). The 15 slowest tests and the tests' time go in the report.
2. For each model: training images/s of the trainer's engine (bf16 autocast, channels_last, SGD)
   at batch ``--batch`` (halved until it fits), fed by synthetic batches already on the GPU and
   by the DALI "mixed" train pipeline on a generated ImageNet-like JPEG set (500x375, ~120 KB);
   the ratio DALI/synthetic (target >= 0.97: the input pipeline is never the bottleneck); peak
   GPU memory. Then the DALI pipeline alone (img/s, GPU memory), with nvJPEG's chroma
   upsampling as libjpeg-turbo's (``jpeg_fancy_upsampling``, what training uses) and without:
   what matching the CPU's colours costs.
   Memory is the device's, read from NVML every 20 ms (``nvidia-ml-py``): DALI allocates with
   its own allocator, which torch's ``max_memory_allocated`` (also reported) does not see. The
   timed window lies inside one epoch (the JPEGs are hard-linked under more names until an
   epoch holds the warm-up and the timed batches), so no pipeline build falls inside it.
3. ``gpu_report.json`` and ``gpu_report.md`` (the table for docs/benchmarks.md).

``--dry-run`` runs all of it on the CPU, small, but for the CUDA calls (the tests are collected,
not run; no device memory is read): what the test suite runs so that a GPU session never
meets a broken command.

Exit status: 0 when every GPU test passed, 1 when one failed, 3 without a CUDA device (unless
``--dry-run``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

MODELS = ("wrn50_2_bottleneck", "wrn34_x2", "wrn18_x2")
DALI_TARGET = 0.97
WARMUP = 5     # untimed batches before each window
COLUMNS = ("model", "batch", "compile", "synthetic img/s", "DALI img/s", "DALI/synthetic",
           "peak device memory (GB, NVML)", "peak torch memory (GB)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="quick GPU tests, WRN-18-2 only, compile off (<= 3 min)")
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--batch", type=int, default=256, help="per step (halved on out-of-memory)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--images", type=int, default=3000,
                   help="distinct generated JPEGs for DALI (linked to fill an epoch)")
    p.add_argument("--workers", type=int, default=6, help="DALI threads")
    p.add_argument("--skip-tests", action="store_true", help="measure only")
    p.add_argument("--out", type=Path, default=Path("gpu_report.json"))
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU, small (batch 4, 2 steps, 64 px, 16 JPEGs): every step but "
                        "the CUDA calls; the GPU tests are collected, not run")
    a = p.parse_args(argv)
    if a.dry_run:
        a.quick, a.batch, a.steps, a.images, a.workers = True, 4, 2, 16, 2
    a.models = a.models or (["wrn18_x2"] if a.quick else list(MODELS))
    a.compile = ["off"] if a.quick else ["off", "on"]
    a.tests = "gpu and not slow" if a.quick else "gpu"
    return a


class Target:
    """Where the measurements run: the GPU (bf16, channels_last, 224 px, memory read from NVML),
    or for a dry run the CPU (fp32, 64 px, no memory figures), through the same code."""

    def __init__(self, dry_run: bool):
        import torch
        self.dry_run, self.torch = dry_run, torch
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
        self.amp, self.channels_last = ("off", False) if dry_run else ("bf16", True)
        self.size = 64 if dry_run else 224

    def sync(self) -> None:
        if not self.dry_run:
            self.torch.cuda.synchronize()

    def fresh_memory(self) -> None:
        if not self.dry_run:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def device_peak(self):
        return NoPeak() if self.dry_run else DevicePeak()

    def torch_peak_gb(self) -> float | None:
        return None if self.dry_run else self.torch.cuda.max_memory_allocated() / 2 ** 30

    def out_of_memory(self) -> type[Exception]:
        return self.torch.OutOfMemoryError


def run_gpu_tests(marker: str, collect_only: bool = False) -> dict:
    t0 = time.time()
    how = ["--collect-only"] if collect_only else ["--durations=15"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", marker, "-q", "-p",
                           "no:cacheprovider", *how, "tests"], cwd=REPO,
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
    return {"returncode": proc.returncode, "summary": last, "marker": marker,
            "seconds": round(time.time() - t0, 1)}


def make_jpegs(root: Path, count: int) -> Path:
    """ImageNet-like JPEGs: 500x375 (a third portrait), detail at several scales, ~120 KB."""
    from input_pipeline import make_set
    return make_set(root, count, quality=95)


def epoch_of(root: Path, images: int) -> Path:
    """A folder whose train split holds at least ``images`` entries: ``root``'s JPEGs, hard-linked
    under more names (the decoder's work per file is the same)."""
    from input_pipeline import files_of
    files = files_of(root)
    if len(files) >= images:
        return root
    out = root.with_name(f"{root.name}_x{images}")
    for k in range(images):
        src = files[k % len(files)]
        dst = out / "train" / src.parent.name / f"{k // len(files)}_{src.name}"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    return out


class DevicePeak:
    """The device's peak used memory while the block runs (NVML, sampled every ``interval``
    s): what torch, DALI and the CUDA context together hold."""

    def __init__(self, index: int = 0, interval: float = 0.02):
        import pynvml
        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def used(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.used())

    def __enter__(self):
        self.peak = self.used()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())

    @property
    def peak_gb(self) -> float:
        return self.peak / 2 ** 30


class NoPeak:
    """A dry run's stand-in for ``DevicePeak``: no device, no figure."""

    peak_gb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def images_per_s(step, batches, steps: int, target: Target) -> float:
    t0, x = None, None
    for i, (x, y) in enumerate(batches):
        if i == WARMUP:
            target.sync()
            t0 = time.perf_counter()
        step(x, y)
        if i == WARMUP + steps - 1:
            break
    if t0 is None or i < WARMUP + steps - 1:
        raise ValueError(f"{i + 1 if x is not None else 0} batches, fewer than {WARMUP} + {steps}")
    target.sync()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def synthetic_batches(batch: int, target: Target):
    import torch
    x = torch.randn(batch, 3, target.size, target.size, device=target.device)
    if target.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=target.device)
    while True:
        yield x, y


def dali_batches(root: Path, batch: int, workers: int, steps: int, target: Target):
    """One epoch of the DALI train loader ("mixed" decoding on the GPU) that holds the warm-up
    and ``steps`` batches."""
    from pipelines import DataConfig, LoaderSpec, build_loader
    root = epoch_of(root, (WARMUP + steps + 1) * batch)
    cfg = DataConfig(root=str(root), backend="dali", workers=workers, image_size=target.size,
                     channels_last=target.channels_last, num_classes=1000)
    return iter(build_loader(cfg, LoaderSpec("train", batch_size=batch, device=target.device)))


def measure_model(name: str, compile_: str, batch: int, root: Path, a, target: Target) -> dict:
    from trainer_step import engine_step
    smallest = min(8, batch)
    while batch >= smallest:
        try:
            target.fresh_memory()
            with target.device_peak() as device:
                step = engine_step(name, 1000, target.device, target.amp,
                                   channels_last=target.channels_last,
                                   compile_=compile_ == "on")
                synthetic = images_per_s(step, synthetic_batches(batch, target), a.steps, target)
                dali = images_per_s(step, dali_batches(root, batch, a.workers, a.steps, target),
                                    a.steps, target)
            return {"model": name, "batch": batch, "compile": compile_,
                    "synthetic_img_s": synthetic, "dali_img_s": dali,
                    "dali_over_synthetic": dali / synthetic,
                    "peak_device_memory_gb": device.peak_gb,
                    "peak_torch_memory_gb": target.torch_peak_gb()}
        except target.out_of_memory():
            batch //= 2
    raise RuntimeError(f"{name} does not fit even at batch {smallest}")


def measure_dali_alone(root: Path, batch: int, workers: int, steps: int, target: Target,
                       fancy_upsampling: bool = True) -> dict:
    from pipelines import dali
    target.fresh_memory()
    dali.JPEG_FANCY_UPSAMPLING = fancy_upsampling
    try:
        with target.device_peak() as device:
            rate = images_per_s(lambda x, y: None,
                                dali_batches(root, batch, workers, steps, target), steps, target)
    finally:
        dali.JPEG_FANCY_UPSAMPLING = True
    return {"batch": batch, "img_s": rate, "jpeg_fancy_upsampling": fancy_upsampling,
            "peak_device_memory_gb": device.peak_gb}


def markdown(report: dict) -> str:
    lines = [f"GPU: {report['gpu']}; tests: {report['tests'].get('summary', 'skipped')}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["models"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['compile']} | "
                     f"{r['synthetic_img_s']:.0f} | {r['dali_img_s']:.0f} | "
                     f"{r['dali_over_synthetic']:.3f} | {gb(r['peak_device_memory_gb'], 1)} | "
                     f"{gb(r['peak_torch_memory_gb'], 1)} |")
    d = report.get("dali_alone")
    if d:
        lines += ["", f"DALI mixed pipeline alone: {d['img_s']:.0f} img/s at batch {d['batch']}, "
                      f"peak device memory {gb(d['peak_device_memory_gb'], 2)} GB (NVML)"]
        plain = report.get("dali_alone_plain_upsampling")
        if plain:
            lines.append(f"jpeg_fancy_upsampling (libjpeg-turbo's chroma, as on the CPU): "
                         f"{d['img_s'] / plain['img_s']:.3f}x the throughput of nvJPEG's own "
                         f"({plain['img_s']:.0f} img/s without it)")
    slow = [r for r in report["models"] if r["dali_over_synthetic"] < DALI_TARGET]
    if slow:
        lines.append(f"DALI/synthetic below {DALI_TARGET}: "
                     + ", ".join(f"{r['model']} (compile {r['compile']})" for r in slow))
    return "\n".join(lines) + "\n"


def gb(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not a.dry_run:
        print("no CUDA device: nothing to check here (the CPU suite covers the rest; "
              "--dry-run runs the command on the CPU)", file=sys.stderr)
        return 3
    t0 = time.time()
    target = Target(a.dry_run)
    report = {"gpu": "none: a dry run on the CPU" if a.dry_run else torch.cuda.get_device_name(0),
              "torch": torch.__version__,
              "command": " ".join(["python bench/gpu_check.py", *(argv or sys.argv[1:])]),
              "tests": {} if a.skip_tests else run_gpu_tests(a.tests, collect_only=a.dry_run),
              "models": []}
    root = make_jpegs(REPO / "data" / ("bench_jpegs_dry_run" if a.dry_run
                                       else "bench_jpegs_110k"), a.images)
    for name in a.models:
        for compile_ in a.compile:
            report["models"].append(measure_model(name, compile_, a.batch, root, a, target))
            print(report["models"][-1], flush=True)
    report["dali_alone"] = measure_dali_alone(root, a.batch, a.workers, a.steps, target)
    report["dali_alone_plain_upsampling"] = measure_dali_alone(root, a.batch, a.workers, a.steps,
                                                               target, fancy_upsampling=False)
    report["seconds"] = time.time() - t0
    write_report(report, a.out)
    print(markdown(report))
    return 1 if report["tests"].get("returncode", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
