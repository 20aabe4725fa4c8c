"""Packed data sets for parallel file systems: ``python -m pipelines pack DATA_DIR OUT``.

A folder of 1.28M JPEGs costs 1.28M opens per epoch, each a metadata round trip on NFS, Lustre
or GPFS. A pack holds the same files in a few hundred tar shards in the WebDataset convention,
so an epoch costs a few hundred opens and positioned reads::

    OUT/pack.json                      what was packed (source, sample count and digest per split)
    OUT/classes.tsv                    class names in label order (as prepare-imagenet writes)
    OUT/train/shard-000000.tar         KEY.jpg (the original file's bytes) + KEY.cls (label text)
    OUT/train/shard-000000.idx         member offsets, the format of DALI's wds2idx
    OUT/train/index.npz                per sample: shard, offset, size, label (written last)
    OUT/val/...

KEY is the file's path relative to the split folder without its extension (dots in the name
become ``_``: WebDataset splits a member name at the first dot of its base name). Samples keep
the source's order (ImageFolder's, or the clean list's) as their index, so sample i of the pack
is sample i of the folder, and the same seed trains the same run from either. Where they lie is
the layout: ``mixed`` (the default) writes them to the shards in a fixed random order, so each
shard holds every class in proportion (what ``data.shuffle=shards`` and WebDataset's shard
shuffles need: a shard of the folder's order holds one or two classes); ``--layout source``
writes them in index order. DALI's
``fn.readers.webdataset`` and the ``webdataset`` library read the shards as they are; our
loaders read ``data.root=OUT`` by sample index through ``index.npz``.

Packing is resumable: shards are written to a temporary name and renamed when complete, and a
re-run continues after the last complete shard. A partial input (a split or a class without
images, a listed file that is missing) is refused before anything is written, and so is an OUT
that holds a pack of another input.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import posixpath
import sys
import stat
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .class_names import CLASSES_TSV, read_classes_tsv, write_classes_tsv
from .folder import open_folder, url_scheme
from .object_store import file_sha256
from .read_ahead import ReadAhead
from .read_guard import reading

PACK_JSON = "pack.json"
INDEX = "index.npz"
FORMAT = 1
SHARD_MB = 256
LAYOUTS = ("mixed", "source")
LAYOUT_SEED = 0x5EED    # the mixed layout's order: fixed, so one input always packs the same
SPLITS = ("train", "val")


class PackError(ValueError):
    pass


def is_pack(root) -> bool:
    return root is not None and (Path(root) / PACK_JSON).is_file()


# ---------------------------------------------------------------- reading
@dataclass
class PackedSamples:
    """A packed split's samples by index (the ``Samples`` interface): ``read(i)`` is one
    positioned read into an open shard."""

    root: Path                     # OUT/<split>
    shards: list[str]
    shard: np.ndarray              # per sample: shard number, data offset, size
    offset: np.ndarray
    size: np.ndarray
    labels: list[int]
    classes: list[str]
    layout: str = "source"         # how samples lie in the shards (pack's --layout)
    _fds: dict = field(default_factory=dict, repr=False)
    _pid: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def _fd(self, shard: int) -> int:
        with self._lock:
            if self._pid != os.getpid():  # descriptors are per process (DataLoader workers)
                self._fds, self._pid = {}, os.getpid()
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(self.local_path(shard), os.O_RDONLY)
            return fd

    def read(self, index: int) -> bytes:
        size, shard, offset = int(self.size[index]), int(self.shard[index]), int(self.offset[index])
        with reading(f"{self.location(shard)} (sample {index}, byte {offset})"):
            data = self.read_range(shard, offset, size)
        if len(data) != size:
            raise OSError(f"{self.describe(index)}: shard ends {size - len(data)} bytes short")
        return data

    # the byte source: a subclass reads the same shards elsewhere (s3_pack: range requests)
    def location(self, shard: int) -> str:
        """Where shard ``shard`` is, as messages name it."""
        return str(self.root / self.shards[shard])

    def local_path(self, shard: int) -> Path:
        return self.root / self.shards[shard]

    def read_range(self, shard: int, offset: int, size: int) -> bytes:
        return os.pread(self._fd(shard), size, offset)

    def member_name(self, shard: int, offset: int) -> str:
        """The tar member whose data starts at ``offset`` (from its header)."""
        header = self.read_range(shard, offset - 512, 512)
        return tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name

    def shard_members(self, index: int) -> list[int]:
        """The samples held by the shard that holds sample ``index``."""
        return np.flatnonzero(self.shard == self.shard[index]).tolist()

    def describe(self, index: int) -> str:
        """``OUT/train/shard-000003.tar:KEY.jpg``, the member name read from its tar header."""
        shard, offset = int(self.shard[index]), int(self.offset[index])
        try:
            name = self.member_name(shard, offset)
        except (OSError, tarfile.TarError):
            name = f"sample {index} at offset {offset}"
        return f"{self.location(shard)}:{name}"

    def __getstate__(self):  # picklable for worker processes: descriptors are reopened there
        state = dict(self.__dict__)
        state.update(_fds={}, _pid=0, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


def open_pack(root, split: str, file_list: str | None = None, **_) -> PackedSamples:
    """The ``pack`` source of ``pipelines.sources``: a split of the pack (the folder source's
    options, listing cache and pinned listing, do not apply: a pack's order is fixed)."""
    if file_list:
        raise ValueError(f"data.file_list does not apply to the pack {root}: pack the clean "
                         f"list instead (python -m pipelines pack DATA_DIR OUT --file-list ...)")
    return load_pack(root, split)


def pack_problem(root) -> str | None:
    """What stops ``root``'s ``pack.json`` from being read as a pack of this format, or None."""
    try:
        text = (Path(root) / PACK_JSON).read_text()
    except OSError as e:
        return f"{Path(root) / PACK_JSON} cannot be read as a pack's manifest: {e}"
    return manifest_problem(Path(root) / PACK_JSON, text)


def manifest_problem(where, text: str) -> str | None:
    """What stops ``text``, the manifest read from ``where``, from being a pack of this format."""
    try:
        manifest = json.loads(text)
    except ValueError as e:
        return f"{where} cannot be read as a pack's manifest: {e}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return (f"{where} is of pack format {found!r}, this version "
                f"reads {FORMAT}: pack the data again (python -m pipelines pack)")
    return None


def load_pack(root, split: str) -> PackedSamples:
    folder = Path(root) / split
    index = folder / INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing: {root} is a partial pack (run "
                                f"`python -m pipelines pack` again to finish it)")
    with np.load(index) as z:
        return PackedSamples(folder, [str(s) for s in z["shards"]], z["shard"], z["offset"],
                             z["size"], z["label"].tolist(), [str(c) for c in z["classes"]],
                             index_layout(z))


def index_layout(z) -> str:
    """The layout an ``index.npz`` records (one written before layouts: ``source``)."""
    return str(z["layout"]) if "layout" in z.files else "source"


def layout_order(layout: str, num_samples: int) -> np.ndarray:
    """The sample indices in the order ``layout`` writes them to the shards. The mixed order
    sorts the indices by a hash of their own (splitmix64, integer arithmetic): the same for
    every numpy version, as a resumed pack must find the shards its first run wrote where
    this order puts them (a random generator's stream may change between versions)."""
    if layout == "source":
        return np.arange(num_samples)
    u64 = np.uint64
    with np.errstate(over="ignore"):
        z = np.arange(num_samples, dtype=u64) + u64(LAYOUT_SEED) * u64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
        z ^= z >> u64(31)
    return np.argsort(z, kind="stable")


# ---------------------------------------------------------------- writing
def sample_key(rel: str) -> str:
    stem = os.path.splitext(rel.replace(os.sep, "/"))[0]
    head, base = posixpath.split(stem)
    return posixpath.join(head, base.replace(".", "_"))


def image_extension(rel: str) -> str:
    ext = os.path.splitext(rel)[1].lower().lstrip(".")
    return "jpg" if ext in ("jpg", "jpeg") else ext


def samples_digest(samples) -> str:
    h = hashlib.sha256()
    for rel, label in zip(samples.files, samples.labels):
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def check_input(samples, split: str) -> np.ndarray:
    """Refuse what a pack could not hold, before anything is written; each file's size (one
    stat per file, a metadata round trip on a parallel file system: the plan reuses it)."""
    keys, counts = set(), np.bincount(samples.labels, minlength=len(samples.classes))
    empty = [c for c, n in zip(samples.classes, counts) if n == 0]
    if empty:
        raise PackError(f"{samples.root}: class folder(s) without images: {', '.join(empty[:5])}")
    for rel in samples.files:
        key = sample_key(rel)
        if any(c.isspace() for c in key):
            raise PackError(f"{samples.root / rel}: whitespace in a name, which index files "
                            f"(space-separated) cannot hold")
        if key in keys:
            raise PackError(f"{samples.root / rel}: two files pack to the key {key!r}")
        keys.add(key)
        try:
            tarfile.TarInfo(key + ".jpeg").tobuf(tarfile.USTAR_FORMAT)
        except ValueError as e:
            raise PackError(f"{samples.root / rel}: {e} for a tar member name") from None
    sizes = np.fromiter(ReadAhead(lambda i: file_size(samples.root / samples.files[i]), 32)(
        range(len(samples))), np.int64, len(samples))
    missing = [samples.files[i] for i in np.flatnonzero(sizes < 0)]
    if missing:
        raise PackError(f"{len(missing)} listed file(s) missing in {samples.root} "
                        f"(e.g. {', '.join(missing[:3])})")
    return sizes


def file_size(path: Path) -> int:
    """The size of the regular file ``path``; -1 if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)  # reproducible: no owner, time or permissions of the source
    info.size, info.mode, info.mtime = size, 0o444, 0
    return info


def write_shard(path: Path, samples, indices: list[int], reader: ReadAhead) -> list[tuple]:
    """The shard's tar and .idx; returns (offset, size, label) per sample."""
    rows, lines = [], []
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, data in zip(indices, reader(indices)):
            key, label = sample_key(samples.files[i]), int(samples.labels[i])
            image = f"{key}.{image_extension(samples.files[i])}"
            tar.addfile(member(image, len(data)), io.BytesIO(data))
            offset = tar.offset - -(-len(data) // 512) * 512
            cls = str(label).encode()
            tar.addfile(member(f"{key}.cls", len(cls)), io.BytesIO(cls))
            cls_offset = tar.offset - 512
            rows.append((offset, len(data), label))
            ext = image.rsplit(".", 1)[1]
            lines.append(f"{ext} {offset} {len(data)} {image} cls {cls_offset} {len(cls)} {key}.cls")
    idx = path.with_suffix(".idx")
    idx_tmp = idx.with_name(idx.name + ".tmp")
    idx_tmp.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    os.replace(tmp, path)
    os.replace(idx_tmp, idx)  # last: a shard with its .idx is complete
    return rows


def read_idx(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of each sample's first member in a wds2idx index file."""
    return parse_idx(Path(path).read_text(), path)


def parse_idx(text: str, where) -> list[tuple[int, int]]:
    lines = text.splitlines()
    version, count = lines[0].split()
    if version != "v1.2" or int(count) != len(lines) - 1:
        raise PackError(f"{where}: not a v1.2 index of {count} samples")
    return [(int(f[1]), int(f[2])) for f in (line.split() for line in lines[1:])]


class LocalDestination:
    """Where ``pack`` writes: a local folder, written in place (shards under temporary names,
    renamed when complete). ``s3_pack.S3Destination`` is the same for a bucket: shards staged
    locally, then uploaded and checked. A shard with its ``.idx`` is complete."""

    def __init__(self, root: Path):
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def staging(self, split: str) -> Path:
        """The local folder a split's shards are written to before ``publish_shard``."""
        return self.root / split

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        (self.root / name).write_text(text)

    def holds_anything(self) -> bool:
        return self.root.exists() and any(self.root.iterdir())

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def complete_shard(self, split: str, name: str) -> tuple[list, str] | None:
        """(rows of its .idx, its SHA-256) of a shard complete from an earlier run, or None."""
        idx = (self.root / split / name).with_suffix(".idx")
        if not idx.is_file():
            return None
        return read_idx(idx), file_sha256(self.root / split / name)

    def publish_shard(self, split: str, tar: Path) -> str:
        """The shard written at ``tar`` (and its .idx beside it) made part of the pack; its
        SHA-256."""
        return file_sha256(tar)

    def publish(self, name: str, path: Path) -> None:
        """The finished local file ``path`` (in a staging folder) as the pack's ``name``."""
        os.replace(path, self.root / name)

    def close(self) -> None:
        pass


def pack_split(samples, sizes: np.ndarray, dest, split: str, shard_bytes: int,
               reader: ReadAhead, progress: bool, layout: str = "mixed") -> int:
    """The split's shards (those complete from an earlier run kept), the samples written in
    ``layout``'s order, then its ``index.npz`` with each shard's SHA-256 (what a shard cache
    checks its downloads against), last."""
    from tqdm import tqdm
    stage = dest.staging(split)
    stage.mkdir(parents=True, exist_ok=True)
    shard_of, offset, size = (np.zeros(len(samples), t) for t in (np.int32, np.int64, np.int64))
    shards, digests, start = [], [], 0
    order = layout_order(layout, len(samples))
    bar = tqdm(total=len(samples), desc=f"pack {split}", unit="img", disable=not progress,
               dynamic_ncols=True)
    while start < len(samples):
        name = f"shard-{len(shards):06d}.tar"
        done = dest.complete_shard(split, name)
        if done is not None:  # complete from an earlier run
            rows, digest = done
            stop = start + len(rows)
            members = order[start:stop]
            offset[members], size[members] = np.array(rows).T
        else:
            stop, total = start, 0
            while stop < len(samples) and (stop == start or total < shard_bytes):
                total += int(sizes[order[stop]]) + 1536
                stop += 1
            members = order[start:stop]
            rows = write_shard(stage / name, samples, members.tolist(), reader)
            offset[members], size[members] = np.array([r[:2] for r in rows]).T
            digest = dest.publish_shard(split, stage / name)
        shard_of[members] = len(shards)
        shards.append(name)
        digests.append(digest)
        bar.update(stop - start)
        start = stop
    bar.close()
    tmp = stage / (INDEX + ".tmp.npz")
    np.savez(tmp, shards=np.array(shards), shard=shard_of, offset=offset, size=size,
             label=np.array(samples.labels, np.int32), classes=np.array(samples.classes),
             sha256=np.array(digests), layout=np.array(layout))
    dest.publish(f"{split}/{INDEX}", tmp)
    return len(shards)


_destinations: dict = {}     # URL scheme -> the destination that writes it (s3: s3_pack)


def register_destination(scheme: str, make) -> None:
    """``make(url)`` writes packs to ``scheme://`` URLs (registered by the module that reads
    them, as its source is in ``sources``: this module imports none of them)."""
    _destinations[scheme] = make


def destination(out: str):
    """Where ``out`` is: a URL of a registered scheme (``s3://``: ``s3_pack``) or a local
    folder; another URL scheme is refused, never taken for a local path."""
    scheme = url_scheme(out)
    if scheme is None:
        return LocalDestination(Path(out))
    if scheme not in _destinations:
        known = "".join(f" or an {s}:// URL" for s in _destinations)
        raise PackError(f"{out}: pack writes a local folder{known}, not {scheme}://")
    return _destinations[scheme](out)


def pack(data_dir: str, out: str, file_list: str | None = None, shard_mb: float = SHARD_MB,
         read_ahead: int = 64, progress: bool = True,
         layout: str = "mixed") -> dict[str, tuple[int, int]]:
    if url_scheme(data_dir):
        raise PackError(f"{data_dir}: pack reads a local folder, not a "
                        f"{url_scheme(data_dir)}:// URL")
    src = Path(data_dir)
    if is_pack(src):
        raise PackError(f"{src} is already a pack")
    missing = [s for s in SPLITS if not (src / s).is_dir()]
    if missing:
        raise PackError(f"{src} has no {' or '.join(m + '/' for m in missing)}: pack needs the "
                        f"ImageNet layout ({src}/train/<class>/<image>, {src}/val/<class>/<image>)")
    dest = destination(out)
    splits = {s: open_folder(src, s, file_list, listing_cache="off") for s in SPLITS}
    sizes = {split: check_input(samples, split) for split, samples in splits.items()}
    plan = {"format": FORMAT, "source": str(src.resolve()), "file_list": file_list,
            "shard_mb": shard_mb, "layout": layout,
            "splits": {s: {"samples": len(v), "digest": samples_digest(v)} for s, v in splits.items()}}
    try:
        start_pack(dest, plan)
        stage = dest.staging("")
        names = read_classes_tsv(src / CLASSES_TSV) if (src / CLASSES_TSV).is_file() else {}
        write_classes_tsv(stage / (CLASSES_TSV + ".tmp"), splits["train"].classes, names)
        dest.publish(CLASSES_TSV, stage / (CLASSES_TSV + ".tmp"))
        reader_for = {s: ReadAhead(v.read, read_ahead) for s, v in splits.items()}
        counts = {}
        for split, samples in splits.items():
            shards = pack_split(samples, sizes[split], dest, split, int(shard_mb * 2**20),
                                reader_for[split], progress, layout)
            counts[split] = (len(samples), shards)
        return counts
    finally:
        dest.close()


def start_pack(dest, plan: dict) -> None:
    """``pack.json`` written first (the same input, resumed: checked against it); refused where
    ``dest`` holds a pack of another input, or anything that is no pack."""
    found = dest.read_text(PACK_JSON)
    if found is not None:
        earlier = json.loads(found)
        if {k: earlier.get(k) for k in ("format", "shard_mb", "splits")} != \
                {k: plan[k] for k in ("format", "shard_mb", "splits")}:
            raise PackError(f"{dest} holds a pack of another input ({earlier.get('source')}, "
                            f"or other files or shard size): choose another OUT or remove it")
        layout = earlier.get("layout", "source")      # a pack begun before layouts: source
        if layout != plan["layout"]:
            raise PackError(f"{dest} holds a pack begun with --layout {layout}: finish it with "
                            f"--layout {layout}, or choose another OUT")
    elif dest.holds_anything():
        raise PackError(f"{dest} exists and is not a pack: choose an empty or new folder")
    dest.prepare()
    dest.write_text(PACK_JSON, json.dumps(plan, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="ImageNet-layout root (with train/ and val/)")
    p.add_argument("out", help="the pack's folder or s3://bucket/prefix (train with data.root=OUT)")
    p.add_argument("--file-list", help="a clean list from `verify`; {split} becomes train/val")
    p.add_argument("--shard-mb", type=float, default=SHARD_MB, help="shard size (default %(default)s)")
    p.add_argument("--read-ahead", type=int, default=64, help="reads in flight")
    p.add_argument("--layout", choices=LAYOUTS, default="mixed",
                   help="mixed: samples in a fixed random order across the shards, each shard "
                        "holding every class (for data.shuffle=shards); source: in index order "
                        "(default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        counts = pack(a.data_dir, a.out, a.file_list, a.shard_mb, a.read_ahead,
                      not a.no_progress, a.layout)
    except (PackError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, (n, shards) in counts.items():
        print(f"{split}: {n} images in {shards} shard(s) -> {a.out.rstrip('/')}/{split}")
    print(f"train with data.root={a.out}; check it with `python -m pipelines verify {a.out}`")
    return 0
