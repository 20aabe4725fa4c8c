"""Read rate of a pack in S3 vs on a local disk, without decoding (issue #35's input target).

    python bench/s3_input.py [--images 2000] [--kb 110] [--latency-ms 20] [--read-ahead 64]
                             [--shuffle-shards 4] [--repeats 3]

Packs ``--images`` files of ``--kb`` KB (random bytes in the ImageNet layout: nothing is decoded)
once locally and once to moto's S3 server (a process) behind the latency proxy of the tests
(``tests/s3_server.py``, ``--latency-ms`` added to every request), then reads the whole training
epoch in the permutation order of the trainer (``train_shard_indices``, one process) through
the loaders' reading path (``BadImagePolicy.reader``: read-ahead threads, ``--read-ahead``
reads in flight, retries) from:

- local:       the local pack (positioned reads into open shards, page cache);
- s3:          the S3 pack, one range GET per sample through the proxy;
- s3+cache:    the S3 pack with ``data.shard_cache`` warm (its downloads finished first);
- local/shards: the local pack in the order of ``data.shuffle=shards`` (``--shuffle-shards``
  shards mixed at a time);
- s3/shards cold: the S3 pack in that order with ``data.shard_cache`` EMPTY at the start
  (a new folder each round, the pack opened inside the timed span): the cache downloads the
  shards whole in the order of first read (``ShardCache.plan``, as the loader's
  ``set_epoch`` calls it) and reads wait for a shard being downloaded; the time includes
  every download;
- s3/shards cold 0ms: the same without the proxy's latency (what the server's throughput
  alone allows: where it equals the row above, the 20 ms are hidden).

Side by side, each case once per round (``--repeats`` rounds); images/s and the median of each
round's ratio to local. On this 2-core machine moto, the proxy and the reader share the CPU: the
s3 figure is the Python server's, not S3's. ``--tiny`` (the tests run it): 24 files of 2 KB,
one round.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import numpy as np  # noqa: E402

from pipelines.base import ShardGroups, train_shard_indices  # noqa: E402
from pipelines.pack import load_pack, pack  # noqa: E402
from pipelines.quarantine import BadImagePolicy  # noqa: E402
from pipelines.sources import open_samples  # noqa: E402
from s3_server import fault_proxy, make_bucket, moto_server, s3_env, using_env  # noqa: E402

CASES = ("local", "s3", "s3+cache", "local/shards", "s3/shards cold", "s3/shards cold 0ms")


def make_files(root: Path, images: int, kb: float) -> Path:
    """``images`` files of random bytes in ``root/{train,val}/<class>/``, 10 classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", 10)):
        for i in range(n):
            folder = root / split / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:06d}.jpg").write_bytes(rng.bytes(int(kb * 1024)))
    return root


def read_rate(samples, order: list[int], read_ahead: int) -> float:
    """Images/s of reading ``order`` through the loaders' reads; ``samples`` may be a
    function that opens them (timed too). An S3 pack's shard cache is told the order first,
    as the loader's ``set_epoch`` does."""
    start, total = time.perf_counter(), 0
    if callable(samples):
        samples = samples()
    reads = BadImagePolicy(samples, None, seed=0, drop_bad=False).reader(read_ahead)
    if getattr(samples, "cache", None) is not None:
        samples.plan(order)
    for data in reads(order):
        if isinstance(data, OSError):
            raise data
        total += len(data)
    return len(order) / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--kb", type=float, default=110.0, help="bytes per file (ImageNet: ~110 KB)")
    p.add_argument("--shard-mb", type=float, default=16.0)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--read-ahead", type=int, default=64)
    p.add_argument("--shuffle-shards", type=int, default=4, help="data.shuffle_shards")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    if a.tiny:
        a.images, a.kb, a.shard_mb, a.repeats, a.shuffle_shards = 24, 2.0, 0.01, 1, 2
    with tempfile.TemporaryDirectory(prefix="s3_input-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        files = make_files(tmp / "files", a.images, a.kb)
        pack(str(files), str(tmp / "pack"), shard_mb=a.shard_mb, progress=False)
        moto = stack.enter_context(moto_server(tmp))
        proxy = stack.enter_context(fault_proxy(moto.url, 0, tmp))
        env = s3_env(proxy.url)
        make_bucket(env, "bench")
        stack.enter_context(using_env(env))
        pack(str(files), "s3://bench/pack", shard_mb=a.shard_mb, progress=False)
        proxy.set_latency(a.latency_ms)
        local = load_pack(tmp / "pack", "train")
        s3 = open_samples("s3://bench/pack", "train")
        cached = open_samples("s3://bench/pack", "train", shard_cache=str(tmp / "cache"))
        cached.read(0)                         # starts its downloader
        if not cached.cache.wait(600):
            raise RuntimeError("the shard cache did not fill in 600 s")
        groups = ShardGroups(local.shard, a.shuffle_shards)
        rates = {case: [] for case in CASES}
        for r in range(a.repeats):
            order = train_shard_indices(len(local), 8, 0, 1, seed=0, epoch=r).tolist()
            by_shards = train_shard_indices(len(local), 8, 0, 1, 0, r, groups).tolist()

            def cold(case=""):
                return lambda: open_samples("s3://bench/pack", "train",
                                            shard_cache=str(tmp / f"cold{r}{case}"))
            cases = {"local": (local, order), "s3": (s3, order), "s3+cache": (cached, order),
                     "local/shards": (local, by_shards), "s3/shards cold": (cold(), by_shards),
                     "s3/shards cold 0ms": (cold("0ms"), by_shards)}
            for case in (CASES if r % 2 == 0 else CASES[::-1]):
                samples, reads = cases[case]
                proxy.set_latency(0 if case.endswith("0ms") else a.latency_ms)
                rates[case].append(read_rate(samples, reads, a.read_ahead))
    print(f"{a.images} files of {a.kb:g} KB in {len(local.shards)} shard(s) of {a.shard_mb:g} MB, "
          f"{a.latency_ms:g} ms per S3 request, read-ahead {a.read_ahead}, "
          f"{a.shuffle_shards} shards mixed at a time, "
          f"{os.cpu_count()} cores, median of {a.repeats}")
    print("| source | images/s | ratio to local |")
    print("| --- | --- | --- |")
    for case in CASES:
        ratio = statistics.median(x / l for x, l in zip(rates[case], rates["local"]))
        print(f"| {case} | {statistics.median(rates[case]):.0f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
