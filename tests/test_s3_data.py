"""Packs in S3-compatible object storage (``pipelines/s3_pack.py``), against moto's real S3
server (a process) and our latency and fault proxy in front of it (``tests/s3_server.py``):
``pack`` to S3 checked and resumable, the S3 samples indistinguishable from the local pack's,
transient faults retried, a shard cut off for good one quarantine event, one-line errors before
training, the shard cache, and a 2-process run killed mid-epoch and resumed."""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from pipelines import DataConfig, LoaderSpec, build_loader, object_store
from pipelines.pack import INDEX, PackError, load_pack, pack
from pipelines.quarantine import BadImagePolicy, CorruptImageError, Quarantine, TooManyBadImages
from pipelines.s3_pack import ShardCache
from pipelines.sources import open_samples, root_problem
from s3_server import fault_proxy, make_bucket, moto_server, s3_env, using_env
from trainer_utils import REPO, base_overrides, cli_in_process, make_folder, run_training, step_losses

SHARD_MB = 0.01          # ~5 images of make_folder's per shard: 10 train shards


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's server, the proxy in front of it (no latency unless a test sets it), a bucket."""
    tmp = tmp_path_factory.mktemp("s3")
    with moto_server(tmp) as moto, fault_proxy(moto.url, 0, tmp) as proxy:
        env = s3_env(proxy.url, AWS_MAX_ATTEMPTS="3")
        make_bucket(env, "data")
        with using_env(env):
            yield proxy, env


@pytest.fixture(autouse=True)
def _no_faults(s3):
    yield
    s3[0].set_faults([])
    s3[0].set_latency(0)


@pytest.fixture(scope="module")
def packs(s3, tmp_path_factory):
    """The same folder packed locally and (by the command, as a user runs it) to S3."""
    folder = make_folder(tmp_path_factory.mktemp("folder"))
    local = tmp_path_factory.mktemp("local") / "pack"
    pack(str(folder), str(local), shard_mb=SHARD_MB, progress=False)
    proc = subprocess.run([sys.executable, "-m", "pipelines", "pack", str(folder), "s3://data/pack",
                           "--shard-mb", str(SHARD_MB), "--no-progress"], cwd=REPO, env=s3[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train with data.root=s3://data/pack" in proc.stdout
    return folder, local, "s3://data/pack"


def objects(url: str) -> dict[str, int]:
    return dict(object_store.listing(url))


def test_pack_to_s3_holds_the_local_packs_objects_each_checked(packs):
    folder, local, url = packs
    local_files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert set(objects(url)) == local_files
    for split in ("train", "val"):
        index = np.load(io.BytesIO(object_store.read(f"{url}/{split}/{INDEX}")))
        assert len(index["shards"]) > 3
        for name, sha in zip(index["shards"], index["sha256"]):
            data = (local / split / str(name)).read_bytes()
            assert object_store.read(f"{url}/{split}/{name}") == data
            assert sha == hashlib.sha256(data).hexdigest()
            assert object_store.recorded_sha256(f"{url}/{split}/{name}") == sha
        with np.load(local / split / INDEX) as z:
            for key in ("shards", "shard", "offset", "size", "label", "classes", "sha256"):
                assert (index[key] == z[key]).all(), key


def test_a_failed_pack_resumes_after_its_complete_shards(packs, s3):
    folder, local, _ = packs
    proxy, url = s3[0], "s3://data/resumed"
    proxy.set_faults([{"method": "PUT", "key": r"train/shard-000003\.tar", "action": "denied"}])
    with pytest.raises(OSError, match=r"upload s3://data/resumed/train/shard-000003.tar: access "
                                      r"denied"):
        pack(str(folder), url, shard_mb=SHARD_MB, progress=False)
    held = objects(url)
    assert "train/shard-000002.idx" in held and "train/shard-000003.idx" not in held
    assert f"train/{INDEX}" not in held
    proxy.set_faults([])
    before = len(proxy.stats()["puts"])
    pack(str(folder), url, shard_mb=SHARD_MB, progress=False)
    puts = [p.split("/resumed/")[1] for p in proxy.stats()["puts"][before:]]
    assert not any(re.match(r"train/shard-00000[0-2]\.", p) for p in puts), puts   # skipped
    assert puts[:2] == ["pack.json", "classes.tsv"] and "train/shard-000003.tar" in puts
    assert puts.index("train/shard-000003.tar") < puts.index("train/shard-000003.idx") < \
        puts.index(f"train/{INDEX}")                          # .idx after its shard, index last
    assert {k: v for k, v in objects(url).items() if k != "pack.json"} == \
        {k: v for k, v in objects(packs[2]).items() if k != "pack.json"}
    other = make_folder(folder.parent / "other", train_per_class=3, val_per_class=2)
    with pytest.raises(PackError, match="s3://data/resumed holds a pack of another input"):
        pack(str(other), url, shard_mb=SHARD_MB, progress=False)


def test_s3_samples_are_the_local_packs_by_index(packs):
    _, local, url = packs
    for split in ("train", "val"):
        a, b = load_pack(local, split), pickle.loads(pickle.dumps(open_samples(url, split)))
        assert (len(a), a.labels, a.classes, a.shards) == (len(b), b.labels, b.classes, b.shards)
        assert [b.read(i) for i in range(len(b))] == [a.read(i) for i in range(len(a))]
        assert b.describe(7) == f"{url}/{split}/" + a.describe(7).split(f"{split}/", 1)[1]


def test_the_torch_backends_workers_read_the_same_batches_from_s3(packs):
    """DataLoader workers (a process each: a client of their own), rank 1 of 2, epoch 1
    resumed at batch 1: the batches of the local pack."""
    _, local, url = packs
    got = []
    for root in (local, url):
        cfg = DataConfig(root=str(root), backend="torch", image_size=32, val_resize=36,
                         workers=1, read_ahead=16)
        with build_loader(cfg, LoaderSpec("train", batch_size=4, rank=1, world_size=2,
                                          seed=3)) as loader:
            loader.set_epoch(1, 1)
            got.append(list(loader))
    assert len(got[0]) == len(got[1]) == 5
    for (a, la), (b, lb) in zip(*got):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_slowdown_and_500_answers_are_retried_and_change_nothing(packs, s3):
    _, local, url = packs
    before = s3[0].stats()["injected"]
    s3[0].set_faults([{"method": "GET", "key": r"train/shard-000001\.tar", "action": "slowdown",
                       "times": 3},
                      {"method": "GET", "key": r"train/shard-000004\.tar", "action": "500",
                       "times": 3},
                      {"method": "GET", "key": r"train/shard-000006\.tar", "action": "cut",
                       "times": 2}])
    a, b = load_pack(local, "train"), open_samples(url, "train")
    order = np.random.default_rng(0).permutation(len(a)).tolist()
    reads = BadImagePolicy(b, None, seed=0, drop_bad=False).reader(8)   # the loaders' reads
    assert list(reads(order)) == [a.read(i) for i in order]
    injected = s3[0].stats()["injected"]
    assert {k: injected[k] - before.get(k, 0) for k in injected} == \
        {"slowdown": 3, "500": 3, "cut": 2, **{k: 0 for k in before if k not in ("slowdown", "500", "cut")}}


def cut_for_good(s3, shard: int) -> None:
    s3[0].set_faults([{"method": "GET", "key": rf"train/shard-{shard:06d}\.tar", "action": "cut"}])


def test_a_shard_cut_off_for_good_is_one_event(packs, s3, caplog):
    _, local, url = packs
    cut_for_good(s3, 2)
    quarantine = Quarantine("train", limit=1)       # 5 bad images would stop the run
    cfg = DataConfig(root=url, backend="torch", workers=0, read_ahead=16, image_size=32)
    with caplog.at_level(logging.WARNING, "pipelines.quarantine"):
        with build_loader(cfg, LoaderSpec("train", batch_size=8, quarantine=quarantine)) as loader:
            loader.set_epoch(0)
            assert sum(len(labels) for _, labels in loader) == 48       # every slot filled
    members = np.flatnonzero(load_pack(local, "train").shard == 2).tolist()
    assert len(members) > 2 and sorted(quarantine.state()) == members
    assert list(quarantine.bad_shards()) == [f"{url}/train/shard-000002.tar"]
    assert quarantine.bad_images() == {}
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 1 and "unreadable shard quarantined (1 of at most 1, " \
        "data.max_bad_shards)" in lines[0], lines
    again = Quarantine("train", limit=1, shard_limit=1).bind(open_samples(url, "train"))
    again.merge(quarantine.state())                                # from a checkpoint
    assert len(again.bad_shards()) == 1 and again.bad_images() == {}
    with pytest.raises(TooManyBadImages, match="2 unreadable shards .* data.max_bad_shards=1"):
        again.add(int(np.flatnonzero(load_pack(local, "train").shard == 5)[0]),
                  f"unreadable shard {url}/train/shard-000005.tar: cut")


def test_under_stop_an_unreadable_shard_stops_naming_it(packs, s3):
    _, _, url = packs
    cut_for_good(s3, 0)
    cfg = DataConfig(root=url, backend="torch", workers=0, read_ahead=4, image_size=32,
                     on_bad_image="stop")
    with pytest.raises(CorruptImageError, match=r"unreadable shard s3://data/pack/train/"
                                                r"shard-000000\.tar"):
        with build_loader(cfg, LoaderSpec("train", batch_size=8)) as loader:
            loader.set_epoch(0)
            list(loader)


def test_the_shard_cache_serves_reads_once_warm(packs, s3, tmp_path):
    _, local, url = packs
    a, b = load_pack(local, "train"), open_samples(url, "train")
    b.sha256[3] = "0" * 64                                # a download that does not verify
    b.cache = ShardCache(str(tmp_path))                   # its downloader starts at the 1st read
    assert [b.read(i) for i in range(len(b))] == [a.read(i) for i in range(len(a))]
    assert b.cache.wait(60)
    cached = {p.name for p in tmp_path.glob("*.tar")}
    assert cached == {f"{h}.tar" for h in b.sha256} - {"0" * 64 + ".tar"}
    requests = s3[0].stats()["requests"]
    hit = [i for i in range(len(b)) if b.shard[i] != 3]
    assert [b.read(i) for i in hit] == [a.read(i) for i in hit]
    assert s3[0].stats()["requests"] == requests              # all from the cache
    assert b.read(int(np.flatnonzero(b.shard == 3)[0])) == a.read(int(np.flatnonzero(a.shard == 3)[0]))
    assert s3[0].stats()["requests"] == requests + 1          # the one not cached: a range GET


def test_the_cache_downloads_in_the_order_of_first_reads_and_a_read_waits_for_its_shard(
        packs, s3, tmp_path, monkeypatch):
    """``plan`` (the loader's set_epoch) puts the shards in the order this process reads them,
    then the others; a new plan (the next epoch, a resume) takes over after the download in
    flight; a read of a shard being downloaded waits for it: no range GET of it."""
    _, local, url = packs
    a = load_pack(local, "train")
    monkeypatch.setattr(ShardCache, "DOWNLOADS", 1)
    b = open_samples(url, "train")
    b.cache = ShardCache(str(tmp_path))

    def reads_of(shards):
        return [int(i) for k in shards for i in np.flatnonzero(b.shard == k)]
    order = reads_of([7, 2, 5])
    s3[0].set_faults([{"method": "GET", "key": r"train/shard-000007\.tar", "action": "hold",
                       "ms": 1500, "times": 1}])
    before = len(s3[0].stats()["gets"])
    b.plan(order)
    deadline = time.monotonic() + 30
    while s3[0].stats()["held"] == 0:                     # shard 7's download is in flight
        assert time.monotonic() < deadline
        time.sleep(0.02)
    b.plan(reads_of([4, 1]))                              # planned again meanwhile
    assert b.read(order[0]) == a.read(order[0])
    assert b.cache.wait(60)
    gets = s3[0].stats()["gets"][before:]
    tars = [path.rsplit("/", 1)[1] for path, _ in gets if path.endswith(".tar")]
    assert tars[:3] == [f"shard-{k:06d}.tar" for k in (7, 4, 1)]
    assert sorted(tars) == sorted(b.shards)               # then the others, each once
    assert [byte_range for _, byte_range in gets] == [None] * len(gets)   # whole objects only
    assert [b.read(i) for i in order] == [a.read(i) for i in order]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_shard_order_from_an_empty_cache_reads_the_local_packs_batches(packs, tmp_path, backend):
    """data.shuffle=shards, rank 1 of 2 with a DataLoader worker / DALI's feed, epoch 1 resumed
    at batch 1, the shard cache empty at the start: the local pack's batches, every shard in
    the cache at the end."""
    _, local, url = packs
    got = []
    for root, cache in ((local, None), (url, tmp_path / "cache")):
        cfg = DataConfig(root=str(root), backend=backend, image_size=32, val_resize=36,
                         workers=1, read_ahead=16, shuffle="shards", shuffle_shards=2,
                         shard_cache=cache and str(cache))
        with build_loader(cfg, LoaderSpec("train", batch_size=4, rank=1, world_size=2,
                                          seed=3)) as loader:
            loader.set_epoch(1, 1)
            got.append(list(loader))
            samples = loader.samples if backend == "dali" else loader.dataset.samples
    assert samples.cache.wait(60)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.tar")) == \
        sorted(f"{h}.tar" for h in samples.sha256)
    assert len(got[0]) == len(got[1]) == 5
    for (a, la), (b, lb) in zip(*got):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("case", ["no credentials", "unknown bucket", "not a pack", "denied"])
def test_a_data_root_that_cannot_be_read_is_one_line_before_training(packs, s3, case, tmp_path):
    env, root = dict(s3[1]), "s3://data/pack"
    if case == "no credentials":
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    root = {"unknown bucket": "s3://nope/pack", "not a pack": "s3://data/elsewhere"}.get(case, root)
    if case == "denied":
        s3[0].set_faults([{"method": "GET", "key": "pack.json", "action": "denied"}])
    expected = {"no credentials": "no AWS credentials", "unknown bucket": "the bucket nope does not exist",
                "not a pack": "is not a pack: no s3://data/elsewhere/pack.json",
                "denied": "access denied (AccessDenied)"}[case]
    with using_env(env):
        proc = cli_in_process(["--config", "configs/quickstart.yaml",
                               *base_overrides(root, tmp_path / "run")])
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0] and root in errors[0], proc.stderr
    assert "testing-secret-key" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()                       # before the run starts


# ---------------------------------------------------------------- object_store's edges
def test_a_download_cut_off_for_good_is_one_line_and_the_cache_goes_on(packs, s3, tmp_path):
    """boto3's transfer manager raises its own RetriesExceededError (no OSError): one line, EIO,
    and the shard cache's downloader goes on to the other shards."""
    _, _, url = packs
    cut_for_good(s3, 1)
    with pytest.raises(object_store.ObjectStoreError) as failed:
        object_store.download(f"{url}/train/shard-000001.tar", tmp_path / "one.tar")
    assert failed.value.errno == errno.EIO and "\n" not in str(failed.value)
    assert failed.value.strerror.startswith(f"download {url}/train/shard-000001.tar: ")
    assert list(tmp_path.iterdir()) == []                         # no partial file left
    b = open_samples(url, "train", shard_cache=str(tmp_path / "cache"))
    b.read(0)                                                     # starts the downloads
    assert b.cache.wait(60)
    assert {p.name for p in (tmp_path / "cache").glob("*.tar")} == \
        {f"{h}.tar" for shard, h in enumerate(b.sha256) if shard != 1}


@pytest.fixture(scope="module")
def with_empty(s3, tmp_path_factory):
    """A small folder with a zero-byte image (train/class_1/empty.jpg), packed locally and to
    S3."""
    folder = make_folder(tmp_path_factory.mktemp("empty"), train_per_class=4, val_per_class=1)
    (folder / "train" / "class_1" / "empty.jpg").write_bytes(b"")
    local = folder.parent / "empty-pack"
    pack(str(folder), str(local), shard_mb=SHARD_MB, progress=False)
    pack(str(folder), "s3://data/empty", shard_mb=SHARD_MB, progress=False)
    return folder, local, "s3://data/empty"


def test_a_zero_byte_sample_is_one_bad_image_as_from_the_local_pack(with_empty, s3):
    _, local, url = with_empty
    a, b = load_pack(local, "train"), open_samples(url, "train")
    empty = [i for i in range(len(a)) if a.size[i] == 0]
    assert len(empty) == 1
    gets = s3[0].stats()["methods"].get("GET", 0)
    assert b.read(empty[0]) == b"" and s3[0].stats()["methods"].get("GET", 0) == gets  # no request
    assert [b.read(i) for i in range(len(b))] == [a.read(i) for i in range(len(a))]
    for root in (local, url):
        quarantine = Quarantine("train", limit=1, shard_limit=1)
        cfg = DataConfig(root=str(root), backend="torch", workers=0, read_ahead=8, image_size=32)
        with build_loader(cfg, LoaderSpec("train", batch_size=4, quarantine=quarantine)) as loader:
            loader.set_epoch(0)
            assert sum(len(labels) for _, labels in loader) == len(a) // 4 * 4
        assert list(quarantine.bad_images()) == empty and quarantine.bad_shards() == {}, root


def test_without_boto3_an_s3_url_is_one_line_naming_it(packs, monkeypatch, capsys):
    from pipelines.pack import main as pack_main
    from pipelines.s3_pack import s3_pack_problem
    for name in ("boto3", "botocore", "s3transfer"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(object_store, "_clients", {})
    hint = "needs boto3: pip install 'wrn-large[s3]'"
    with pytest.raises(object_store.ObjectStoreError, match=re.escape(f"s3://data/pack/pack.json {hint}")):
        object_store.read("s3://data/pack/pack.json")
    assert s3_pack_problem("s3://data/pack") == f"s3://data/pack/pack.json {hint}"
    assert pack_main([str(packs[0]), "s3://data/nowhere", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and hint in err and "Traceback" not in err, err


def test_a_child_forked_while_a_thread_holds_the_client_lock_gets_a_client(s3):
    """A DataLoader worker forked while the checkpoint writer or the shard cache's downloader
    is in ``client()`` (its lock held) must not block on that lock forever."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with object_store._clients_lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:                                                   # the child
        code = 1
        try:
            code = 0 if object_store.client() is not None else 1
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 15
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        release.set()
        thread.join()
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child blocked in object_store.client()")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_shard_object_gone_is_one_event(with_empty, s3, tmp_path):
    """A shard deleted mid-run (ENOENT): one shard event, not each of its samples a bad image."""
    folder, local, _ = with_empty
    url = "s3://data/gone"
    pack(str(folder), url, shard_mb=SHARD_MB, progress=False)
    a, b = load_pack(local, "train"), open_samples(url, "train")
    assert b.read(0) == a.read(0)
    object_store.delete(f"{url}/train/shard-000000.tar")
    quarantine = Quarantine("train", limit=1, shard_limit=1)   # the empty image + 1 would stop
    cfg = DataConfig(root=url, backend="torch", workers=0, read_ahead=8, image_size=32)
    with build_loader(cfg, LoaderSpec("train", batch_size=4, quarantine=quarantine)) as loader:
        loader.set_epoch(0)
        assert sum(len(labels) for _, labels in loader) == len(a) // 4 * 4
    assert list(quarantine.bad_shards()) == [f"{url}/train/shard-000000.tar"]
    assert "no such object" in quarantine.bad_shards()[f"{url}/train/shard-000000.tar"]
    assert set(quarantine.state()) == set(np.flatnonzero(a.shard == 0)) | set(quarantine.bad_images())


@pytest.mark.parametrize("case", ["denied", "no bucket"])
def test_denied_or_a_bucket_gone_is_fatal_and_quarantines_nothing(packs, s3, case):
    """Expired or refused credentials are no bad data: one line naming the URL, nothing set
    aside, whatever data.on_bad_image says."""
    from pipelines.read_guard import SourceUnusable
    _, _, url = packs
    samples = open_samples(url, "train")
    if case == "denied":
        s3[0].set_faults([{"method": "GET", "key": r"train/shard-000001\.tar", "action": "denied"}])
        expected = f"read {url}/train/shard-000001.tar: access denied (AccessDenied)"
    else:
        samples.root = "s3://gone/pack/train"
        expected = "read s3://gone/pack/train/shard-000001.tar: the bucket gone does not exist"
    first = int(np.flatnonzero(samples.shard == 1)[0])
    quarantine = Quarantine("train", limit=100, shard_limit=100).bind(samples)
    policy = BadImagePolicy(samples, quarantine, seed=0, drop_bad=False)
    with pytest.raises(SourceUnusable) as fatal:
        policy.resolve(first, 0, first, policy.read_one(first), lambda i, data: data)
    assert str(fatal.value).startswith(expected) and "\n" not in str(fatal.value)
    assert quarantine.state() == {}


def test_only_the_process_that_made_the_cache_downloads_and_partials_are_removed(packs, tmp_path):
    _, _, url = packs
    b = open_samples(url, "train")
    b.cache = ShardCache(str(tmp_path))
    pid = os.fork()
    if pid == 0:           # a forked DataLoader worker: reads what is there, starts no thread
        code = 1
        try:
            b.cache.holds(b.sha256[0], b)
            pickle.loads(pickle.dumps(b)).cache.holds(b.sha256[0], b)
            code = 0 if [t.name for t in threading.enumerate()] == ["MainThread"] and \
                b.cache._threads == [] else 3
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / f".{b.sha256[2]}.tar.part999999",                  # a killed process's
             tmp_path / f"..{b.sha256[2]}.tar.part999999.tmp999999.1"]
    for path in stale:
        path.write_bytes(b"partial")
    assert b.cache.fetch(b, 2) is True
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == \
        [f"{b.sha256[2]}.tar"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dali", "torch-shards"])
def test_a_two_process_run_from_s3_killed_mid_epoch_resumes_as_the_local_run(packs, s3, tmp_path,
                                                                             case):
    """torchrun, 2 processes: the DALI graph (global shuffle, a range GET per sample), or the
    torch backend with a DataLoader worker per rank in the shard order (data.shuffle=shards)
    from an empty shard cache. Uninterrupted from the local pack, then from S3 with its
    checkpoints in S3 (run.checkpoint_dir=s3://...), a worker SIGKILLed once a step after the
    first checkpoint is logged, restarted by torchrun from its newest checkpoint in S3 (step 4
    or 8, whichever the kill found): every step's loss equal (the order, partition and bytes
    of every batch)."""
    _, local, url = packs
    every = {"data.backend": "dali", "data.workers": 1, "run.checkpoint_every_steps": 4,
             "train.epochs": 2}
    from_s3 = {"run.checkpoint_dir": f"s3://data/ckpt-{case}"}
    if case == "torch-shards":
        every.update({"data.backend": "torch", "data.shuffle": "shards",
                      "data.shuffle_shards": 3})
        from_s3["data.shard_cache"] = str(tmp_path / "shard_cache")
    run_training(base_overrides(local, tmp_path / "local", **every), nproc=2)
    reference = step_losses(tmp_path / "local")
    out = tmp_path / "s3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=s3",
           str(REPO / "train_imagenet.py"), "--config", "configs/quickstart.yaml",
           *base_overrides(url, out, **every, **from_s3)]
    env = {**s3[1], "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while max(step_losses(out), default=0) < 5 if (out / "metrics.jsonl").exists() else True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        assert workers.stdout.split(), f"no worker left to kill at step {max(step_losses(out))}"
        os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)
        log = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    resumed = re.findall(r"resumed from (s3://data/ckpt-\S*step_0*(\d+)\.pt)", log)
    assert len(resumed) == 1 and int(resumed[0][1]) in (4, 8), log[-4000:]   # not a local copy
    got = step_losses(out)
    assert sorted(got) == sorted(reference) == list(range(1, 13))
    assert got == reference
    if case == "torch-shards":     # the node's cache holds the split, each shard verified
        with np.load(local / "train" / "index.npz") as z:
            train = {f"{h}.tar" for h in z["sha256"]}
        assert train <= {p.name for p in (tmp_path / "shard_cache").glob("*.tar")}


def free_port() -> int:
    from trainer_utils import free_port as port
    return port()
