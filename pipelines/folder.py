"""ImageNet-layout folders (``root/<split>/<class>/<image>``) and file lists, indexed exactly as
torchvision's ImageFolder: classes sorted by name, label = position in that order.

Listing 1.28M files is minutes of metadata round trips on a cold parallel file system, paid by
every rank of every job. So the listing is cached (``data.listing_cache``): one process walks
the folder and writes the listing under a lock; every later start, on any rank, checks it by
stat-ing the directories it walked (a directory's mtime changes when an entry is added, removed
or renamed in it), a thousand stats in parallel instead of a walk.

This is the ``folder`` source of ``pipelines.sources`` (a file list is the folder read through
the list); ``open_samples`` there picks it for a local root that is not a pack.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .read_guard import reading
from .shared_listing import share

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LISTING_VERSION = 1
URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
STAT_THREADS = 32  # metadata round trips in flight when checking a cached listing


@dataclass
class Samples:
    """A data set's samples by index: ``read(i)`` gives sample i's encoded bytes."""

    root: Path                     # the split folder
    files: list[str]               # paths relative to root
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> bytes:
        path = self.root / self.files[index]
        with reading(path), open(path, "rb", buffering=0) as f:
            return f.read()

    def describe(self, index: int) -> str:
        """Sample ``index`` as a user finds it: here, its path."""
        return str(self.root / self.files[index])

    def __getstate__(self):
        """A long listing travels to worker processes as the path of a shared, memory-mapped
        copy (``pipelines.shared_listing``), not as a million strings each epoch."""
        files, labels = share(self, self.files, self.labels)
        state = {k: v for k, v in self.__dict__.items() if k != "_shared_folder"}
        return {**state, "files": files, "labels": labels}


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/train`` for split train, ``root/val`` for val (``root`` itself if it has no such
    subfolder but holds class folders, for a single-split set)."""
    path = Path(root) / split
    if path.is_dir():
        return path
    raise FileNotFoundError(f"{path} does not exist: an ImageNet-layout data set needs "
                            f"{Path(root)}/train/<class>/*.JPEG and {Path(root)}/val/<class>/*.JPEG")


def class_folders(folder: Path) -> list[str]:
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders")
    return classes


def walk_folder(folder: Path) -> tuple[Samples, dict[str, int]]:
    """The samples, and the mtime of every directory walked (read before it is listed, so a
    change during the walk shows as a stale mtime next time)."""
    mtimes = {".": os.stat(folder).st_mtime_ns}
    classes = class_folders(folder)
    files, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(folder / name, followlinks=True)):
            mtimes[os.path.relpath(dirpath, folder)] = os.stat(dirpath).st_mtime_ns
            for file in sorted(names):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dirpath, file), folder))
                    labels.append(label)
    if not files:
        raise FileNotFoundError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Samples(folder, files, labels, classes), mtimes


def scan_folder(folder: Path) -> Samples:
    return walk_folder(folder)[0]


# ---------------------------------------------------------------- the listing cache
def listing_cache_dir(setting: str) -> Path | None:
    """``data.listing_cache``: auto ($XDG_CACHE_HOME or ~/.cache, /wrn_large/listings), off, or
    a folder."""
    if setting == "off":
        return None
    if setting == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "wrn_large" / "listings"
    return Path(setting).expanduser()


def unchanged(folder: Path, mtimes: dict[str, int]) -> bool:
    def same(item):
        try:
            return os.stat(folder / item[0]).st_mtime_ns == item[1]
        except OSError:
            return False
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        return all(pool.map(same, mtimes.items()))


def read_listing(path: Path, folder: Path) -> Samples | None:
    try:
        listing = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if listing.get("version") != LISTING_VERSION or listing.get("folder") != str(folder):
        return None
    if not unchanged(folder, listing["mtimes"]):
        return None
    return Samples(folder, listing["files"], listing["labels"], listing["classes"])


def write_listing(path: Path, folder: Path, samples: Samples, mtimes: dict[str, int]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": LISTING_VERSION, "folder": str(folder),
                               "mtimes": mtimes, "classes": samples.classes,
                               "files": samples.files, "labels": samples.labels}))
    os.replace(tmp, path)


def listed_folder(folder: Path, cache_setting: str = "auto") -> Samples:
    """``scan_folder`` through the listing cache: the first process walks, the others wait for
    its listing and check it."""
    cache_dir = listing_cache_dir(cache_setting)
    if cache_dir is None:
        return scan_folder(folder)
    folder = folder.absolute()
    path = cache_dir / (hashlib.sha256(str(folder).encode()).hexdigest()[:32] + ".json")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError as e:
        log.warning("data.listing_cache: cannot write %s (%s); listing %s without a cache",
                    cache_dir, e, folder)
        return scan_folder(folder)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one walker; the others then read its listing
        samples = read_listing(path, folder)
        if samples is None:
            samples, mtimes = walk_folder(folder)
            try:
                write_listing(path, folder, samples, mtimes)
            except OSError as e:
                log.warning("data.listing_cache: cannot write %s (%s)", path, e)
    return samples


# ---------------------------------------------------------------- file lists, and the folder source
def read_file_list(path: str | os.PathLike, folder: Path, classes: list[str]) -> Samples:
    """A list written by ``python -m pipelines verify``: ``relative/path label`` per line
    (DALI's readers.file format), relative to the split folder."""
    files, labels = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            file, label = line.rsplit(maxsplit=1)
            labels.append(int(label))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'relative/path label', got {line!r}") from None
        files.append(file)
    return Samples(folder, files, labels, classes)


def url_scheme(root) -> str | None:
    """``s3`` for ``s3://bucket/key``, None for a local path: a URL is never a local path (the
    ``pipelines.sources`` registry picks the source that owns the scheme, if any)."""
    match = URL.match(str(root)) if root is not None else None
    return match.group(1).lower() if match else None


def folder_problem(root) -> str | None:
    """What stops ``root`` from being read as a local folder, or None (without listing it)."""
    return None if os.path.isdir(root) else f"data.root={root} is a file, not a folder"


def open_folder(root: str | os.PathLike, split: str, file_list: str | None = None,
                listing_cache: str = "auto", pinned: Path | None = None, **_) -> Samples:
    """A split's samples from the folder, or through a file list (``data.file_list``).

    ``pinned``: where a run keeps the folder listing its first start used (the trainer's
    ``RUN_DIR/listings/<split>.json``): a resumed run reads the same samples in the same order
    even where files were deleted or added since (a deleted one is then a bad image), so the
    epoch's permutation, and the run, replay exactly."""
    if url_scheme(root):
        raise ValueError(f"{root} is a URL, not a folder (pipelines.sources.open_samples picks "
                         f"the source of a URL)")
    folder = split_dir(root, split)
    if file_list:
        listed = Path(str(file_list).replace("{split}", split))
        return read_file_list(listed, folder, class_folders(folder))
    if pinned is not None and pinned.is_file():
        listing = json.loads(pinned.read_text())
        if listing.get("folder") == str(folder.absolute()):
            return Samples(folder.absolute(), listing["files"], listing["labels"],
                           listing["classes"])
        log.warning("%s lists %s, not %s: listing the folder anew", pinned, listing.get("folder"),
                    folder.absolute())
    samples = listed_folder(folder, listing_cache)
    if pinned is not None:
        pinned.parent.mkdir(parents=True, exist_ok=True)
        write_listing(pinned, samples.root, samples, {})
    return samples
