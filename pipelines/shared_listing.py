"""A listing that worker processes share instead of receiving it whole.

DataLoader workers started from a fork server (a rank of a distributed job,
``torch_backend.worker_start``) receive their data set pickled, every epoch: ImageNet's 1.28M
relative paths are ~60 MB of pickle per worker per epoch, and then a private copy of 1.28M
Python strings in each. Pickled here, a long listing is written once to a memory-mapped file
(``/dev/shm`` where there is one) and a worker receives its path: the pages are shared by the
rank and its workers, and a path is decoded only when its sample is read. A copy goes with its
listing; those of processes that died without cleaning up are removed by the next one made.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PREFIX = "wrn_listing_"   # + the creating process's pid
SHARE_FROM = 10_000   # shorter listings are pickled as they are: a few hundred KB at most


class MappedStrings(Sequence):
    """An immutable sequence of str over two memory-mapped arrays (UTF-8 bytes, offsets)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._blob = np.load(os.path.join(folder, "blob.npy"), mmap_mode="r")
        self._offsets = np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self._blob[self._offsets[i]:self._offsets[i + 1]]).decode()

    def __reduce__(self):
        return MappedStrings, (self.folder,)


class MappedInts(Sequence):
    def __init__(self, folder: str):
        self.folder = folder
        self._values = np.load(os.path.join(folder, "labels.npy"), mmap_mode="r")

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [int(v) for v in self._values[i]]
        return int(self._values[i])

    def __reduce__(self):
        return MappedInts, (self.folder,)


def share(owner, files: Sequence[str], labels: Sequence[int]) -> tuple[Sequence, Sequence]:
    """(files, labels) as sequences that pickle as a path: written once per ``owner``, removed
    when ``owner`` is collected (or the process exits)."""
    if isinstance(files, MappedStrings) or len(files) < SHARE_FROM:
        return files, labels
    folder = getattr(owner, "_shared_folder", None)
    if folder is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        sweep(base or tempfile.gettempdir())
        folder = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}_", dir=base)
        encoded = [f.encode() for f in files]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        np.save(Path(folder) / "blob.npy", np.frombuffer(b"".join(encoded), np.uint8))
        np.save(Path(folder) / "offsets.npy", offsets)
        np.save(Path(folder) / "labels.npy", np.asarray(labels, np.int64))
        weakref.finalize(owner, remove, folder, os.getpid())
        owner._shared_folder = folder
    return MappedStrings(folder), MappedInts(folder)


def remove(folder: str, creator: int) -> None:
    if os.getpid() == creator:   # not a forked child that happened to collect its copy
        shutil.rmtree(folder, ignore_errors=True)


def sweep(base: str) -> None:
    """Remove the copies of processes that are gone: a rank that ended by ``os._exit`` (a hang's
    exit code 75) or SIGKILL never ran its finalizer, and /dev/shm is memory."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid = name[len(PREFIX):].split("_", 1)[0]
        if name.startswith(PREFIX) and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True
