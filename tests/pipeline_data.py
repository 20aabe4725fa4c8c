"""Small data sets in the real on-disk formats for the pipeline tests."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar(root: Path, classes: int = 10, per_batch: int = 20, test: int = 30,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cifar-10-batches-py (classes=10) or cifar-100-python (classes=100) with random images.
    Returns (train NHWC, train labels, test NHWC, test labels) as written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    key = b"labels" if classes == 10 else b"fine_labels"

    def dump(name: str, n: int):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), key: labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, f)
        return data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)

    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    per = per_batch if classes == 10 else per_batch * 5
    parts = [dump(name, per) for name in names]
    test_x, test_y = dump("test_batch" if classes == 10 else "test", test)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            test_x, test_y)


def write_svhn(root: Path, train: int = 50, test: int = 20, seed: int = 0, extra: int = 0):
    """train_32x32.mat / test_32x32.mat, and extra_32x32.mat if ``extra`` (X 32x32x3xN uint8,
    y Nx1 in 1..10, 10 = digit 0). Returns (train NHWC, train digits, test NHWC, test digits)."""
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n in (("train", train), ("test", test), ("extra", extra))[:3 if extra else 2]:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
        out += [x.transpose(3, 0, 1, 2), np.where(y[:, 0] == 10, 0, y[:, 0]).astype(np.int64)]
    return tuple(out[:4])


def write_jpeg_folder(root: Path, classes=("b_cls", "a_cls", "c_cls"), per_class: int = 6,
                      size=(96, 72), splits=("train", "val"), seed: int = 0) -> Path:
    """ImageNet layout with smooth random images (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for split in splits:
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
                img.save(folder / f"{c}_{i:03d}.JPEG", quality=92)
    return root


def flat_colour_folder(root: Path, count: int) -> Path:
    """ImageNet layout, one class of ``count`` flat-colour JPEGs: file i has red level 6 * i,
    so any crop of it tells which file it came from (``flat_colour_ids``)."""
    folder = root / "train" / "only"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (60, 50), (6 * i, 90, 150)).save(folder / f"{i:02d}.jpg", quality=95)
    return root


def flat_colour_ids(images) -> list[int]:
    """The file index of each normalised image of a ``flat_colour_folder`` batch."""
    red = (images[:, 0].float().mean((1, 2)) * 0.229 + 0.485) * 255
    return [round(v / 6) for v in red.tolist()]


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    i, out = 0, []
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"wire type {wire}")
        out.append((number, value))
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def dali_operators(pipe) -> list[tuple[str, str, dict]]:
    """(operator, device, {argument: bool value}) for each operator of a DALI pipeline, read from
    ``pipe.serialize()`` (DALI's dali.proto: PipelineDef.op = 5; OpDef.name = 1, .args = 4;
    Argument.name = 1, .type = 2, .strings = 5, .bools = 6; the device is the argument "device")."""
    ops = []
    for number, op in _fields(pipe.serialize()):
        if number != 5:
            continue
        fields = _fields(op)
        name = next(v.decode() for n, v in fields if n == 1)
        args = {}
        for n, value in fields:
            if n != 4 or not isinstance(value, bytes):
                continue
            arg = dict((k, v) for k, v in _fields(value) if k in (1, 2, 5, 6))
            arg_name, kind = arg[1].decode(), arg.get(2, b"").decode()
            if kind == "bool":
                args[arg_name] = bool(arg.get(6, 0))
            elif kind == "string" and 5 in arg:
                args[arg_name] = arg[5].decode()
        ops.append((name, args.get("device", ""), args))
    return ops
