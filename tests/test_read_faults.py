"""Read faults as a cluster's file system has them, served by a real FUSE mount (tests/latency_fs.py):
a transient EIO is read on a later try and quarantines nothing; a persistent one quarantines the
file under on_bad_image=skip; an open that never returns is abandoned after data.read_timeout_s,
tried once more, then quarantined (skip) or named in the stop (stop); many abandoned reads say
the file system looks hung; the read-ahead threads stay few and end with each epoch; and at
scale, 16 ranks (4 torchrun agents x 4) where one rank's file blocks forever finish the run with
that file in bad_images.txt (tests/cluster_sim.py)."""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque

import pytest
import torch

from latency_fs import fuse_unavailable, mounted, release
from pipelines import DataConfig, LoaderSpec, build_loader
from pipelines import read_guard
from pipelines.quarantine import CorruptImageError, quarantine_for, read_bad_images
from pipelines.read_ahead import ReadAhead, read_or_error
from pipeline_data import write_jpeg_folder

_why = fuse_unavailable()
needs_fuse = pytest.mark.skipif(_why is not None, reason=f"FUSE unavailable: {_why}")
try:
    import pipelines.dali  # noqa: F401
    BACKENDS = ["torch", "dali"]
except ImportError:
    BACKENDS = ["torch"]

FAULTY = "train/a_cls/a_cls_005.JPEG"   # the file each test makes fail


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("reads") / "data", per_class=8,
                             size=(64, 48))


def epoch(root, backend, **data):
    """One training epoch of a loader over ``root`` in this process (the torch backend with
    workers=0, so that its reads and their threads are this process's): (batches, quarantine)."""
    cfg = DataConfig(root=str(root), backend=backend, image_size=32, val_resize=36,
                     workers=0 if backend == "torch" else 1, listing_cache="off", **data)
    quarantine = quarantine_for(cfg, "train")
    with build_loader(cfg, LoaderSpec("train", batch_size=4, seed=3,
                                      quarantine=quarantine)) as loader:
        return list(loader), quarantine


def index_of(quarantine, relative: str) -> int:
    return quarantine.samples.files.index(relative.split("/", 1)[1])


def retries_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "transient read error" in r.getMessage()]


@needs_fuse
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eio_on_the_first_two_opens_is_read_on_the_third_and_not_quarantined(
        folder, tmp_path, backend, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.read_guard")
    local, _ = epoch(folder, backend, on_bad_image="stop")
    with mounted(folder, tmp_path / "mnt", latency=0, eio_open={FAULTY: 2}) as mnt:
        got, quarantine = epoch(mnt, backend)
    assert len(quarantine) == 0
    assert len(retries_logged(caplog)) == 2, caplog.text
    assert len(got) == len(local) == 6   # every batch, the faulty file's real bytes in its own
    for (a, la), (b, lb) in zip(local, got):
        assert torch.equal(a, b) and torch.equal(la, lb)


@needs_fuse
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eio_on_every_open_quarantines_the_file_under_skip(folder, tmp_path, backend, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.read_guard")
    with mounted(folder, tmp_path / "mnt", latency=0, eio_open={FAULTY: None}) as mnt:
        got, quarantine = epoch(mnt, backend)
    assert quarantine.state() == {index_of(quarantine, FAULTY): "cannot read: Input/output error"}
    assert len(retries_logged(caplog)) == 3   # tried 4 times in all (0.1, 0.4, 1.6 s apart)
    assert len(got) == 6


@needs_fuse
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_open_that_never_returns_is_abandoned_retried_then_quarantined(folder, tmp_path,
                                                                          backend):
    abandoned = read_guard.abandoned_reads()
    start = time.monotonic()
    with mounted(folder, tmp_path / "mnt", latency=0, block_open=[FAULTY]) as mnt:
        got, quarantine = epoch(mnt, backend, read_timeout_s=1)
        took = time.monotonic() - start
        (index, reason), = quarantine.state().items()
        assert index == index_of(quarantine, FAULTY)
        assert reason.startswith("cannot read: no answer in 1 s, 2 tries"), reason
        assert len(got) == 6                                       # the loader went on
        assert read_guard.abandoned_reads() - abandoned == 2       # the try and the retry
        stuck = [t for t in threading.enumerate() if t.name == "read-ahead"]
        assert stuck, "the blocked reads' threads are left behind, not joined"
        assert read_guard.oldest_read() is None      # abandoned reads are not what it waits on
    assert took < 60, took   # ~2 s of timeouts; the rest is the loader on a loaded machine


@needs_fuse
@pytest.mark.timeout(120)
def test_under_stop_the_error_names_the_file_that_does_not_answer(folder, tmp_path):
    with mounted(folder, tmp_path / "mnt", latency=0, block_open=[FAULTY]) as mnt:
        with pytest.raises(CorruptImageError) as raised:
            epoch(mnt, "torch", read_timeout_s=1, on_bad_image="stop")
    message = str(raised.value)
    assert str(mnt / FAULTY) in message and "no answer in 1 s, 2 tries" in message, message
    assert isinstance(raised.value.__cause__, TimeoutError)


@pytest.mark.timeout(60)
def test_past_a_few_abandoned_reads_one_error_says_the_file_system_looks_hung(monkeypatch,
                                                                              caplog):
    monkeypatch.setattr(read_guard, "_abandoned", 0)
    monkeypatch.setattr(read_guard, "_abandoned_paths", [])
    monkeypatch.setattr(read_guard, "_abandon_times", deque(maxlen=read_guard.HUNG_AFTER))
    monkeypatch.setattr(read_guard, "_said_hung", [float("-inf")])
    never = threading.Event()

    def read(i):
        with read_guard.reading(f"/lustre/imagenet/train/n01/{i}.JPEG"):
            if i % 2:
                never.wait()
            return b"%d" % i

    try:
        got = list(ReadAhead(read_or_error(read), 4, timeout_s=0.2)(range(8)))
    finally:
        never.set()
    failed = [g for g in got if isinstance(g, OSError)]
    assert len(failed) == 4 and all(isinstance(g, read_guard.ReadTimeout) for g in failed)
    assert got[0] == b"0" and got[2] == b"2"
    assert read_guard.abandoned_reads() == 8
    hung = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(hung) == 1 and "looks hung" in hung[0].getMessage()
    assert "/lustre/imagenet/train/n01" in hung[0].getMessage()


def test_a_few_bad_files_far_apart_do_not_say_the_file_system_is_hung(monkeypatch, caplog):
    monkeypatch.setattr(read_guard, "_abandon_times", deque(maxlen=read_guard.HUNG_AFTER))
    monkeypatch.setattr(read_guard, "_said_hung", [float("-inf")])
    for _ in range(read_guard.HUNG_AFTER + 1):    # further apart than 10 timeouts of 10 ms
        read_guard.abandon(None, 0.01)
        time.sleep(0.15)
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]
    for _ in range(read_guard.HUNG_AFTER):        # close together: hung
        read_guard.abandon(None, 1.0)
    assert len([r for r in caplog.records if "looks hung" in r.getMessage()]) == 1


@pytest.mark.timeout(60)
def test_when_every_read_blocks_the_retry_still_times_out():
    """A mount that stops answering: every read from sample 4 on blocks, more reads than
    threads. The retry of the first one starts at once (not queued behind the blocked ones), so
    the consumer gets its ReadTimeout after two timeouts instead of waiting forever."""
    never = threading.Event()

    def read(i):
        if i >= 4:
            never.wait()
        return b"%d" % i

    reader = ReadAhead(read, 16, timeout_s=0.2)(range(40))
    try:
        assert [next(reader) for _ in range(4)] == [b"0", b"1", b"2", b"3"]
        started = time.monotonic()
        with pytest.raises(read_guard.ReadTimeout):
            next(reader)
        assert time.monotonic() - started < 30
    finally:
        never.set()


def read_ahead_threads() -> int:
    return sum(t.name == "read-ahead" for t in threading.enumerate())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_ahead_threads_are_few_and_end_with_each_epoch(folder, backend):
    """data.read_ahead=64 on a local folder: a few threads while an epoch is read, none once
    it ends, however many loaders are built and iterated."""
    gc.collect()
    before = threading.active_count()
    cfg = DataConfig(root=str(folder), backend=backend, image_size=32, val_resize=36,
                     workers=0 if backend == "torch" else 1, listing_cache="off", read_ahead=64)
    loaders, most = [], 0
    for _ in range(4):
        loader = build_loader(cfg, LoaderSpec("train", batch_size=4, seed=3))
        loaders.append(loader)            # kept alive: their threads must not wait for the GC
        for epoch_ in range(2):
            loader.set_epoch(epoch_)
            for _ in loader:
                most = max(most, read_ahead_threads())
    deadline = time.time() + 10
    while read_ahead_threads() and time.time() < deadline:
        time.sleep(0.05)                  # a thread ends a moment after it is told to
    assert 0 < most <= 8, most
    assert read_ahead_threads() == 0
    assert threading.active_count() <= before + 2, [t.name for t in threading.enumerate()]


# ------------------------------------------------------------------ at scale
BLOCKED = "train/class_1/007.jpg"   # one file of one rank's shard: its open never returns


@needs_fuse
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sixteen_ranks_finish_with_the_file_whose_open_never_returns_in_bad_images(tmp_path):
    """4 torchrun agents x 4 ranks on one c10d rendezvous (gloo, a tiny model, data.workers=0),
    the training data served through the FUSE mount: the rank whose next file blocks forever
    abandons it after data.read_timeout_s, tries it again, quarantines it, and the whole run
    finishes with it in bad_images.txt."""
    from cluster_sim import Cluster
    from trainer_utils import base_overrides, make_folder
    nodes, ranks = 4, 4
    data = make_folder(tmp_path / "data", train_per_class=32)   # 96 files: 3 steps of 2 x 16
    out = tmp_path / "out"
    with mounted(data, tmp_path / "mnt", latency=0, block_open=[BLOCKED]) as mnt:
        overrides = base_overrides(mnt, out, **{
            "train.epochs": 1, "train.batch_size": 2 * nodes * ranks,
            "optim.lr_batch": 2 * nodes * ranks, "data.read_timeout_s": 1,
            "data.listing_cache": str(tmp_path / "listings")})
        with Cluster(nodes, ranks, overrides, logs=tmp_path / "logs") as cluster:
            deadline = time.time() + 360
            while not (out / "result.json").exists():   # the run's end, written by rank 0
                assert time.time() < deadline and all(a.poll() is None for a in cluster.agents), \
                    cluster.tail()
                time.sleep(0.5)
            # The rank whose open never returned cannot exit: its abandoned thread waits in the
            # kernel, uninterruptibly, for the FUSE answer (as on a hard-mounted NFS). Every
            # other rank does; then the file system answers and that rank ends too.
            lingering = {}
            while time.time() < deadline:
                # a process whose threads are all Z has exited (its agent has not reaped it yet)
                lingering = {pid: states for pid in cluster.rank_pids(zombies=True)
                             if set(states := thread_states(pid)) - {"Z"}}
                if all(set(states) <= {"D", "Z"} for states in lingering.values()):
                    break                                 # only stuck ranks are left
                time.sleep(0.5)
            release(mnt)
            codes = cluster.wait(timeout=120)
        logs = "\n".join(cluster.log(k) for k in range(nodes))
        assert codes == [0] * nodes, cluster.tail()
        assert len(lingering) == 1 and "D" in next(iter(lingering.values())), lingering
    assert BLOCKED.split("/", 1)[1] in read_bad_images(out / "bad_images.txt"), logs[-3000:]
    assert "no answer in 1 s" in (out / "bad_images.txt").read_text()
    assert logs.count("read abandoned after 1 s") == 2, logs[-3000:]   # the try and the retry
    assert sum(m["type"] == "epoch" for m in map(__import__("json").loads,
               (out / "metrics.jsonl").read_text().splitlines())) == 1


def thread_states(pid: int) -> str:
    """The states of a process's threads (/proc/PID/task/*/stat: R, S, D, Z, ...)."""
    import pathlib

    from engine.watchdog import proc_state
    return "".join(proc_state(str(task / "stat"))
                   for task in pathlib.Path(f"/proc/{pid}/task").glob("*"))
