"""The loaders on a file system with a parallel file system's latency (FUSE, tests/latency_fs.py):
the same batches as from the local folder, for both backends, from a folder and from a pack.
The throughput there is a benchmark (bench/input_pipeline.py --latency-ms 2), not a test."""
from __future__ import annotations

import pytest
import torch

from latency_fs import fuse_unavailable, mounted
from pipelines import DataConfig, LoaderSpec, build_loader
from pipelines.pack import pack
from pipeline_data import write_jpeg_folder

pytest.importorskip("pipelines.dali")
_why = fuse_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"FUSE unavailable: {_why}")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("slow")
    folder = write_jpeg_folder(base / "folder", per_class=6, size=(120, 90))
    pack(str(folder), str(base / "pack"), shard_mb=0.05, progress=False)
    return {"folder": folder, "pack": base / "pack"}


def epoch(root, backend, split, listing_cache):
    cfg = DataConfig(root=str(root), backend=backend, image_size=32, val_resize=36,
                     workers=2 if backend == "torch" else 1, read_ahead=16,
                     listing_cache=listing_cache)
    loader = build_loader(cfg, LoaderSpec(split, batch_size=4, rank=1, world_size=2, seed=5))
    loader.set_epoch(1)
    return list(loader)


@pytest.mark.parametrize("layout", ["folder", "pack"])
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loaders_over_2ms_per_open_return_the_local_batches(layouts, tmp_path, backend, layout):
    with mounted(layouts[layout], tmp_path / "mnt", latency=0.002,
                 ops=("open", "getattr", "opendir", "readdir")) as slow:
        for split in ("train", "val"):
            local = epoch(layouts["folder"], backend, split, "off")
            remote = epoch(slow, backend, split, str(tmp_path / "cache"))
            assert len(local) == len(remote) > 1
            for (a, la), (b, lb) in zip(local, remote):
                assert torch.equal(a, b) and torch.equal(la, lb)


def test_the_c_daemon_serves_the_same_tree_with_its_latency(layouts, tmp_path):
    """tests/latency_fs.c (the benchmark's mount): the same names and bytes as the folder,
    read-only, and an open waits the latency."""
    import os
    import time
    why = fuse_unavailable("c")
    if why:
        pytest.skip(why)
    source = layouts["folder"]
    with mounted(source, tmp_path / "mnt", latency=0.05, ops=("open",), engine="c") as slow:
        local = sorted(p.relative_to(source) for p in source.rglob("*"))
        assert sorted(p.relative_to(slow) for p in slow.rglob("*")) == local
        for rel in local:
            if (source / rel).is_file():
                assert (slow / rel).read_bytes() == (source / rel).read_bytes()
        first = next(p for p in local if (source / p).is_file())
        t0 = time.perf_counter()
        (slow / first).open("rb").close()
        assert time.perf_counter() - t0 >= 0.05
        with pytest.raises(OSError):
            os.open(slow / first, os.O_WRONLY)
