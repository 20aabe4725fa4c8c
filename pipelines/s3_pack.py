"""Packs in S3-compatible object storage: ``data.root=s3://bucket/prefix`` (the ``s3`` source of
``pipelines.sources``) and ``python -m pipelines pack DATA s3://bucket/prefix`` (``S3Destination``).

The objects are those of a local pack (``pack.py``): ``pack.json``, ``classes.tsv``,
``<split>/shard-NNNNNN.tar`` + ``.idx``, ``<split>/index.npz`` (with each shard's SHA-256).
Reading is the local pack's code (``pack.PackedSamples``: the same index, labels, order,
quarantine) with another byte source: sample i is one range GET of exactly its bytes
(``object_store.read``), many in flight through the loaders' read-ahead (``data.read_ahead``).
A shard whose reads still fail after every retry (boto3's, then ``read_guard.Retrying``'s), or
whose object is gone, is ``ShardUnreadable``: one event for the quarantine, its samples all set
aside at once and counted against ``data.max_bad_shards``. What says that nothing can be read
(credentials expired or refused, access denied, the bucket gone, no boto3) is no bad data:
``SourceUnusable``, fatal whatever ``data.on_bad_image`` says, nothing quarantined.

``data.shard_cache=DIR`` (a node-local folder): each process that opens the pack (a rank; not
its DataLoader or DALI workers, which read what is there) downloads its shards whole into DIR in
a background thread started when it opens the pack, one after another, each checked against the
SHA-256 recorded in ``index.npz`` (written to a temporary name, renamed when it verified), named
by that SHA-256 (``DIR/<sha256>.tar``: shared by every pack and prefix holding the same bytes,
never stale). A sample whose shard is in the cache is read from it (a positioned read), the
others by range GET. The ranks of a node share DIR: a shard is downloaded by whichever process
takes its lock file first (``fcntl.flock``), the others skip it and read it once it is there.
A download is written only under that lock: the partial files a killed process left are removed
under it before the next download of the shard. The downloads (``ShardCache.DOWNLOADS`` at a
time) start at the loader's first plan (``S3PackedSamples.plan``, called by its ``set_epoch``:
the shards in the order of their first read, then the others) or the first read, whichever
comes first; a read of a shard that a process of the node is downloading waits for it (up to
``ShardCache.ARRIVAL_WAIT_S``). With ``data.shuffle=shards`` (``base.train_permutation``) the
reads need a few shards at a time, in the plan's order, so the downloads run ahead of the reads
and no sample is a request of its own.
Nothing is evicted: DIR must hold the split (ImageNet's train: ~140 GB).
"""
from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from . import object_store
from .object_store import ObjectStoreError
from .object_store import file_sha256
from .pack import (INDEX, PACK_JSON, PackedSamples, index_layout, manifest_problem, parse_idx,
                   register_destination)
from .read_guard import ShardUnreadable, SourceUnusable

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- reading
class S3PackedSamples(PackedSamples):
    """A split of a pack in a bucket (the ``Samples`` interface): ``PackedSamples`` reading
    shards by range GET, or from the shard cache where the shard is there. ``root`` is the
    split's URL (``s3://bucket/prefix/train``). Picklable: the client and the cache's
    downloader are per process."""

    def __init__(self, root: str, shards, shard, offset, size, labels, classes,
                 sha256: list[str] | None = None, cache: "ShardCache | None" = None,
                 layout: str = "source"):
        super().__init__(root, shards, shard, offset, size, labels, classes, layout)
        self.sha256, self.cache = sha256, cache
        self._names: dict[int, dict[int, str]] = {}

    def location(self, shard: int) -> str:
        return f"{self.root}/{self.shards[shard]}"

    def local_path(self, shard: int) -> Path:
        return self.cache.path(self.sha256[shard])

    def read_range(self, shard: int, offset: int, size: int) -> bytes:
        if self.cache is not None and (self.cache.holds(self.sha256[shard], self)
                                       or self.cache.arrives(self.sha256[shard])):
            return super().read_range(shard, offset, size)
        try:
            return object_store.read(self.location(shard), offset, size)
        except ObjectStoreError as e:
            # EIO (transient: retried by read_guard.Retrying) or the shard object gone: one event
            if e.errno == errno.EIO or object_store.no_such_object(e):
                raise ShardUnreadable(self.location(shard), e.strerror, e.errno) from None
            raise SourceUnusable(e.strerror) from None     # credentials, permission, bucket

    def plan(self, order: list[int]) -> None:
        """This process reads ``order`` next (the loader's ``set_epoch``): the shard cache
        downloads the shards in the order of their first read."""
        if self.cache is not None:
            shards = np.asarray(self.shard)[np.asarray(order, dtype=np.int64)]
            _, first = np.unique(shards, return_index=True)
            self.cache.plan(self, shards[np.sort(first)].tolist())

    def member_name(self, shard: int, offset: int) -> str:
        """From the shard's ``.idx`` (one GET per shard and process, kept): no read of the
        shard itself, which may be the one that cannot be read."""
        names = self._names.get(shard)
        if names is None:
            text = object_store.read(self.location(shard)[:-len(".tar")] + ".idx").decode()
            fields = (line.split() for line in text.splitlines()[1:])
            names = self._names[shard] = {int(f[1]): f[3] for f in fields}
        return names[offset]

    def __getstate__(self):
        return {**super().__getstate__(), "_names": {}}


def open_s3_pack(root: str, split: str, file_list: str | None = None,
                 shard_cache: str | None = None, **_) -> S3PackedSamples:
    """The ``s3`` source of ``pipelines.sources``: a split of the pack at ``root``."""
    if file_list:
        raise ValueError(f"data.file_list does not apply to the pack {root}: pack the clean "
                         f"list instead (python -m pipelines pack DATA_DIR {root} --file-list ...)")
    url = object_store.parse(root).join(split)
    try:
        data = object_store.read(url.join(INDEX))
    except ObjectStoreError as e:
        if object_store.no_such_object(e):
            raise FileNotFoundError(f"{url.join(INDEX)} is missing: {root} is a partial pack (run "
                                    f"`python -m pipelines pack` again to finish it)") from None
        raise
    with np.load(io.BytesIO(data)) as z:
        sha256 = [str(s) for s in z["sha256"]] if "sha256" in z.files else None
        samples = S3PackedSamples(str(url), [str(s) for s in z["shards"]], z["shard"],
                                  z["offset"], z["size"], z["label"].tolist(),
                                  [str(c) for c in z["classes"]], sha256,
                                  layout=index_layout(z))
    if shard_cache:
        if sha256 is None:
            log.warning("data.shard_cache is not used for %s: its index.npz records no SHA-256 "
                        "of its shards to check downloads against (pack it again)", url)
        else:
            samples.cache = ShardCache(shard_cache)   # downloads from the first plan or read
    return samples


def s3_pack_problem(root: str) -> str | None:
    """One probe read of ``pack.json``: what stops ``root`` from being read as a pack (no
    credentials, no such bucket, access denied, not a pack), in one line naming the URL."""
    url = object_store.parse(root).join(PACK_JSON)
    try:
        text = object_store.read(url).decode()
    except ObjectStoreError as e:
        if object_store.no_such_object(e):
            return f"{root} is not a pack: no {url} (write one with python -m pipelines pack)"
        return e.strerror
    except ValueError as e:      # a malformed URL
        return str(e)
    return manifest_problem(url, text)


# ---------------------------------------------------------------- the shard cache
class ShardCache:
    """``data.shard_cache``: whole shards in a node-local folder, named by their SHA-256 (see
    the module's docstring). ``holds`` says whether a shard is there; ``plan`` sets the order
    of the downloads (the order of first reads; every shard of the split in the end) and
    starts the downloaders (``DOWNLOADS`` threads), in the process that made the cache only
    (never in a DataLoader or DALI worker, forked or unpickled: a worker killed mid-download
    would leave its partial file, and each would download the same shards); ``arrives`` waits
    for a shard being downloaded on this node; ``wait`` blocks until the downloads are done."""

    DOWNLOADS = 4                  # shards of the split downloaded at once
    # longest wait of a read for a shard being downloaded (then range GETs, and no more waits
    # for that shard); below data.read_timeout_s's default (60), which would count it as hung
    ARRIVAL_WAIT_S = 20.0

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self._known: set[str] = set()
        self._late: set[str] = set()          # shards a read waited for in vain
        self._owner, self._threads, self._active, self._planned = os.getpid(), [], 0, False
        self._todo: list[int] = []
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.tar"

    def holds(self, sha256: str, samples: S3PackedSamples) -> bool:
        self.start(samples)
        if sha256 in self._known:
            return True
        if self.path(sha256).is_file():
            self._known.add(sha256)
            return True
        return False

    def start(self, samples: S3PackedSamples) -> None:
        """The downloads of ``samples``' shards in shard order, unless planned already (a
        read before any loader planned: the samples used on their own)."""
        if not self._planned and os.getpid() == self._owner:
            self.plan(samples, [])

    def plan(self, samples: S3PackedSamples, first: list[int]) -> None:
        """Download ``first`` in this order, then the split's other shards; in the process
        that made the cache only. Downloads in flight finish; the next ones follow this plan."""
        if os.getpid() != self._owner:
            return
        seen = set(first)
        todo = list(first) + [k for k in range(len(samples.shards)) if k not in seen]
        with self._lock:
            self._todo, self._planned = todo, True
            self._threads = [t for t in self._threads if t.is_alive()]
            while self._active < self.DOWNLOADS:
                self._active += 1
                thread = threading.Thread(target=self.fill, args=(samples,), daemon=True,
                                          name="shard-cache")
                self._threads.append(thread)
                thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether this process's downloads have finished (waiting up to ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._planned and not any(t.is_alive() for t in self._threads)

    def fill(self, samples: S3PackedSamples) -> None:
        """Downloads from the planned list, first come first taken; a shard that another
        process is downloading is put back at the end and looked at again after the others."""
        self.folder.mkdir(parents=True, exist_ok=True)
        busy_in_a_row = 0
        while True:
            with self._lock:
                if not self._todo:
                    self._active -= 1      # under the lock: a plan() now starts another
                    return
                shard = self._todo.pop(0)
            if self.fetch(samples, shard) is None:
                with self._lock:
                    self._todo.append(shard)
                    busy_in_a_row += 1
                    all_busy = busy_in_a_row >= len(self._todo)
                if all_busy:
                    threading.Event().wait(0.5)   # all held by other processes: theirs soon
                    busy_in_a_row = 0
            else:
                busy_in_a_row = 0

    def arrives(self, sha256: str) -> bool:
        """Whether the shard is being downloaded on this node (any process holds its lock)
        and is there once that download ends (waiting up to ``ARRIVAL_WAIT_S``): a read waits
        for it rather than asking the bucket for the same bytes once more."""
        if sha256 in self._late:
            return False
        deadline = time.monotonic() + self.ARRIVAL_WAIT_S
        while time.monotonic() < deadline:
            if self.path(sha256).is_file():
                self._known.add(sha256)
                return True
            if not self.downloading(sha256):
                return self.path(sha256).is_file()
            time.sleep(0.02)
        self._late.add(sha256)
        return False

    def downloading(self, sha256: str) -> bool:
        try:
            fd = os.open(self.folder / f".{sha256}.lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)             # (closing drops a shared lock it took)

    def fetch(self, samples: S3PackedSamples, shard: int) -> bool | None:
        """Shard ``shard`` into the cache: True once it is there, None while another process
        holds its lock, False if it failed (logged; its samples are read by range GET)."""
        sha256 = samples.sha256[shard]
        final = self.path(sha256)
        if final.is_file():
            return True
        with open(self.folder / f".{sha256}.lock", "w") as lock:
            if not take_lock(lock):
                return None
            if final.is_file():
                return True
            self.remove_partials(sha256)
            return self.download(samples.location(shard), sha256, final)

    def remove_partials(self, sha256: str) -> None:
        """The partial files of a download of this shard that a killed process left (ours:
        ``.<sha256>.tar.part<pid>``, object_store.download's inside it). Called under the
        shard's lock, which every download holds: no partial file is being written."""
        for stale in self.folder.glob(f".*{sha256}.tar.part*"):
            stale.unlink(missing_ok=True)

    def download(self, url: str, sha256: str, final: Path) -> bool:
        tmp = final.with_name(f".{final.name}.part{os.getpid()}")
        try:
            object_store.download(url, tmp)
            found = file_sha256(tmp)
            if found != sha256:
                raise ObjectStoreError(errno.EIO, f"download {url}: SHA-256 {found[:16]}..., the "
                                                  f"pack's index records {sha256[:16]}...")
            os.replace(tmp, final)
            return True
        except OSError as e:
            log.warning("data.shard_cache: %s (its samples are read from the bucket)", e)
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def __getstate__(self):   # a worker process reads what is there, never downloads
        return {"folder": self.folder, "_known": set(), "_late": set(), "_owner": self._owner,
                "_threads": [], "_active": 0, "_planned": False, "_todo": []}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


def take_lock(file, tries: int = 3) -> bool:
    """An exclusive lock on ``file`` without blocking; a few tries, as a reader's probe
    (``ShardCache.downloading``) holds a shared one for an instant."""
    for attempt in range(tries):
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.005)
    return False


# ---------------------------------------------------------------- writing
class S3Destination:
    """``pack``'s destination for an ``s3://`` URL: each shard staged in a local temporary
    folder, uploaded (its SHA-256 computed first, the object read back and checked:
    ``object_store.upload``), its ``.idx`` uploaded after it (a shard with its ``.idx`` is
    complete: a resumed pack skips it), the staged files removed; ``index.npz`` last."""

    def __init__(self, url: str):
        self.url = object_store.parse(url)
        self.stage = Path(tempfile.mkdtemp(prefix="pack-s3-"))

    def __str__(self) -> str:
        return str(self.url)

    def staging(self, split: str) -> Path:
        return self.stage / split

    def read_text(self, name: str) -> str | None:
        try:
            return object_store.read(self.url.join(name)).decode()
        except ObjectStoreError as e:
            if object_store.no_such_object(e):
                return None
            raise

    def write_text(self, name: str, text: str) -> None:
        object_store.write(self.url.join(name), text.encode())

    def holds_anything(self) -> bool:
        return next(iter(object_store.listing(self.url)), None) is not None

    def prepare(self) -> None:
        pass

    def complete_shard(self, split: str, name: str) -> tuple[list, str] | None:
        tar = self.url.join(split, name)
        idx = self.url.join(split, name[:-len(".tar")] + ".idx")
        text = self.read_text(f"{split}/{name[:-len('.tar')]}.idx")
        if text is None:
            return None
        digest = object_store.recorded_sha256(tar) or object_store.sha256_of(tar)
        return parse_idx(text, idx), digest

    def publish_shard(self, split: str, tar: Path) -> str:
        idx = tar.with_suffix(".idx")
        digest = object_store.upload(tar, self.url.join(split, tar.name))
        object_store.upload(idx, self.url.join(split, idx.name))
        tar.unlink()
        idx.unlink()
        return digest

    def publish(self, name: str, path: Path) -> None:
        object_store.upload(path, self.url.join(name))
        path.unlink()

    def close(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


register_destination("s3", S3Destination)
