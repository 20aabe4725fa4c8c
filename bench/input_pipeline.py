"""Input pipeline throughput: DALI train pipeline vs torchvision loaders vs the raw decode limit.

    python bench/input_pipeline.py [--images 2000] [--threads 2] [--batch 64] [--repeats 5] [--passes 3]

Generates (once) a set of ~500x375 JPEGs (~50 KB, like ImageNet's) under data/bench_jpegs (one
folder per --images: data/bench_jpegs1k for 1000),
then measures, side by side in one run, each loader in its own subprocess (so each gets its own
peak RSS, workers included), alternating the order over ``--repeats`` rounds. Ratios are taken
within each round and their median is reported (the machine's speed drifts between rounds):

- dali-cpu:      pipelines' DALI train pipeline as the trainer gets it: ROI decode of the
                 RandomResizedCrop window in ``threads`` DALI threads, then resize to 224 + flip
                 + normalise to float NCHW in torch's uint8 kernels (``data.resize_with=auto``);
- dali-cpu-torch-ops: the same with torch's ops for the flip + normalisation instead of the
                 compiled pass (``pipelines/_normalize.c``): what an install without a C compiler
                 gets;
- dali-cpu-dali-resize: the same with ``data.resize_with=dali``: the GPU graph unchanged on
                 the CPU (DALI's resize and fused crop_mirror_normalize);
- dali-mixed:    the same graph on the GPU (nvJPEG, DALI's resize), only when CUDA is present;
- torch-pil:     pipelines' torch backend: ImageFolder-style PIL loader + v2 RandomResizedCrop,
                 flip, normalise, DataLoader with ``threads`` workers (the baseline users know);
- torch-decode_jpeg: torchvision.io.decode_jpeg + the same v2 transforms, ``threads`` workers;
- dali-decode:   DALI's CPU decoder alone on the full images (no crop, resize or
                 normalisation; C++ file reader), ``threads`` threads: the ceiling of dali-cpu;
- raw-decode:    decode only (simplejpeg = libjpeg-turbo, else torchvision decode_jpeg),
                 ``threads`` processes: the limit for a decoder on this many cores.

Prints img/s, ratios to torch-pil and raw-decode, and peak RSS per loader.

    python bench/input_pipeline.py --latency-ms 2 [--images 1000] [--repeats 5]

Latency mode: the trainer's two loaders (dali-cpu, torch-pil) over the same images as a folder
and as a pack (``python -m pipelines pack``, made once beside the folder), each read from the
page cache ("local") and through the FUSE file system of the tests (``tests/latency_fs.py``)
adding ``--latency-ms`` to every open, and adding nothing ("0 ms": what the FUSE round trip
itself costs on these two cores). File data and attributes stay in the kernel's caches, so the
mount adds the per-open round trip of a parallel file system's metadata server and little
else. Ratios to "local" are taken within each round; their median is reported.

    python bench/input_pipeline.py --tiny [--latency-ms 2] [--data DIR]

Tiny mode (the tests run it): 24 images, batch 8, one round of one pass, and every
measurement of the round in one process instead of one each (a process costs ~5 s of imports
here), so the peak RSS is the process's so far. It checks that the command runs, not speed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipelines import DataConfig  # noqa: E402


def make_set(root: Path, count: int, quality: int = 85) -> Path:
    if (root / "train").is_dir() and len(list((root / "train").rglob("*.JPEG"))) == count:
        link_val(root)
        return root
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (500, 375) if i % 3 else (375, 500)
        coarse = rng.integers(0, 256, (h // 6, w // 6, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        img.save(folder / f"{i:05d}.JPEG", quality=quality)
    link_val(root)
    return root


def default_set(images: int) -> Path:
    """Where ``--images N`` lives: one folder per size, so no size overwrites another's."""
    name = "bench_jpegs" if images == 2000 else (
        f"bench_jpegs{images // 1000}k" if images % 1000 == 0 else f"bench_jpegs_{images}")
    return REPO / "data" / name


def link_val(root: Path) -> None:
    """val/: every tenth training image, hard-linked (a pack needs both splits)."""
    for i, path in enumerate(files_of(root)):
        target = root / "val" / path.parent.name / path.name
        if i % 10 == 0 and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def files_of(root: Path) -> list[Path]:
    return sorted((root / "train").rglob("*.JPEG"))


# ------------------------------------------------------------------ one measurement each
TINY = {"images": 24, "batch": 8, "repeats": 1, "passes": 1}


def run_loader(loader, passes: int) -> tuple[int, float]:
    """Images per second over ``passes`` whole epochs of ``loader``, after one untimed epoch
    (imports, pipeline build, caches). Every timed epoch starts from an empty pipeline, so no
    work a loader prefetched during the warm-up is counted as free."""
    def epoch(number):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(number)
        return loader
    for _ in epoch(0):
        pass
    n, t0 = 0, time.perf_counter()
    for number in range(1, passes + 1):
        for images, _ in epoch(number):
            n += len(images)
    if images.is_cuda:
        import torch
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def bench_pipelines(root: Path, backend: str, a, device: str = "cpu", **data):
    import torch
    from pipelines import DataConfig, LoaderSpec, build_loader
    cfg = DataConfig(root=str(root), backend=backend, workers=a.threads, image_size=224,
                     read_ahead=a.read_ahead, **data)
    loader = build_loader(cfg, LoaderSpec("train", batch_size=a.batch, device=torch.device(device)))
    return run_loader(loader, a.passes)


def bench_without_kernel(root: Path, a):
    from pipelines import torch_resize
    kernel, torch_resize._kernel = torch_resize._kernel, None  # as if no C compiler was found
    try:
        return bench_pipelines(root, "dali", a)
    finally:  # for the measurements after this one in a --tiny process
        torch_resize._kernel = kernel


def bench_decode_jpeg(root: Path, a):
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2
    from pipelines.torch_backend import IMAGENET_MEAN, IMAGENET_STD
    tf = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    files = files_of(root)

    class Files(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(decode_jpeg(read_file(str(files[i])), mode=ImageReadMode.RGB)), 0

    def init(_):
        torch.set_num_threads(1)
    loader = DataLoader(Files(), batch_size=a.batch, shuffle=True, num_workers=a.threads,
                        drop_last=True, worker_init_fn=init)
    return run_loader(loader, a.passes)


def bench_dali_decode(root: Path, a):
    """DALI's CPU decoder alone (full images, ``threads`` threads, C++ file reader): the
    ceiling of any DALI CPU pipeline on this machine."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    files = [str(p) for p in files_of(root)]

    @pipeline_def(batch_size=a.batch, num_threads=a.threads, device_id=None, exec_dynamic=True,
                  prefetch_queue_depth=3)
    def decode_only():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=True, seed=0)
        return fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False)

    pipe = decode_only()
    pipe.build()
    for _ in range(len(files) // a.batch):  # one untimed pass, as run_loader
        pipe.run()
    steps = len(files) // a.batch * a.passes
    t0 = time.perf_counter()
    for _ in range(steps):
        pipe.run()
    return steps * a.batch, time.perf_counter() - t0


def _decode_chunk(paths: list[str]) -> int:
    try:
        import simplejpeg

        def decode(data):
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ImportError:
        import torch
        from torchvision.io import decode_jpeg
        torch.set_num_threads(1)

        def decode(data):
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    for p in paths:
        with open(p, "rb") as f:
            decode(f.read())
    return len(paths)


def bench_raw(root: Path, a):
    from multiprocessing import get_context
    paths = [str(p) for p in files_of(root)]
    chunks = [paths[i::a.threads * 8] for i in range(a.threads * 8)]
    with get_context("fork").Pool(a.threads) as pool:
        pool.map(_decode_chunk, [paths[:32]] * a.threads)  # warm up
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks * a.passes))
        return n, time.perf_counter() - t0


def measure(name: str, root: Path, a) -> dict:
    fn = {"dali-cpu": lambda: bench_pipelines(root, "dali", a),
          "dali-cpu-torch-ops": lambda: bench_without_kernel(root, a),
          "dali-cpu-dali-resize": lambda: bench_pipelines(root, "dali", a, resize_with="dali"),
          "dali-mixed": lambda: bench_pipelines(root, "dali", a, "cuda"),
          "torch-pil": lambda: bench_pipelines(root, "torch", a),
          "torch-decode_jpeg": lambda: bench_decode_jpeg(root, a),
          "dali-decode": lambda: bench_dali_decode(root, a),
          "raw-decode": lambda: bench_raw(root, a)}[name]
    n, seconds = fn()
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"name": name, "images": n, "seconds": seconds, "img_s": n / seconds,
            "peak_rss_mib": rss / 1024}


# ------------------------------------------------------------------ driver
def measure_in_subprocess(cases: list[tuple[str, Path]], a) -> list[dict]:
    """Measures each (loader, images folder) case, one after another, in one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads)}
    out = subprocess.run([sys.executable, __file__,
                          *(arg for name, root in cases for arg in ("--one", f"{name}={root}")),
                          "--threads", str(a.threads), "--batch", str(a.batch),
                          "--passes", str(a.passes), "--read-ahead", str(a.read_ahead)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{', '.join(f'{name} on {root}' for name, root in cases)} failed:\n"
                           f"{out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(cases):]]


def processes(cases: list[tuple], tiny: bool) -> list[list[tuple]]:
    """The cases (loader name first) split into fresh processes: one each, so that each has its
    own peak RSS; with --tiny all in one, those that fork (DataLoader workers, raw-decode's pool)
    before DALI has started threads in it."""
    return [sorted(cases, key=lambda case: case[0].startswith("dali"))] if tiny else [
        [case] for case in cases]


def latency_main(root: Path, a) -> int:
    import contextlib
    import tempfile
    from statistics import median
    sys.path.insert(0, str(REPO / "tests"))
    from latency_fs import fuse_unavailable, mounted
    from pipelines.pack import is_pack, pack
    why = fuse_unavailable(a.fuse_engine)
    if why:
        print(f"latency mode needs FUSE: {why}", file=sys.stderr)
        return 1
    packed = root.with_name(root.name + "_pack")
    if not is_pack(packed):
        pack(str(root), str(packed), progress=False)
    slow = f"{a.latency_ms:g} ms"
    filesystems = ["local", "0 ms", slow]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        where = {}
        for layout, source in (("folder", root), ("pack", packed)):
            where[layout, "local"] = source
            for fs, seconds in (("0 ms", 0.0), (slow, a.latency_ms / 1000)):
                where[layout, fs] = stack.enter_context(mounted(
                    source, tmp / f"{layout}-{seconds}", seconds, kernel_cache=True,
                    cache_seconds=3600, engine=a.fuse_engine))
        cases = [(loader, layout, fs) for loader in ("dali-cpu", "torch-pil")
                 for layout in ("folder", "pack") for fs in filesystems]
        rounds = []
        for r in range(a.repeats):
            rounds.append({})
            for group in processes(cases if r % 2 == 0 else cases[::-1], a.tiny):
                measured = measure_in_subprocess(
                    [(loader, where[layout, fs]) for loader, layout, fs in group], a)
                for case, result in zip(group, measured):
                    loader, layout, fs = case
                    rounds[-1][case] = result["img_s"]
                    print(f"  round {r}: {loader:10s} {layout:6s} {fs:6s} "
                          f"{rounds[-1][case]:7.0f} img/s")
    print(f"\n{len(files_of(root))} JPEGs, batch {a.batch}, {a.threads} threads/workers, "
          f"data.read_ahead={a.read_ahead}; median over {a.repeats} rounds, ratios within each")
    print(f"{'loader':10s} {'layout':6s} " + " ".join(f"{fs:>8s}" for fs in filesystems)
          + f" {'0 ms/local':>10s} {slow + '/local':>11s}")
    results = {}
    for loader in ("dali-cpu", "torch-pil"):
        for layout in ("folder", "pack"):
            img_s = [median(r[loader, layout, fs] for r in rounds) for fs in filesystems]
            ratios = [median(r[loader, layout, fs] / r[loader, layout, "local"] for r in rounds)
                      for fs in filesystems[1:]]
            results[f"{loader} {layout}"] = {"img_s": dict(zip(filesystems, img_s)),
                                             "ratio_to_local": dict(zip(filesystems[1:], ratios))}
            print(f"{loader:10s} {layout:6s} " + " ".join(f"{v:8.0f}" for v in img_s)
                  + f" {ratios[0]:10.2f} {ratios[1]:11.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": [{" ".join(k): v for k, v in r.items()}
                                                       for r in rounds], "summary": results},
                                           indent=2))
    return 0


def summarize(rounds: list[dict[str, dict]], names: list[str]) -> dict[str, dict]:
    """Per loader: median img/s, and the median of its ratios to torch-pil and raw-decode
    computed within each round (the machine's speed drifts between rounds, not within one)."""
    from statistics import median
    return {name: {"img_s": median(r[name]["img_s"] for r in rounds),
                   "x_torch_pil": median(r[name]["img_s"] / r["torch-pil"]["img_s"] for r in rounds),
                   "x_raw_decode": median(r[name]["img_s"] / r["raw-decode"]["img_s"] for r in rounds),
                   "peak_rss_mib": max(r[name]["peak_rss_mib"] for r in rounds)}
            for name in names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--passes", type=int, default=3, help="epochs over the images per measurement")
    p.add_argument("--data", help="the images' folder (default: data/bench_jpegs for 2000, "
                                   "data/bench_jpegs1k for 1000, ...)")
    p.add_argument("--read-ahead", type=int, default=DataConfig.read_ahead,
                   help="data.read_ahead of the loaders (default %(default)s)")
    p.add_argument("--fuse-engine", choices=("c", "python"), default="c",
                   help="the latency file system's daemon: tests/latency_fs.c (microseconds of CPU "
                        "per call, the default) or the fusepy one of the tests")
    p.add_argument("--latency-ms", type=float,
                   help="latency mode: folder and pack, local and through FUSE at this latency")
    p.add_argument("--tiny", action="store_true",
                   help="the tests' check that the command runs: "
                        + " ".join(f"--{k} {v}" for k, v in TINY.items())
                        + " unless given, and one process for all measurements of a round")
    p.add_argument("--one", action="append", help=argparse.SUPPRESS)  # NAME=FOLDER, in a child
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.tiny:
        p.set_defaults(**TINY)
        a = p.parse_args(argv)
    if a.one:
        for case in a.one:
            name, _, data = case.partition("=")
            print(json.dumps(measure(name, Path(data), a)), flush=True)
        return 0
    if a.tiny:
        print("--tiny: every measurement of a round in one process; whether the command runs, "
              "not how fast")
    root = Path(a.data) if a.data else default_set(a.images)
    make_set(root, a.images)
    if a.latency_ms is not None:
        return latency_main(root, a)
    sizes = [f.stat().st_size for f in files_of(root)]
    print(f"{len(sizes)} JPEGs, mean {sum(sizes) / len(sizes) / 1024:.0f} KB, batch {a.batch}, "
          f"{a.threads} threads/workers/processes")
    import torch
    names = ["dali-cpu", "dali-cpu-torch-ops", "dali-cpu-dali-resize", "torch-pil",
             "torch-decode_jpeg", "dali-decode", "raw-decode"]
    if torch.cuda.is_available():
        names.insert(1, "dali-mixed")
    rounds: list[dict[str, dict]] = []
    for r in range(a.repeats):
        rounds.append({})
        for group in processes([(name, root) for name in (names if r % 2 == 0 else names[::-1])],
                               a.tiny):
            for (name, _), result in zip(group, measure_in_subprocess(group, a)):
                rounds[-1][name] = result
                print(f"  round {r}: {name:22s} {result['img_s']:7.0f} img/s")
    summary = summarize(rounds, names)
    print(f"\n{'loader':22s} {'img/s':>7s} {'x torch-pil':>11s} {'x raw-decode':>12s} "
          f"{'peak RSS':>9s}   (median over {a.repeats} rounds; ratios taken within each round)")
    for name in names:
        b = summary[name]
        print(f"{name:22s} {b['img_s']:7.0f} {b['x_torch_pil']:11.2f} {b['x_raw_decode']:12.2f} "
              f"{b['peak_rss_mib']:6.0f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
