"""ImageNet-layout folders (``root/<split>/<class>/<image>``) and file lists, indexed exactly as
torchvision's ImageFolder: classes sorted by name, label = position in that order."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Samples:
    root: Path                     # the split folder
    files: list[str]               # paths relative to root
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/train`` for split train, ``root/val`` for val (``root`` itself if it has no such
    subfolder but holds class folders, for a single-split set)."""
    path = Path(root) / split
    if path.is_dir():
        return path
    raise FileNotFoundError(f"{path} does not exist: an ImageNet-layout data set needs "
                            f"{Path(root)}/train/<class>/*.JPEG and {Path(root)}/val/<class>/*.JPEG")


def scan_folder(folder: Path) -> Samples:
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(folder / name, followlinks=True)):
            for file in sorted(names):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dirpath, file), folder))
                    labels.append(label)
    if not files:
        raise FileNotFoundError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Samples(folder, files, labels, classes)


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


def load_samples(root: str | os.PathLike, split: str, file_list: str | None = None) -> Samples:
    folder = split_dir(root, split)
    samples = scan_folder(folder)
    if file_list:
        listed = Path(str(file_list).replace("{split}", split))
        return read_file_list(listed, folder, samples.classes)
    return samples
