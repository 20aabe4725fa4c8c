"""The reads this process has in flight, for the hang watchdog (engine/watchdog.py) to name the
file a stuck rank waits on: every open+read of a sample goes through ``reading(path)``.

``oldest_read()`` and ``abandoned_reads()`` are what the watchdog publishes; they take a lock
for a few dictionary operations and never touch the file system."""
from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager

_lock = threading.Lock()
_in_flight: dict[int, tuple[str, float]] = {}     # token -> (path, wall time it started)
_tokens = itertools.count()
_abandoned = 0


@contextmanager
def reading(path):
    token = next(_tokens)
    with _lock:
        _in_flight[token] = (str(path), time.time())
    try:
        yield
    finally:
        with _lock:
            _in_flight.pop(token, None)


def oldest_read() -> tuple[str, float] | None:
    """(path, wall time it started) of the oldest read still in flight here, or None."""
    with _lock:
        return min(_in_flight.values(), key=lambda r: r[1], default=None)


def abandoned_reads() -> int:
    """Reads given up on (a blocked open cannot be cancelled: its thread is left behind)."""
    return _abandoned


def count_abandoned(n: int = 1) -> None:
    global _abandoned
    with _lock:
        _abandoned += n
