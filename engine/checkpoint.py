"""Checkpoint files: atomic writes, checksums, newest-valid lookup with fallback, retention.

Layout: ``<output_dir>/checkpoints/step_00001234.pt`` (one file, DDP engine) or
``step_00001234/`` (a directory, DeepSpeed engine). A file appears under its final name only
once complete (temp name + fsync + rename), so a crash never leaves a half-written checkpoint
that looks valid, and nothing valid is overwritten or deleted before the new one is complete.

Every checkpoint carries SHA-256 checksums, written before it becomes visible and verified on
resume: ``step_00001234.pt.sha256`` beside a file, ``MANIFEST.sha256`` (every file of the
directory) inside a DeepSpeed directory, both in ``sha256sum`` format (``sha256sum -c`` checks
them by hand). SHA-256 runs at ~0.6 s/GB here (docs/benchmarks.md). A checkpoint whose bytes
changed (a flipped bit on disk, a partial copy) is skipped by ``resume=auto`` like a truncated
one; checkpoints written before checksums existed load with a warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from wrn_large.weights import load_torch_file

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")
COMPLETE_MARKER = "COMPLETE"       # written last into checkpoint directories
MANIFEST = "MANIFEST.sha256"       # checksums of a checkpoint directory's files
CHECKSUM_SUFFIX = ".sha256"        # beside a checkpoint file
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: resume=auto falls back to the previous one."""


class ResumeMismatch(RuntimeError):
    """A readable checkpoint this run's settings cannot continue: an error, never a fallback
    (older checkpoints of the same run would be skipped too, and the work lost)."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir, step: int, suffix: str) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:08d}{suffix}"


def save_file_atomic(obj, path: str | os.PathLike, checksum: bool = False) -> None:
    """``torch.save`` to a temp name, fsync, rename. ``checksum``: its SHA-256 is written to
    ``<path>.sha256`` before the file appears under its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            write_text_atomic(checksum_file(path), f"{sha256_of(tmp)}  {path.name}\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_manifest(folder: Path) -> None:
    """``MANIFEST.sha256`` of every file under ``folder`` (written before COMPLETE)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in
                   (MANIFEST, COMPLETE_MARKER))
    write_text_atomic(folder / MANIFEST, "".join(
        f"{sha256_of(p)}  {p.relative_to(folder).as_posix()}\n" for p in files))


def verify(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the file whose bytes differ from its recorded checksum.
    A checkpoint written before checksums existed passes with a warning."""
    path = Path(path)
    listing, base = ((path / MANIFEST, path) if path.is_dir() else
                     (checksum_file(path), path.parent))
    if not listing.is_file():
        log.warning("%s has no checksums (written before they existed): not verified", path)
        return
    for line in listing.read_text().splitlines():
        expected, name = line.split("  ", 1)
        target = base / name
        if not target.is_file():
            raise CheckpointError(f"{path}: {name} is listed in {listing.name} but missing")
        if sha256_of(target) != expected:
            raise CheckpointError(f"{target}: SHA-256 checksum mismatch (the file changed "
                                  f"after it was written; {listing.name} records {expected[:16]}...)")


def load_file(path: str | os.PathLike) -> dict:
    """A checkpoint file, loaded with ``weights_only=True``; CheckpointError names the file."""
    state = load_torch_file(path, CheckpointError)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of this project")
    return state


def list_checkpoints(output_dir) -> list[Path]:
    """Checkpoints in ``output_dir``, newest first (by step)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def is_complete(path: Path) -> bool:
    return path.is_file() or (path / COMPLETE_MARKER).is_file()


def newest_complete(output_dir) -> Path | None:
    return next((p for p in list_checkpoints(output_dir) if is_complete(p)), None)


def checksums_of(path: Path) -> Path:
    """The file of a checkpoint's checksums: ``<file>.sha256``, or a directory's manifest."""
    return checksum_file(path) if path.is_file() else path / MANIFEST


def prune(output_dir, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (incomplete leftovers too)."""
    kept = 0
    for path in list_checkpoints(output_dir):
        if is_complete(path) and kept < keep:
            kept += 1
            continue
        log.info("removing old checkpoint %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
            checksum_file(path).unlink(missing_ok=True)


def step_of(path: str | os.PathLike) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


class RunDirLock:
    """One job per output directory: rank 0 holds a POSIX lock on ``<output_dir>/.lock`` for
    its lifetime. The kernel releases it when the process dies (even by SIGKILL), so restarts
    and requeued jobs take it over; a second live job pointed at the same directory is refused
    before it touches anything."""

    def __init__(self, output_dir: str | os.PathLike):
        import fcntl
        import socket

        self.path = Path(output_dir) / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise RuntimeError(f"{output_dir} is in use by another training job ({owner}); "
                               "give this run its own run.output_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing drops the lock
