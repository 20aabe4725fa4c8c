"""A file system with a parallel file system's latency, on one machine (FUSE, fusepy + libfuse2).

Every operation named in ``--ops`` waits ``--latency`` seconds before it answers, as a round
trip to a metadata server would: ``open`` (the per-file cost of reading a data set),
``getattr`` (stat, and each path lookup the kernel has not cached), ``opendir`` and
``readdir`` (each kernel readdir request, about one 4 KB page of entries: a directory of 1,300
files takes ~20). The daemon is multithreaded, so concurrent operations overlap as they do on
NFS or Lustre; the kernel's own caches are left at FUSE's defaults (attributes and entries 1 s;
file data dropped at each open unless ``--kernel-cache``).

Two trees can be served, read-only:
- a passthrough of a real folder (``SOURCE``);
- ``--virtual CLASSES FILES JPEG``: ``train/`` (and ``val/``, a tenth) with CLASSES class folders
  of FILES files each, every file the bytes of JPEG: ImageNet's 1.28M-file listing with no disk.

Fault modes (the Python daemon only), as a sick file server shows them:
- ``--block-open GLOB``: an open of a path matching GLOB (relative to the mount, e.g.
  ``train/class_0/003.jpg`` or ``train/*/003.jpg``) never answers until ``--release FILE``
  exists (forever if no release file is given): the process that opens it waits in the kernel;
- ``--eio-open GLOB N``: the first N opens of each path matching GLOB fail with EIO (``forever``:
  every open), then opens succeed: a parallel file system's transient error;
- ``--hang-when FILE``: once FILE exists, every operation blocks until ``--release FILE``
  exists: a mount that stops answering (a hung NFS/Lustre server).

Run it as a process (``mounted`` below does, and stops it by PID):
    python tests/latency_fs.py SOURCE MOUNTPOINT --latency 0.002 --ops open

With ``mounted``: the fault modes are its keyword arguments; ``stop_answering(mountpoint)``
hangs the mount, ``release(mountpoint)`` lets every blocked operation answer (done by
``mounted`` itself before it unmounts, so that nothing stays blocked)::

    with mounted(data, tmp / "mnt", latency=0, block_open=["train/class_0/003.jpg"],
                 eio_open={"train/class_1/*": 2}, can_hang=True) as mnt:
        ...                          # reads under mnt; stop_answering(mnt); release(mnt)

``mounted(..., engine="c")`` serves the same passthrough from ``latency_fs.c`` (compiled on first
use; Debian: libfuse-dev): a call into it costs microseconds of CPU instead of fusepy's tens, so
on a 2-core machine a throughput measurement measures the loader, not this daemon.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

ALL_OPS = ("open", "getattr", "opendir", "readdir")


def fuse_unavailable(engine: str = "python") -> str | None:
    """Why FUSE (served by ``engine``) cannot be used here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount") is None:
        return "no fusermount (Debian: apt-get install fuse libfuse2)"
    if engine == "c":
        try:
            c_daemon()
        except (OSError, subprocess.CalledProcessError) as e:
            return f"cannot build latency_fs.c (Debian: apt-get install gcc pkg-config libfuse-dev): {e}"
        return None
    try:
        import fuse  # noqa: F401  (fusepy, which loads libfuse.so.2)
    except (ImportError, OSError, EnvironmentError) as e:
        return f"fusepy/libfuse2 unavailable: {e}"
    return None


class Faults:
    """The fault modes of one daemon (see the module's docstring)."""

    POLL = 0.05   # how often a blocked operation looks for the release file

    def __init__(self, block_open=(), eio_open=(), hang_when=None, release=None):
        self.block_open = list(block_open)
        self.eio_open = [(glob, None if n in (None, "forever") else int(n)) for glob, n in eio_open]
        self.hang_when, self.release = hang_when, release
        self.opens: dict[str, int] = {}
        self.lock = threading.Lock()

    def __bool__(self):
        return bool(self.block_open or self.eio_open or self.hang_when)

    def released(self) -> bool:
        return self.release is not None and os.path.exists(self.release)

    def block(self) -> None:
        while not self.released():
            time.sleep(self.POLL)

    def any_op(self) -> None:
        """Every operation: blocks while the mount is hung."""
        if self.hang_when is not None and os.path.exists(self.hang_when):
            self.block()

    def open(self, path: str) -> None:
        """An open of ``path`` (relative): blocks, or raises EIO, as configured."""
        from fuse import FuseOSError
        if any(fnmatch.fnmatchcase(path, glob) for glob in self.block_open):
            self.block()
        for glob, n in self.eio_open:
            if fnmatch.fnmatchcase(path, glob):
                with self.lock:
                    seen = self.opens[path] = self.opens.get(path, 0) + 1
                if n is None or seen <= n:
                    raise FuseOSError(errno.EIO)


def _make_fs(source: str | None, virtual: tuple[int, int, str] | None, latency: float,
             ops: set[str], faults: Faults | None = None):
    from fuse import FuseOSError, Operations
    faults = faults or Faults()
    hang = faults.any_op if faults.hang_when is not None else (lambda: None)

    def wait(op):
        hang()
        if op in ops:
            time.sleep(latency)

    class LatencyFS(Operations):
        def __init__(self):
            self.started = time.time()
            if virtual:
                classes, files, jpeg = virtual
                self.data = Path(jpeg).read_bytes()
                self.sizes = {"train": files, "val": max(1, files // 10)}
                self.classes = [f"c{c:04d}" for c in range(classes)]

        # -- the tree
        def entry(self, path: str):
            """(is_dir, real path or None) of ``path``, or None if it does not exist."""
            if not virtual:
                real = os.path.join(source, path.lstrip("/"))
                return (os.path.isdir(real), real) if os.path.lexists(real) else None
            parts = [p for p in path.split("/") if p]
            if len(parts) <= 1:
                return (True, None) if not parts or parts[0] in self.sizes else None
            if parts[1] not in self.classes or len(parts) > 3:
                return None
            if len(parts) == 2:
                return (True, None)
            name = parts[2]
            ok = (name.startswith(parts[1] + "_") and name.endswith(".JPEG")
                  and name[len(parts[1]) + 1:-5].isdigit()
                  and int(name[len(parts[1]) + 1:-5]) < self.sizes[parts[0]])
            return (False, None) if ok else None

        def names(self, path: str) -> list[tuple[str, bool]]:
            if not virtual:
                real = os.path.join(source, path.lstrip("/"))
                return [(e.name, e.is_dir()) for e in sorted(os.scandir(real), key=lambda e: e.name)]
            parts = [p for p in path.split("/") if p]
            if not parts:
                return [(s, True) for s in self.sizes]
            if len(parts) == 1:
                return [(c, True) for c in self.classes]
            return [(f"{parts[1]}_{i:05d}.JPEG", False) for i in range(self.sizes[parts[0]])]

        # -- FUSE operations
        def getattr(self, path, fh=None):
            wait("getattr")
            found = self.entry(path)
            if found is None:
                raise FuseOSError(errno.ENOENT)
            is_dir, real = found
            if real:
                st = os.lstat(real)
                return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_nlink", "st_uid",
                                                    "st_gid", "st_atime", "st_mtime", "st_ctime")}
            mode = (stat.S_IFDIR | 0o555) if is_dir else (stat.S_IFREG | 0o444)
            t = self.started
            return {"st_mode": mode, "st_nlink": 2 if is_dir else 1, "st_atime": t,
                    "st_mtime": t, "st_ctime": t, "st_size": 0 if is_dir else len(self.data)}

        def opendir(self, path):
            wait("opendir")
            return 0

        def readdir_from(self, path, offset):
            """(name, attrs, next offset) from entry ``offset`` on."""
            wait("readdir")
            entries = [(".", True), ("..", True)] + self.names(path)
            for k in range(offset, len(entries)):
                name, is_dir = entries[k]
                yield name, {"st_mode": stat.S_IFDIR if is_dir else stat.S_IFREG}, k + 1

        def open(self, path, flags):
            wait("open")
            if self.entry(path) is None:
                raise FuseOSError(errno.ENOENT)
            if faults:
                faults.open(path.lstrip("/"))
            return 0

        def read(self, path, size, offset, fh):
            # by path, so that no release is needed: an open costs one call into this process
            hang()
            if virtual:
                return self.data[offset:offset + size]
            with open(os.path.join(source, path.lstrip("/")), "rb") as f:
                f.seek(offset)
                return f.read(size)

        flush = release = None  # not called: fewer round trips through this Python process

        def statfs(self, path):
            hang()
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 20, "f_bfree": 0,
                    "f_bavail": 0, "f_namemax": 255}

    return LatencyFS()


def serve(source, mountpoint, latency, ops, virtual=None, kernel_cache=False,
          cache_seconds=1.0, faults: Faults | None = None) -> None:
    from fuse import FUSE

    class PagedFUSE(FUSE):
        """fusepy with real readdir offsets: libfuse then asks once per kernel request (a page
        of entries), so each request pays the latency, as an NFS READDIR does."""

        def readdir(self, path, buf, filler, offset, fip):
            for name, attrs, following in self.operations.readdir_from(
                    self._decode_optional_path(path), offset):
                from fuse import c_stat, set_st_attrs
                st = c_stat()
                set_st_attrs(st, attrs, use_ns=self.use_ns)
                if filler(buf, name.encode(self.encoding), st, following) != 0:
                    break
            return 0

    fs = _make_fs(source, virtual, latency, set(ops), faults)
    options = {"entry_timeout": cache_seconds, "attr_timeout": cache_seconds}
    if kernel_cache:
        options["kernel_cache"] = True
    PagedFUSE(fs, mountpoint, foreground=True, nothreads=False, ro=True, **options)


def c_daemon() -> Path:
    """``latency_fs.c`` built (once per source version) in the user's cache."""
    code = Path(__file__).with_suffix(".c")
    digest = hashlib.sha256(code.read_bytes()).hexdigest()[:12]
    binary = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wrn_large" / f"latency_fs_{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse"], check=True,
                               capture_output=True, text=True).stdout.split()
        partial = binary.with_name(binary.name + f".{os.getpid()}")
        subprocess.run(["cc", "-O2", str(code), *flags, "-o", str(partial)], check=True,
                       capture_output=True)
        os.replace(partial, binary)
    return binary


def release_file(mountpoint) -> Path:
    """The file whose existence lets blocked operations of ``mounted(mountpoint)`` answer."""
    return Path(f"{Path(mountpoint).absolute()}.release")


def hang_file(mountpoint) -> Path:
    """The file whose existence makes ``mounted(mountpoint, can_hang=True)`` stop answering."""
    return Path(f"{Path(mountpoint).absolute()}.hang")


def release(mountpoint) -> None:
    """Every blocked open (``block_open``) and a hung mount answer from now on."""
    release_file(mountpoint).touch()


def stop_answering(mountpoint) -> None:
    """The mount (``can_hang=True``) stops answering: every operation blocks until ``release``."""
    hang_file(mountpoint).touch()


@contextlib.contextmanager
def mounted(source, mountpoint: Path, latency: float = 0.002, ops=("open",), virtual=None,
            kernel_cache: bool = False, cache_seconds: float = 1.0, timeout: float = 20.0,
            engine: str = "python", block_open=(), eio_open: dict | None = None,
            can_hang: bool = False):
    """Serve ``source`` (or a virtual tree) at ``mountpoint`` from a separate process for the
    duration of the block; unmounted and stopped by PID afterwards. ``engine`` "c" serves a
    folder (not a virtual tree) from latency_fs.c.

    Fault modes (Python engine): ``block_open`` globs whose opens block until ``release``;
    ``eio_open`` {glob: N or None} whose first N opens (None: all) fail with EIO; ``can_hang``:
    ``stop_answering`` hangs every operation until ``release``. Blocked operations are released
    before the unmount."""
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    faulty = bool(block_open or eio_open or can_hang)
    for path in (release_file(mountpoint), hang_file(mountpoint)):
        path.unlink(missing_ok=True)
    if engine == "c":
        if virtual:
            raise ValueError("the C engine serves a folder, not a virtual tree")
        if faulty:
            raise ValueError("the fault modes are the Python engine's")
        options = f"ro,entry_timeout={cache_seconds:g},attr_timeout={cache_seconds:g}"
        cmd = [str(c_daemon()), str(source), str(mountpoint), str(latency), ",".join(ops),
               options + (",kernel_cache" if kernel_cache else "")]
    else:
        cmd = [sys.executable, __file__, str(source or "-"), str(mountpoint), "--latency",
               str(latency), "--ops", ",".join(ops), "--cache-seconds", str(cache_seconds)]
        if virtual:
            cmd += ["--virtual", *map(str, virtual)]
        if kernel_cache:
            cmd.append("--kernel-cache")
        for glob in block_open:
            cmd += ["--block-open", glob]
        for glob, n in (eio_open or {}).items():
            cmd += ["--eio-open", glob, "forever" if n is None else str(n)]
        if can_hang:
            cmd += ["--hang-when", str(hang_file(mountpoint))]
        if faulty:
            cmd += ["--release", str(release_file(mountpoint))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"latency_fs did not mount at {mountpoint}: "
                                   f"{proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}")
            time.sleep(0.05)
        yield mountpoint
    finally:
        if faulty:
            release(mountpoint)    # nothing stays blocked in this daemon or on its mount
        subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="folder to serve ('-' with --virtual)")
    p.add_argument("mountpoint")
    p.add_argument("--latency", type=float, default=0.002, help="seconds per operation")
    p.add_argument("--ops", default="open", help=f"comma-separated, of {','.join(ALL_OPS)}")
    p.add_argument("--virtual", nargs=3, metavar=("CLASSES", "FILES", "JPEG"))
    p.add_argument("--kernel-cache", action="store_true",
                   help="keep file data in the page cache across opens")
    p.add_argument("--cache-seconds", type=float, default=1.0,
                   help="how long the kernel caches entries and attributes (FUSE's default 1)")
    p.add_argument("--block-open", action="append", default=[], metavar="GLOB",
                   help="opens of matching paths block until --release exists (repeatable)")
    p.add_argument("--eio-open", action="append", nargs=2, default=[], metavar=("GLOB", "N"),
                   help="the first N opens of each matching path fail with EIO (N: a count or "
                        "'forever'; repeatable)")
    p.add_argument("--hang-when", metavar="FILE",
                   help="once FILE exists, every operation blocks until --release exists")
    p.add_argument("--release", metavar="FILE",
                   help="blocked operations answer once FILE exists (default: never)")
    a = p.parse_args(argv)
    virtual = (int(a.virtual[0]), int(a.virtual[1]), a.virtual[2]) if a.virtual else None
    ops = [o for o in a.ops.split(",") if o]
    unknown = set(ops) - set(ALL_OPS)
    if unknown:
        p.error(f"unknown --ops {sorted(unknown)}; valid: {', '.join(ALL_OPS)}")
    threading.stack_size(512 * 1024)
    faults = Faults(a.block_open, a.eio_open, a.hang_when, a.release)
    serve(None if virtual else os.path.abspath(a.source), a.mountpoint, a.latency, ops,
          virtual, a.kernel_cache, a.cache_seconds, faults)
    return 0


if __name__ == "__main__":
    sys.exit(main())
