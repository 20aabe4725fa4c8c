"""Checkpoint files: atomic writes, checksums, newest-valid lookup with fallback, retention, in a
local folder or under an S3 prefix (``run.checkpoint_dir``).

Layout: ``<checkpoint_dir>/step_00001234.pt`` (one file, DDP engine) or ``step_00001234/`` (a
directory, DeepSpeed engine); ``checkpoint_dir`` is ``run.checkpoint_dir``, by default
``<output_dir>/checkpoints`` (``checkpoint_dir()`` is the one place that decides). Every
function here takes a *location*: a local path or an ``s3://bucket/key`` URL (a string); the
store that serves it is chosen by the location (``store_for``: ``LocalStore``, ``S3Store``).

Locally a file appears under its final name only once complete (temp name + fsync + rename), so
a crash never leaves a half-written checkpoint that looks valid, and nothing valid is
overwritten or deleted before the new one is complete. Every checkpoint carries SHA-256
checksums, written before it becomes visible and verified on resume: ``step_00001234.pt.sha256``
beside a file, ``MANIFEST.sha256`` (every file of the directory) inside a DeepSpeed directory,
both in ``sha256sum`` format (``sha256sum -c`` checks them by hand). SHA-256 runs at ~0.6 s/GB
here (docs/benchmarks.md). A checkpoint whose bytes changed (a flipped bit on disk, a partial
copy) is skipped by ``resume=auto`` like a truncated one; checkpoints written before checksums
existed load with a warning.

On S3 there is no rename: the object is uploaded (from a local staging file), read back and
checked against its SHA-256, and only then its checksum file (the *manifest*) is written: a
checkpoint without a manifest does not exist (an upload cut off, a writer killed). Reading one
downloads it into a local cache (``local_copy``) and checks it against the manifest there.

A step saved again (an epoch's end after a resume at its last step) replaces a checkpoint that
may be the only good one, so it is never un-verified on the way: the checksum file first lists
the old *and* the new SHA-256 for the name (``verify`` accepts a line that matches), then the
file is replaced (locally ``os.replace``; on S3 one PUT, atomic per object), then the new hash is
written alone. At every instant the file verifies against its checksum file; a save killed in
between leaves the old file with both lines. ``sha256sum -c`` by hand then reports one of the
two lines as FAILED: during that window (or after such a kill) only, and the other line OK.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import torch

from pipelines import object_store
from wrn_large.weights import load_torch_file

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")
COMPLETE_MARKER = "COMPLETE"       # written last into local checkpoint directories
MANIFEST = "MANIFEST.sha256"       # checksums of a checkpoint directory's files
CHECKSUM_SUFFIX = ".sha256"        # beside a checkpoint file
LOCK_NAME = ".lock"                # the lock object of an S3 prefix (one job per prefix)
RUN_TOKEN = ".run_token"           # in output_dir: who this run is, for that lock


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: resume=auto falls back to the previous one."""


class ResumeMismatch(RuntimeError):
    """A readable checkpoint this run's settings cannot continue: an error, never a fallback
    (older checkpoints of the same run would be skipped too, and the work lost)."""


# ------------------------------------------------------------------ where checkpoints go
def checkpoint_dir(output_dir: str | os.PathLike, configured: str | os.PathLike | None = None
                   ) -> Path | str:
    """The run's checkpoint folder: ``run.checkpoint_dir`` where set (a folder or an S3 URL),
    else ``<output_dir>/checkpoints``."""
    if configured is None or str(configured) == "":
        return Path(output_dir) / "checkpoints"
    return str(configured).rstrip("/") if object_store.is_url(configured) else Path(configured)


def checkpoint_path(folder, step: int, suffix: str) -> Path | str:
    return join(folder, f"step_{step:08d}{suffix}")


def join(location, name: str) -> Path | str:
    """``name`` inside the folder ``location`` (a Path, or a URL string)."""
    if object_store.is_url(location):
        return f"{str(location).rstrip('/')}/{name}"
    return Path(location) / name


def name_of(location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def is_remote(location) -> bool:
    return object_store.is_url(location)


# ------------------------------------------------------------------ local files
def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_of(path: str | os.PathLike) -> str:
    return object_store.file_sha256(path)


def checksum_file(path):
    """``<path>.sha256``, the checksum file (manifest) of a checkpoint file."""
    return join(Path(path).parent if not is_remote(path) else str(path).rsplit("/", 1)[0],
                name_of(path) + CHECKSUM_SUFFIX)


def checksum_line(sha256: str, name: str) -> str:
    return f"{sha256}  {name}\n"


def directory_checksums(folder: Path) -> dict[str, str]:
    """{relative name: SHA-256} of every file under ``folder`` but the manifest and marker."""
    return {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, COMPLETE_MARKER)}


def manifest_text(checksums: dict[str, str]) -> str:
    return "".join(checksum_line(sha, name) for name, sha in sorted(checksums.items()))


def write_manifest(folder: Path) -> None:
    """``MANIFEST.sha256`` of every file under ``folder`` (written before COMPLETE)."""
    write_text_atomic(folder / MANIFEST, manifest_text(directory_checksums(folder)))


def parse_manifest(text: str) -> dict[str, list[str]]:
    """{name: [SHA-256, ...]} of a checksum file's lines: a name has two lines only while its
    checkpoint is saved again (``resave_lines``), and its bytes match if they match either."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        expected, name = line.split("  ", 1)
        found.setdefault(name, []).append(expected)
    return found


def resave_lines(old: list[str], new: str, name: str) -> str | None:
    """The checksum lines of ``name`` while its object (whose recorded hashes are ``old``) is
    replaced by one whose hash is ``new``: both, so that the object verifies before and after
    the replacement; None where there is no old one to keep verifiable."""
    kept = [sha for sha in old if sha != new]
    if not kept:
        return None
    return "".join(checksum_line(sha, name) for sha in (kept[-1], new))


# ------------------------------------------------------------------ the stores
class LocalStore:
    """Checkpoints in a local (or mounted) folder."""

    def save_file(self, obj, path, checksum: bool, staging=None) -> None:
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
                sha, listing = sha256_of(tmp), checksum_file(path)
                if not path.is_file():
                    write_text_atomic(listing, checksum_line(sha, path.name))
                elif listing.is_file():   # the same step saved again: both hashes meanwhile
                    both = resave_lines(parse_manifest(listing.read_text()).get(path.name, []),
                                        sha, path.name)
                    if both is not None:
                        write_text_atomic(listing, both)
            os.replace(tmp, path)
            if checksum:
                write_text_atomic(listing, checksum_line(sha, path.name))
        finally:
            tmp.unlink(missing_ok=True)

    def entries(self, folder) -> list[tuple[int, Path]]:
        folder = Path(folder)
        if not folder.is_dir():
            return []
        return [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]

    def exists(self, location) -> bool:
        return Path(location).exists()

    def is_complete(self, path) -> bool:
        path = Path(path)
        return path.is_file() or (path / COMPLETE_MARKER).is_file()

    def verify(self, path) -> None:
        path = Path(path)
        listing, base = ((path / MANIFEST, path) if path.is_dir() else
                         (checksum_file(path), path.parent))
        if not listing.is_file():
            log.warning("%s has no checksums (written before they existed): not verified", path)
            return
        for name, expected in parse_manifest(listing.read_text()).items():
            target = base / name
            if not target.is_file():
                raise CheckpointError(f"{path}: {name} is listed in {listing.name} but missing")
            if sha256_of(target) not in expected:
                raise CheckpointError(
                    f"{target}: SHA-256 checksum mismatch (the file changed after it was "
                    f"written; {listing.name} records {expected[-1][:16]}...)")

    def delete(self, path) -> None:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            checksum_file(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    def local_copy(self, path, cache: Path | None = None) -> Path:
        return Path(path)

    def lock(self, folder, output_dir):
        """The default folder lies in output_dir, whose lock covers it; another one is locked
        itself (two runs of other output_dirs pointed at one checkpoint_dir)."""
        if Path(folder) == checkpoint_dir(output_dir):
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return RunDirLock(folder, setting="run.checkpoint_dir")

    def probe(self, folder) -> None:
        """Nothing to probe: a folder that cannot be made fails when the run directory is."""


class S3Store:
    """Checkpoints under an S3 prefix (pipelines/object_store.py: credentials the AWS way)."""

    def save_file(self, obj, url, checksum: bool = True, staging=None) -> None:
        """Saved to a local staging file (in a folder made under ``staging``, the run's
        ``checkpoint_staging``; the system's temp dir, often small or tmpfs, only where not
        given), uploaded, read back and checked, then the manifest: always written (on S3 it is
        what makes the checkpoint exist), whatever ``checksum``. The staging folder goes after."""
        if staging is not None:
            Path(staging).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="wrn_checkpoint_", dir=staging) as folder:
            local = Path(folder) / name_of(url)
            LocalStore().save_file(obj, local, checksum=True)
            self.publish_file(local, url)

    def publish_file(self, local: Path, url: str) -> None:
        """A complete local checkpoint file (and its ``.sha256``) as the object ``url``, its
        manifest written last. A save of the same step again keeps the old object verifiable
        until it is replaced (one PUT, atomic per object): the manifest lists the old and the
        new hash while the new object goes up, then the new one alone."""
        manifest, name = checksum_file(url), name_of(url)
        sha = parse_manifest(checksum_file(local).read_text())[local.name][-1]
        try:
            old = parse_manifest(object_store.read(manifest).decode()).get(name, [])
        except object_store.ObjectStoreError as e:
            if e.errno != errno.ENOENT:
                raise
            old = []
        both = resave_lines(old, sha, name)
        if both is not None:
            object_store.write(manifest, both.encode())
        object_store.upload(local, url, sha256=sha)
        object_store.write(manifest, checksum_line(sha, name).encode())

    def publish_files(self, folder: Path, url: str, checksums: dict[str, str]) -> None:
        """Files of a local checkpoint directory (``{relative name: SHA-256}``), each uploaded
        and read back; the manifest is ``write_directory_manifest``'s, once every part is up."""
        for name, sha in sorted(checksums.items()):
            object_store.upload(folder / name, f"{url}/{name}", sha256=sha)

    def write_directory_manifest(self, url: str, checksums: dict[str, str]) -> None:
        object_store.write(f"{url}/{MANIFEST}", manifest_text(checksums).encode())

    def entries(self, folder) -> list[tuple[int, str]]:
        seen = {}
        for key, _ in object_store.listing(folder):
            first = key.split("/", 1)[0]
            if m := _NAME.match(first):
                seen[first] = int(m.group(1))
        return [(step, join(folder, name)) for name, step in seen.items()]

    def manifest_of(self, url) -> str:
        return f"{url}/{MANIFEST}" if self.is_directory(url) else checksum_file(url)

    def is_directory(self, url) -> bool:
        """A checkpoint's name says it (``step_N.pt`` a file, ``step_N`` a directory); any
        other URL (``model.pretrained=s3://.../weights.pth``) is a directory only where an
        object exists under ``url/`` (a listing of one key), else a file."""
        if m := _NAME.match(name_of(url)):
            return m.group(2) is None
        return next(iter(object_store.listing(url)), None) is not None

    def exists(self, url) -> bool:
        if self.is_directory(url):
            return any(True for _ in object_store.listing(url))
        return object_store.exists(url)

    def is_complete(self, url) -> bool:
        return object_store.exists(self.manifest_of(url))

    def manifest(self, url) -> str:
        try:
            return object_store.read(self.manifest_of(url)).decode()
        except object_store.ObjectStoreError as e:
            raise CheckpointError(f"{url} has no readable manifest: {e}") from None

    def checksums(self, url) -> dict[str, list[str]]:
        return parse_manifest(self.manifest(url))

    def verify(self, url) -> None:
        """Every part's bytes as they read back against the manifest (streamed, nothing kept)."""
        base = url if self.is_directory(url) else str(url).rsplit("/", 1)[0]
        for name, expected in self.checksums(url).items():
            try:
                found = object_store.sha256_of(f"{base}/{name}")
            except object_store.ObjectStoreError as e:
                raise CheckpointError(str(e)) from None
            if found not in expected:
                raise CheckpointError(f"{base}/{name}: SHA-256 checksum mismatch (the object "
                                      f"changed after it was written; its manifest records "
                                      f"{expected[-1][:16]}...)")

    def delete(self, url) -> None:
        """The manifest first: a checkpoint half deleted is an incomplete one, never one that
        looks complete with parts missing."""
        object_store.delete(self.manifest_of(url))
        if self.is_directory(url):
            for key, _ in list(object_store.listing(url)):
                object_store.delete(f"{url}/{key}")
        else:
            object_store.delete(url)

    def local_copy(self, url, cache: Path | None = None) -> Path:
        """The checkpoint downloaded into ``cache`` (by default a folder of the system's temp
        dir) with its checksums beside it as locally, a copy already there reused when its
        bytes match the manifest. Ranks of one host share it (a file lock: one downloads, the
        others check); ``verify`` on the copy checks it. Other checkpoints cached there go."""
        cache = Path(cache or Path(tempfile.gettempdir()) / "wrn_checkpoint_cache")
        cache.mkdir(parents=True, exist_ok=True)
        name = name_of(url)
        with file_lock(cache / ".lock"):
            for old in cache.glob("step_*"):
                if old.name not in (name, name + CHECKSUM_SUFFIX):
                    LocalStore().delete(old)
            if self.is_directory(url):
                return self.fetch_directory(url, cache / name)
            return self.fetch_file(url, cache / name)

    def fetch_file(self, url, target: Path) -> Path:
        manifest = checksum_file(url)
        if not object_store.exists(manifest):
            log.warning("%s has no manifest: downloaded without a check", url)
            checksum_file(target).unlink(missing_ok=True)
            return object_store.download(url, target)
        text = self.manifest(url)
        expected = parse_manifest(text).get(name_of(url), [])
        if not (target.is_file() and sha256_of(target) in expected):
            object_store.download(url, target)
        write_text_atomic(checksum_file(target), text)
        return target

    def fetch_directory(self, url, target: Path) -> Path:
        text = self.manifest(url)
        for name, expected in parse_manifest(text).items():
            part = target / name
            if not (part.is_file() and sha256_of(part) in expected):
                object_store.download(f"{url}/{name}", part)
        write_text_atomic(target / MANIFEST, text)
        (target / COMPLETE_MARKER).write_text("ok\n")
        return target

    def lock(self, folder, output_dir):
        return PrefixLock(folder, output_dir)

    def probe(self, folder) -> None:
        """One write and delete of a probe object and one listing under ``folder``: missing
        credentials, an unknown bucket or a denied write fail here, before training."""
        probe = join(folder, f".probe-{uuid.uuid4().hex}")
        object_store.write(probe, b"probe\n")
        object_store.delete(probe)
        next(iter(object_store.listing(folder)), None)


_STORES = {"s3": S3Store()}
_LOCAL = LocalStore()


def store_for(location) -> LocalStore | S3Store:
    """The store of a location: its URL scheme's, or the local one."""
    if object_store.is_url(location):
        return _STORES[object_store.SCHEME]
    return _LOCAL


@contextlib.contextmanager
def file_lock(path: Path):
    import fcntl

    with open(path, "a+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        yield


# ------------------------------------------------------------------ the API (any location)
def save_file_atomic(obj, location, checksum: bool = False, staging=None) -> None:
    """``obj`` saved as the checkpoint file ``location``, visible only once complete (locally a
    rename; on S3 its manifest, written last). ``checksum``: with its SHA-256 (always on S3).
    ``staging``: the local folder an S3 upload is staged in (the run's ``checkpoint_staging``)."""
    store_for(location).save_file(obj, location, checksum, staging)


def verify(location) -> None:
    """Raise CheckpointError naming the file whose bytes differ from its recorded checksum.
    A local checkpoint written before checksums existed passes with a warning."""
    store_for(location).verify(location)


def local_copy(location, cache: Path | None = None) -> Path:
    """A local path to read ``location`` from: itself, or a checked download into ``cache``."""
    try:
        return store_for(location).local_copy(location, cache)
    except object_store.ObjectStoreError as e:
        raise CheckpointError(str(e)) from None


def load_file(location, cache: Path | None = None) -> dict:
    """A checkpoint file, loaded with ``weights_only=True``; CheckpointError names the file."""
    path = local_copy(location, cache)
    state = load_torch_file(path, CheckpointError)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{location} is not a training checkpoint of this project")
    return state


def list_checkpoints(folder) -> list:
    """Checkpoints in the folder ``folder``, newest first (by step)."""
    return [p for _, p in sorted(store_for(folder).entries(folder), reverse=True)]


def exists(location) -> bool:
    return store_for(location).exists(location)


def is_complete(location) -> bool:
    return store_for(location).is_complete(location)


def newest_complete(folder):
    return next((p for p in list_checkpoints(folder) if is_complete(p)), None)


def checksums_of(path):
    """The file of a checkpoint's checksums: ``<file>.sha256``, or a directory's manifest."""
    if is_remote(path):
        return store_for(path).manifest_of(path)
    return checksum_file(path) if Path(path).is_file() else Path(path) / MANIFEST


def prune(folder, keep: int, verified=None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, once the newest one verified
    (its bytes read back against its checksums: an older one is never deleted for a newer one
    that cannot be read). ``verified``: a checkpoint this process has just uploaded and read
    back against its SHA-256 (S3), trusted without a second read. Incomplete leftovers older
    than the newest complete one go too; newer ones are left (on S3, a save still uploading).
    Never raises for a storage error: retention is not worth stopping a run for; what could not
    be looked at or deleted is a warning naming it."""
    store = store_for(folder)
    try:
        found = list_checkpoints(folder)
        complete = [p for p in found if store.is_complete(p)]
    except OSError as e:
        log.warning("not removing old checkpoints: %s", e)
        return
    if not complete:
        return
    newest, kept = step_of(complete[0]), {str(p) for p in complete[:keep]}
    doomed = [p for p in found if str(p) not in kept and step_of(p) < newest]
    if not doomed:
        return
    if verified is None or str(verified) != str(complete[0]):
        try:
            store.verify(complete[0])
        except (CheckpointError, OSError) as e:
            log.warning("not removing old checkpoints: the newest one does not verify (%s)", e)
            return
    for path in doomed:
        log.info("removing old checkpoint %s", path)
        try:
            store.delete(path)
        except OSError as e:
            log.warning("could not remove old checkpoint %s (left in place): %s", path, e)


def step_of(path) -> int | None:
    m = _NAME.match(name_of(path))
    return int(m.group(1)) if m else None


def probe(folder) -> None:
    """A write where the run will write its checkpoints, before training (S3: credentials,
    bucket, permission); an ObjectStoreError says what failed, in one line naming the URL."""
    store_for(folder).probe(folder)


# ------------------------------------------------------------------ a directory of many ranks
def owned_files(seen: list[dict[str, str]], rank: int) -> dict[str, str]:
    """Of the files every rank sees in its staging folder (``seen[r]``: {name: SHA-256}; on a
    shared file system every rank sees all of them, on node-local disks each its node's), those
    ``rank`` uploads: each file by the lowest rank that has it."""
    return {name: sha for name, sha in seen[rank].items()
            if next(r for r, files in enumerate(seen) if name in files) == rank}


def merged_checksums(seen: list[dict[str, str]]) -> dict[str, str]:
    """The one manifest of every rank's files; a name with two contents is an error."""
    merged: dict[str, str] = {}
    for files in seen:
        for name, sha in files.items():
            if merged.setdefault(name, sha) != sha:
                raise CheckpointError(f"{name}: two ranks staged different bytes under one name")
    return merged


def publish_directory(staged: Path, url: str, is_main: bool) -> None:
    """A checkpoint directory staged locally by every rank (DeepSpeed's) as ``url``, on every
    rank: rank 0 checks the ranks' files and removes an old manifest (the same step saved
    again), each rank uploads (and reads back) its own files, and once all are up rank 0 writes
    ONE manifest of all of them, last: the checkpoint is complete when its manifest is there.
    Each of the three steps ends in an exchange of errors: what fails on any rank (rank 0's own
    steps included) is raised on every rank, none is left waiting in a collective."""
    from .distributed import all_gather_object

    def together(what: str, step) -> None:
        error = None
        try:
            step()
        except (OSError, CheckpointError) as e:
            error = str(e)
        errors = [e for e in all_gather_object(error) if e]
        if errors:
            raise CheckpointError(f"{url}: {what} failed: {errors[0]}")

    store = store_for(url)
    seen = all_gather_object(directory_checksums(staged) if staged.is_dir() else {})
    merged: dict[str, str] = {}

    def prepare() -> None:
        if is_main:
            merged.update(merged_checksums(seen))
            object_store.delete(f"{url}/{MANIFEST}")

    together("preparing the upload", prepare)
    together("upload", lambda: store.publish_files(staged, url, owned_files(seen, _rank())))
    together("writing the manifest",
             lambda: store.write_directory_manifest(url, merged) if is_main else None)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


# ------------------------------------------------------------------ one job per folder
class RunDirLock:
    """One job per output directory: rank 0 holds a POSIX lock on ``<output_dir>/.lock`` for
    its lifetime. The kernel releases it when the process dies (even by SIGKILL), so restarts
    and requeued jobs take it over; a second live job pointed at the same directory is refused
    before it touches anything."""

    def __init__(self, output_dir: str | os.PathLike, setting: str = "run.output_dir"):
        import fcntl

        self.path = Path(output_dir) / LOCK_NAME
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise RuntimeError(f"{output_dir} is in use by another training job ({owner}); "
                               f"give this run its own {setting}") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing drops the lock


def run_token(output_dir: str | os.PathLike) -> str:
    """This run's id: a random token made once in ``<output_dir>/.run_token`` and kept, so a
    restart or requeue of the run (the same output_dir) is the same owner."""
    path = Path(output_dir) / RUN_TOKEN
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        with open(path, "x") as f:
            f.write(secrets.token_hex(16) + "\n")
    return path.read_text().strip()


class PrefixLock:
    """One job per S3 prefix: the object ``<prefix>/.lock``, written with a conditional put
    (exactly one of two racing jobs makes it), naming its owner. Nothing releases it when a job
    is killed (SIGKILL, a node lost), so the owner is the *run* (``run_token`` of its
    output_dir), not the process: a restart or requeue of the same run takes it over; a job of
    another output_dir is refused with the owner's name. A user who wants the prefix for another
    run (the owner is gone for good) deletes the lock object. A run that ends releases it."""

    def __init__(self, folder: str, output_dir: str | os.PathLike):
        self.url = join(folder, LOCK_NAME)
        self.token = run_token(output_dir)
        body = json.dumps({"run": self.token, "output_dir": str(Path(output_dir).resolve()),
                           "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
        try:
            object_store.write(self.url, body, if_absent=True)
            return
        except object_store.ObjectStoreError as e:
            if e.errno != errno.EEXIST:
                raise
        owner = self.owner()
        if owner.get("run") != self.token:
            raise RuntimeError(
                f"{folder} is in use by another training job (output_dir "
                f"{owner.get('output_dir', '?')} on {owner.get('host', '?')}, pid "
                f"{owner.get('pid', '?')}, since {owner.get('since', '?')}); give this run its "
                f"own run.checkpoint_dir, or delete {self.url} if that job is gone for good")
        log.info("taking over %s from an earlier start of this run (%s)", self.url, owner)
        object_store.write(self.url, body)

    def owner(self) -> dict:
        try:
            return json.loads(object_store.read(self.url))
        except (ValueError, object_store.ObjectStoreError):
            return {}

    def release(self) -> None:
        with contextlib.suppress(object_store.ObjectStoreError):
            if self.owner().get("run") == self.token:
                object_store.delete(self.url)


def take_lock(folder, output_dir):
    """The lock that keeps other jobs off ``folder`` (None where output_dir's covers it);
    RuntimeError naming the owner where another job holds it."""
    return store_for(folder).lock(folder, output_dir)
