"""``python -m pipelines verify DATA_DIR``: find every file a training run would choke on.

Scans ``DATA_DIR/train`` and ``DATA_DIR/val`` (ImageNet layout) in parallel worker processes,
fully decoding each image, and reports undecodable, truncated and non-image files with the
reason. Given a pack (``python -m pipelines pack``), it checks the shards against their
index files and decodes every packed image instead, and writes no list. For each split of a
folder it writes a clean file list, ``DATA_DIR/<split>_clean.txt`` by default
(``--out`` sets another pattern; ``{split}`` is replaced by train/val):

    n01440764/n01440764_10026.JPEG 0
    n01440764/n01440764_10027.JPEG 0

one ``relative/path label`` line per good image, paths relative to the split folder and labels
in ImageFolder's order (class folders sorted by name), the format of DALI's
``readers.file(file_list=...)``. Train with it by setting ``data.file_list`` to the pattern
(e.g. ``data.file_list=DATA_DIR/{split}_clean.txt``): every backend then reads only those files.
Files with an image extension that are not images (and files without one, which no backend
would read) are listed in the report; exit status 1 when any bad file was found.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import sys
import warnings
from multiprocessing import get_context
from pathlib import Path

from .folder import IMAGE_EXTENSIONS, scan_folder, split_dir, url_scheme


# what DALI's image decoder reads (PIL's format names; MPO is a multi-picture JPEG, PPM = PNM)
DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"}


def check_image(path) -> str | None:
    """None if ``path`` decodes completely in every backend, else the reason it does not."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in DALI_FORMATS:
                    return f"{im.format} is not a format DALI decodes"
                im.load()
                if im.width < 1 or im.height < 1:
                    return "empty image"
                if im.mode not in ("RGB", "L", "CMYK", "RGBA", "P", "LA", "I;16", "I"):
                    return f"unsupported colour mode {im.mode}"
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        text = str(e)
        if "truncated" in text:
            return f"truncated ({text})"
        if "cannot identify image file" in text:
            return "not an image"
        return f"cannot decode ({text})"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        return f"cannot decode ({type(e).__name__}: {e})"
    return None


def check_sample(samples, index: int) -> str | None:
    """``check_image`` of sample ``index`` of a folder's or a pack's ``Samples``."""
    try:
        data = samples.read(index)
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot read ({e})"
    return check_image(io.BytesIO(data))


def _check(path: str) -> tuple[str, str | None]:
    return path, check_image(path)


_pack_samples = None  # the pack a verify worker checks (inherited through fork)


def _check_packed(index: int) -> tuple[int, str | None]:
    return index, check_sample(_pack_samples, index)


def pack_layout_errors(samples) -> list[str]:
    """Where a pack's shards, their .idx files and index.npz disagree."""
    import numpy as np
    from .pack import read_idx
    errors = []
    for number, name in enumerate(samples.shards):
        mine = np.flatnonzero(samples.shard == number)
        mine = mine[np.argsort(samples.offset[mine])]   # in the shard's order (any layout)
        expected = list(zip(samples.offset[mine].tolist(), samples.size[mine].tolist()))
        tar_path = samples.root / name
        try:
            if read_idx(tar_path.with_suffix(".idx")) != expected:
                errors.append(f"{tar_path.with_suffix('.idx')} disagrees with index.npz")
            with tarfile.open(tar_path) as tar:
                images = [(m.offset_data, m.size) for m in tar if not m.name.endswith(".cls")]
            if images != expected:
                errors.append(f"{tar_path}: members are not where index.npz says")
        except (OSError, ValueError, tarfile.TarError) as e:
            errors.append(f"{tar_path}: {e}")
    return errors


def verify_pack(root: Path, workers: int, progress: bool) -> int:
    """A pack (``python -m pipelines pack``): its layout, and every image decoded."""
    global _pack_samples
    from tqdm import tqdm
    from .pack import SPLITS, load_pack
    total_bad = 0
    for split in SPLITS:
        _pack_samples = samples = load_pack(root, split)
        errors = pack_layout_errors(samples)
        for error in errors:
            print(f"BAD  {error}")
        bad = 0
        if not errors:
            with get_context("fork").Pool(workers) as pool:
                it = pool.imap_unordered(_check_packed, range(len(samples)), chunksize=64)
                for i, why in tqdm(it, total=len(samples), desc=f"verify {split}", unit="img",
                                   disable=not progress, dynamic_ncols=True):
                    if why is not None:
                        print(f"BAD  {samples.describe(i)}: {why}")
                        bad += 1
        print(f"{split}: {len(samples) - bad} good, {bad} bad in {len(samples.shards)} shard(s)"
              + (f"; {len(errors)} layout error(s)" if errors else ""))
        total_bad += bad + len(errors)
    if total_bad:
        print("a pack holds what it was given: verify the source folder, and pack its clean "
              "list (python -m pipelines pack DATA_DIR OUT --file-list ...)")
    return 1 if total_bad else 0


def scan_split(root: Path, split: str, workers: int, progress: bool = True
               ) -> tuple[list[tuple[str, int]], list[tuple[str, str]], list[str]]:
    """(good (relpath, label), bad (relpath, reason), other files without an image extension)."""
    from tqdm import tqdm
    samples = scan_folder(split_dir(root, split))
    folder = samples.root
    others = sorted(os.path.relpath(os.path.join(d, f), folder)
                    for name in samples.classes for d, _, fs in os.walk(folder / name)
                    for f in fs if not f.lower().endswith(IMAGE_EXTENSIONS))
    paths = [str(folder / f) for f in samples.files]
    results: dict[str, str | None] = {}
    with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
        it = pool.imap_unordered(_check, paths, chunksize=64)
        for path, why in tqdm(it, total=len(paths), desc=f"verify {split}", unit="img",
                              disable=not progress, dynamic_ncols=True):
            results[path] = why
    good, bad = [], []
    for rel, label, path in zip(samples.files, samples.labels, paths):
        if results[path] is None:
            good.append((rel, label))
        else:
            bad.append((rel, results[path]))
    return good, bad, others


def write_file_list(path: Path, good: list[tuple[str, int]]) -> None:
    for rel, _ in good:
        if any(c.isspace() for c in rel):
            raise ValueError(f"{rel!r} contains whitespace, which DALI file lists cannot hold")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{rel} {label}\n" for rel, label in good))
    os.replace(tmp, path)


def verify(root: str, out: str | None = None, workers: int | None = None,
           splits: tuple[str, ...] = ("train", "val"), progress: bool = True,
           exclude: str | None = None) -> int:
    if url_scheme(root):
        print(f"error: {root}: verify reads a local folder or pack, not a {url_scheme(root)}:// "
              f"URL", file=sys.stderr)
        return 2
    root_path = Path(root)
    pattern = out or str(root_path / "{split}_clean.txt")
    workers = workers or os.cpu_count() or 1
    from .pack import is_pack
    if is_pack(root_path):
        return verify_pack(root_path, workers, progress)
    present = [s for s in splits if (root_path / s).is_dir()]
    if not present:
        print(f"error: {root} has none of {', '.join(s + '/' for s in splits)} "
              f"(expected ImageNet layout: {root}/train/<class>/<image>)", file=sys.stderr)
        return 2
    total_bad = 0
    for split in present:
        good, bad, others = scan_split(root_path, split, workers, progress)
        if exclude:  # a run's quarantine: left out even where the file reads well now
            from .quarantine import read_bad_images
            excluded = read_bad_images(exclude)
            good = [(rel, label) for rel, label in good if rel not in excluded]
        for rel, why in bad:
            print(f"BAD  {root_path / split / rel}: {why}")
        for rel in others:
            print(f"SKIP {root_path / split / rel}: no image extension, not read by any backend")
        target = Path(pattern.replace("{split}", split))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_list(target, good)
        print(f"{split}: {len(good)} good, {len(bad)} bad, {len(others)} skipped -> {target}")
        total_bad += len(bad)
    if total_bad:
        print(f"train with data.file_list={pattern} to leave the {total_bad} bad file(s) out")
    return 1 if total_bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="ImageNet-layout root (with train/ and val/)")
    p.add_argument("--out", help="clean list path; {split} becomes train/val "
                                 "(default DATA_DIR/{split}_clean.txt)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--exclude", help="a run's bad_images.txt: its files are left out of the "
                                     "clean lists")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return verify(a.data_dir, a.out, a.workers, progress=not a.no_progress, exclude=a.exclude)
