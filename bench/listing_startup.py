"""Start-up to the first batch on an ImageNet-sized listing over a slow file system.

    python bench/listing_startup.py [--classes 1000] [--files 1281] [--latency-ms 2]

Serves ImageNet's shape, ``train/`` with 1,000 class folders of 1,281 files (1.28M entries),
from the FUSE file system of the tests (``tests/latency_fs.py --virtual``: every file is the
same ~60 KB JPEG, no disk used), adding ``--latency-ms`` to every metadata operation: open,
stat (getattr), opendir and each readdir request. Then times, each in a fresh process, building
the DALI train loader and taking its first batch of 64:

- ``walk`` (``data.listing_cache=off``): every rank lists the folder, as before the cache;
- ``cold cache``: the first process of a job walks and writes the listing;
- ``warm cache``: every later process, on any rank or restart, checks the listing with one
  stat per directory walked (in parallel) and reads it.

    python bench/listing_startup.py --tiny

Tiny mode (the tests run it): 4 folders of 16 files (one batch), the JPEG made in
the temp folder, and no second warm start (the same path as the first).
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

REPO = Path(__file__).resolve().parent.parent

TINY = {"classes": 4, "files": 16}

CHILD = """
import sys, time, json
t0 = time.perf_counter()
import torch
from pipelines import DataConfig, LoaderSpec, build_loader
t1 = time.perf_counter()
cfg = DataConfig(root=sys.argv[1], backend="dali", workers=2, listing_cache=sys.argv[2])
loader = build_loader(cfg, LoaderSpec("train", batch_size=64))
t2 = time.perf_counter()
images, labels = next(iter(loader))
t3 = time.perf_counter()
print(json.dumps({"samples": loader.dataset_size, "imports_s": t1 - t0, "listing_s": t2 - t1,
                  "first_batch_s": t3 - t2, "to_first_batch_s": t3 - t1}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--files", type=int, default=1281, help="files per class")
    p.add_argument("--latency-ms", type=float, default=2.0)
    p.add_argument("--jpeg", help="the file every entry serves (default: one bench JPEG)")
    p.add_argument("--json")
    p.add_argument("--tiny", action="store_true",
                   help="the tests' check that the command runs: "
                        + " ".join(f"--{k} {v}" for k, v in TINY.items()) + " unless given")
    a = p.parse_args(argv)
    if a.tiny:
        p.set_defaults(**TINY)
        a = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    from latency_fs import fuse_unavailable, mounted
    why = fuse_unavailable()
    if why:
        print(f"needs FUSE: {why}", file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = a.jpeg
        if jpeg is None:
            from input_pipeline import files_of, make_set
            images = (Path(tmp) / "jpeg", 1) if a.tiny else (REPO / "data" / "bench_jpegs", 2000)
            jpeg = str(files_of(make_set(*images))[0])
        cache = str(Path(tmp) / "listings")
        with mounted(None, Path(tmp) / "mnt", a.latency_ms / 1000,
                     ops=("open", "getattr", "opendir", "readdir"),
                     virtual=(a.classes, a.files, jpeg)) as root:
            cases = [("walk", "off"), ("cold cache", cache), ("warm cache", cache),
                     ("warm cache again", cache)]
            for case, setting in cases[:3] if a.tiny else cases:
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", CHILD, str(root), setting],
                                     capture_output=True, text=True, env=env)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                results[case] = json.loads(out.stdout.strip().splitlines()[-1])
                results[case]["process_s"] = time.perf_counter() - t0
                r = results[case]
                print(f"{case:17s} {r['samples']:8d} samples: listing {r['listing_s']:7.1f} s, "
                      f"first batch {r['first_batch_s']:5.1f} s, to the first batch "
                      f"{r['to_first_batch_s']:7.1f} s (imports {r['imports_s']:.1f} s)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
