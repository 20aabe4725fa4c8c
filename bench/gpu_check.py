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

Exit status: 0 when every GPU test passed, 1 when one failed, 3 without a CUDA device.
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
    a = p.parse_args(argv)
    a.models = a.models or (["wrn18_x2"] if a.quick else list(MODELS))
    a.compile = ["off"] if a.quick else ["off", "on"]
    a.tests = "gpu and not slow" if a.quick else "gpu"
    return a


def run_gpu_tests(marker: str) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", marker, "-q", "-p",
                           "no:cacheprovider", "--durations=15", "tests"], cwd=REPO,
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


def images_per_s(step, batches, steps: int) -> float:
    import torch
    t0, x = None, None
    for i, (x, y) in enumerate(batches):
        if i == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        step(x, y)
        if i == WARMUP + steps - 1:
            break
    if t0 is None or i < WARMUP + steps - 1:
        raise ValueError(f"{i + 1 if x is not None else 0} batches, fewer than {WARMUP} + {steps}")
    torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def synthetic_batches(batch: int):
    import torch
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    while True:
        yield x, y


def dali_batches(root: Path, batch: int, workers: int, steps: int):
    """One epoch of the DALI mixed train loader that holds the warm-up and ``steps`` batches."""
    import torch
    from pipelines import DataConfig, LoaderSpec, build_loader
    root = epoch_of(root, (WARMUP + steps + 1) * batch)
    cfg = DataConfig(root=str(root), backend="dali", workers=workers, image_size=224,
                     channels_last=True, num_classes=1000)
    loader = build_loader(cfg, LoaderSpec("train", batch_size=batch, device=torch.device("cuda", 0)))
    return iter(loader)


def measure_model(name: str, compile_: str, batch: int, root: Path, a) -> dict:
    import torch
    from trainer_step import engine_step
    while batch >= 8:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with DevicePeak() as device:
                step = engine_step(name, 1000, torch.device("cuda", 0), "bf16",
                                   channels_last=True, compile_=compile_ == "on")
                synthetic = images_per_s(step, synthetic_batches(batch), a.steps)
                dali = images_per_s(step, dali_batches(root, batch, a.workers, a.steps), a.steps)
            return {"model": name, "batch": batch, "compile": compile_,
                    "synthetic_img_s": synthetic, "dali_img_s": dali,
                    "dali_over_synthetic": dali / synthetic,
                    "peak_device_memory_gb": device.peak_gb,
                    "peak_torch_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30}
        except torch.OutOfMemoryError:
            batch //= 2
    raise RuntimeError(f"{name} does not fit even at batch 8")


def measure_dali_alone(root: Path, batch: int, workers: int, steps: int,
                       fancy_upsampling: bool = True) -> dict:
    import torch
    from pipelines import dali
    torch.cuda.empty_cache()
    dali.JPEG_FANCY_UPSAMPLING = fancy_upsampling
    try:
        with DevicePeak() as device:
            rate = images_per_s(lambda x, y: None, dali_batches(root, batch, workers, steps),
                                steps)
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
                     f"{r['dali_over_synthetic']:.3f} | {r['peak_device_memory_gb']:.1f} | "
                     f"{r['peak_torch_memory_gb']:.1f} |")
    d = report.get("dali_alone")
    if d:
        lines += ["", f"DALI mixed pipeline alone: {d['img_s']:.0f} img/s at batch {d['batch']}, "
                      f"peak device memory {d['peak_device_memory_gb']:.2f} GB (NVML)"]
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


def write_report(report: dict, out: Path) -> None:
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU suite covers the rest)",
              file=sys.stderr)
        return 3
    t0 = time.time()
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "command": " ".join(["python bench/gpu_check.py", *(argv or sys.argv[1:])]),
              "tests": {} if a.skip_tests else run_gpu_tests(a.tests), "models": []}
    root = make_jpegs(REPO / "data" / "bench_jpegs_110k", a.images)
    for name in a.models:
        for compile_ in a.compile:
            report["models"].append(measure_model(name, compile_, a.batch, root, a))
            print(report["models"][-1], flush=True)
    report["dali_alone"] = measure_dali_alone(root, a.batch, a.workers, a.steps)
    report["dali_alone_plain_upsampling"] = measure_dali_alone(root, a.batch, a.workers, a.steps,
                                                               fancy_upsampling=False)
    report["seconds"] = time.time() - t0
    write_report(report, a.out)
    print(markdown(report))
    return 1 if report["tests"].get("returncode", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
