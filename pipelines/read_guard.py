"""Where a sample read is guarded: the reads this process has in flight (for the hang watchdog,
engine/watchdog.py, to name the file a stuck rank waits on), transient errors retried, reads
that never answer given up on.

- Every open+read of a sample (``folder.Samples.read``, ``pack.PackedSamples.read``) runs inside
  ``reading(path)``. ``oldest_read()`` and ``abandoned_reads()`` are what the watchdog
  publishes; they take a lock for a few dictionary operations and never touch the file system.
- ``Retrying(read)``: a transient ``OSError`` (EIO, ESTALE, ETIMEDOUT, EAGAIN, EINTR, ... from a
  parallel file system's hiccup: ``TRANSIENT``) is retried after 0.1, 0.4 and 1.6 s
  (``BACKOFF_S``) before it is returned as a failed read, which ``quarantine.BadImagePolicy``
  turns into a bad image (``on_bad_image=skip``) or a stop naming the file. A permanent error
  (ENOENT, EACCES, EISDIR, ...) fails at once. Only a decode failure or a persistent read failure
  quarantines a file.
- ``data.read_timeout_s``: a read that has not answered after that long is abandoned (a thread
  blocked in ``open`` on a hung mount cannot be cancelled: it is left behind, counted by
  ``abandoned_reads()``) and tried once more; then it fails with ``ReadTimeout`` (an
  ``OSError`` with ETIMEDOUT naming the path and the seconds). The reads that are already in
  threads (``read_ahead.ReadAhead``) are timed there, with no extra thread per read;
  ``timed(read, timeout_s)`` times a read made on its own (a substitute, a single sample). When
  ``HUNG_AFTER`` reads in a process are abandoned within ``HUNG_WINDOW`` read timeouts, one
  error says the file system looks hung (a few bad files over days do not).
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager

log = logging.getLogger(__name__)

TRANSIENT = frozenset((errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR,
                       errno.EBUSY, errno.ENOLINK, errno.ECOMM, errno.EREMOTEIO, errno.ENOTCONN,
                       errno.ECONNRESET, errno.ECONNABORTED, errno.ENETRESET, errno.ENETUNREACH,
                       errno.EHOSTUNREACH, errno.EHOSTDOWN))
BACKOFF_S = (0.1, 0.4, 1.6)   # pauses before the 2nd, 3rd and 4th try of a transient error
TIMEOUT_TRIES = 2             # a read that times out: abandoned, tried once more, then failed
HUNG_AFTER = 4                # abandoned reads in a process past which the mount looks hung,
HUNG_WINDOW = 10              # if they came within this many read timeouts of each other


def longest_read_s(timeout_s: float) -> float:
    """The longest a sample read can take before it is given up on (``data.read_timeout_s``):
    the hang watchdog's timeout must exceed it, or a file that never answers ends the job
    (and its restarts, each stuck on the same file) instead of being skipped."""
    return TIMEOUT_TRIES * timeout_s + sum(BACKOFF_S)

_lock = threading.Lock()
_in_flight: dict[int, tuple[str, float]] = {}     # token -> (path, wall time it started)
_by_thread: dict[int, int] = {}                   # thread ident -> token of its read
_given_up: set[int] = set()                       # tokens of abandoned reads still blocked
_tokens = itertools.count()
_abandoned = 0
_abandoned_paths: list[str] = []
_abandon_times: deque = deque(maxlen=HUNG_AFTER)   # monotonic times of the latest
_said_hung = [float("-inf")]                     # when the file system was last said hung


@contextmanager
def reading(path):
    token, thread = next(_tokens), threading.get_ident()
    with _lock:
        _in_flight[token] = (str(path), time.time())
        _by_thread[thread] = token
    try:
        yield
    finally:
        with _lock:
            _in_flight.pop(token, None)
            _given_up.discard(token)
            if _by_thread.get(thread) == token:
                del _by_thread[thread]


def oldest_read() -> tuple[str, float] | None:
    """(path, wall time it started) of the oldest read still in flight here and not abandoned
    (an abandoned one stays blocked, but the process has moved on), or None."""
    with _lock:
        return min((r for t, r in _in_flight.items() if t not in _given_up),
                   key=lambda r: r[1], default=None)


def abandoned_reads() -> int:
    """Reads given up on (a blocked open cannot be cancelled: its thread is left behind)."""
    return _abandoned


def abandon(thread: int | None, seconds: float) -> str | None:
    """The read that ``thread`` (an ident) has in flight is given up on: counted, left out of
    ``oldest_read``; its path (None if the thread is in no ``reading``). ``HUNG_AFTER`` abandoned
    within ``HUNG_WINDOW`` timeouts log that the file system looks hung."""
    global _abandoned
    with _lock:
        token = _by_thread.get(thread) if thread is not None else None
        path = _in_flight[token][0] if token in _in_flight else None
        if token is not None:
            _given_up.add(token)
        _abandoned += 1
        count = _abandoned
        now = time.monotonic()
        _abandon_times.append(now)
        window = HUNG_WINDOW * seconds
        hung = (len(_abandon_times) == HUNG_AFTER and now - _abandon_times[0] <= window
                and now - _said_hung[0] > window)
        if hung:
            _said_hung[0] = now
        if path is not None:
            _abandoned_paths[:] = [*_abandoned_paths[-15:], path]
        paths = list(_abandoned_paths)
    log.warning("read abandoned after %g s (data.read_timeout_s; its thread stays blocked): %s",
                seconds, path or "unknown path")
    if hung:
        where = os.path.commonpath(paths[-HUNG_AFTER:]) if paths else "unknown"
        log.error("the file system looks hung: %d reads abandoned in this process within %g s "
                  "(%d in all), after %g s each (data.read_timeout_s), under %s", HUNG_AFTER,
                  now - _abandon_times[0], count, seconds, where)
    return path


class ReadTimeout(TimeoutError):
    """A read that did not answer in ``data.read_timeout_s`` (an OSError, ETIMEDOUT)."""

    def __init__(self, path: str, seconds: float, tries: int = TIMEOUT_TRIES):
        super().__init__(errno.ETIMEDOUT, f"no answer in {seconds:g} s, {tries} tries "
                         f"(data.read_timeout_s={seconds:g}): a hung file server or mount?", path)
        self.seconds, self.tries = seconds, tries

    def __reduce__(self):   # picklable from a DataLoader worker
        return ReadTimeout, (self.filename, self.seconds, self.tries)


class ShardUnreadable(OSError):
    """A read from a shard in object storage that failed after the object store's retries
    (EIO: transient, so ``Retrying`` tries it again), or a shard object that is gone (ENOENT:
    not tried again); what still fails is one event for the whole shard,
    ``quarantine.Quarantine`` sets its samples aside at once. ``shard``: its URL."""

    def __init__(self, shard: str, why: str, code: int = errno.EIO):
        super().__init__(code, f"unreadable shard {shard}: {why}")
        self.shard, self.why = shard, why

    def __reduce__(self):   # picklable from a DataLoader worker
        return ShardUnreadable, (self.shard, self.why, self.errno)


class SourceUnusable(OSError):
    """The data source itself cannot be read (credentials expired or refused, access denied,
    the bucket gone): not bad data. Fatal whatever ``data.on_bad_image`` says, nothing
    quarantined (healthy images are never set aside because credentials expired). One line
    naming the URL."""

    NOTE = "(the data cannot be read at all: no image was quarantined)"

    def __init__(self, why: str):   # re-raised from a DataLoader worker: the note is there
        super().__init__(why if self.NOTE in why else f"{why} {self.NOTE}")
        self.why = why

    def __reduce__(self):   # picklable from a DataLoader worker
        return SourceUnusable, (self.why,)


def transient(error: BaseException) -> bool:
    """A read error worth trying again (not ``ReadTimeout``: a timeout is retried once, by
    whoever timed it)."""
    return (isinstance(error, OSError) and not isinstance(error, ReadTimeout)
            and error.errno in TRANSIENT)


class Retrying:
    """``read(index)``, its transient OSErrors tried again after each pause of ``backoff``;
    picklable (for worker processes)."""

    def __init__(self, read, backoff: tuple[float, ...] = BACKOFF_S):
        self.read, self.backoff = read, tuple(backoff)

    def __call__(self, index: int) -> bytes:
        for pause in (*self.backoff, None):
            try:
                return self.read(index)
            except OSError as e:
                if pause is None or not transient(e):
                    raise
                log.info("transient read error (%s), trying again in %g s", e, pause)
                time.sleep(pause)


class Timed:
    """``read(index)`` in a daemon thread of its own, given up on after ``timeout_s`` (and
    tried once more: ``ReadTimeout`` after ``TIMEOUT_TRIES``). For reads made one at a time;
    ``read_ahead.ReadAhead`` times the reads it already runs in threads. Picklable."""

    def __init__(self, read, timeout_s: float):
        self.read, self.timeout_s = read, timeout_s

    def __call__(self, index: int) -> bytes:
        path = None
        for _ in range(TIMEOUT_TRIES):
            box: dict = {}
            done = threading.Event()

            def run():
                try:
                    box["data"] = self.read(index)
                except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                    box["error"] = e
                finally:
                    done.set()

            thread = threading.Thread(target=run, daemon=True, name="read-timed")
            thread.start()
            if done.wait(self.timeout_s):
                if "error" in box:
                    raise box["error"]
                return box["data"]
            path = abandon(thread.ident, self.timeout_s) or path
        raise ReadTimeout(path or f"sample {index}", self.timeout_s)


def timed(read, timeout_s: float):
    """``read`` timed after ``timeout_s`` (0: ``read`` itself, in the caller's thread)."""
    return Timed(read, timeout_s) if timeout_s and timeout_s > 0 else read
