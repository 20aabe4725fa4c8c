"""The names of a data set's classes, in label order, for checkpoints and predictions:
``(classes, names)`` with ``classes`` the identifiers (ImageNet: the class folders, e.g. WordNet
ids) and ``names`` the human-readable names where the data set provides them (``classes.tsv``
from ``python -m pipelines prepare-imagenet``; CIFAR's meta files), else the identifiers."""
from __future__ import annotations

import pickle
from pathlib import Path

from .config import DataConfig

SVHN_DIGITS = [str(d) for d in range(10)]
CLASSES_TSV = "classes.tsv"


def class_names(cfg: DataConfig, loader) -> tuple[list[str], list[str]]:
    root = Path(cfg.root) if cfg.root else None
    if cfg.dataset in ("cifar10", "cifar100"):
        meta, key = (("batches.meta", b"label_names") if cfg.dataset == "cifar10"
                     else ("meta", b"fine_label_names"))
        try:
            with open(root / meta, "rb") as f:
                names = [n.decode() for n in pickle.load(f, encoding="bytes")[key]]
        except (OSError, KeyError, TypeError, pickle.UnpicklingError):
            names = [str(i) for i in range(loader.num_classes)]
        return names, names
    if cfg.dataset == "svhn":
        return SVHN_DIGITS, SVHN_DIGITS
    classes = list(getattr(loader, "classes", None) or map(str, range(loader.num_classes)))
    tsv = root / CLASSES_TSV if root else None
    readable = read_classes_tsv(tsv) if tsv is not None and tsv.is_file() else {}
    return classes, [readable.get(c, c) for c in classes]


def write_classes_tsv(path: Path, classes: list[str], names: dict[str, str]) -> None:
    """``index, wnid, name`` per class in label order; an empty name where none is known."""
    with open(path, "w") as f:
        f.write("index\twnid\tname\n")
        for i, wnid in enumerate(classes):
            f.write(f"{i}\t{wnid}\t{names.get(wnid, '')}\n")


def read_classes_tsv(path: Path) -> dict[str, str]:
    """wnid -> name of a ``write_classes_tsv`` file (classes without a name left out)."""
    readable = {}
    for line in path.read_text().splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) == 3 and parts[2]:
            readable[parts[1]] = parts[2]
    return readable
