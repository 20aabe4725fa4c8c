"""Reads that hide a file system's latency: samples are read in order with up to ``depth``
reads in flight (``data.read_ahead``).

On a parallel file system (NFS, Lustre, GPFS) each open is a round trip to a metadata server,
0.5-5 ms; read one after another, 2 ms per file caps a process at ~400 files/s whatever its
decoder does. Threads are the right tool: a read waits in the kernel with the GIL released, and
the bytes land in this process with no copy through shared memory (DALI's parallel
external_source would add worker processes and a copy). Memory is bounded: at most ``depth``
files read ahead of the consumer, each the size of one encoded image (~110 KB for ImageNet).
"""
from __future__ import annotations

import functools
import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def read_or_error(read: Callable[[int], bytes]) -> Callable[[int], "bytes | OSError"]:
    """``read``, returning a failed read's OSError instead of raising it (a missing file is one
    bad sample, not the end of the stream). Picklable, for worker processes that are not forked."""
    return functools.partial(_read_or_error, read)


def _read_or_error(read, index: int):
    try:
        return read(index)
    except OSError as e:
        return e


class ReadAhead:
    """``read_ahead(indices)`` yields ``read(i)`` for each index in order, reading up to
    ``depth`` ahead. A failed read raises where its sample is due, so the error names it."""

    def __init__(self, read: Callable[[int], bytes], depth: int):
        self.read, self.depth = read, depth
        self._pool: ThreadPoolExecutor | None = None
        self._pid = None

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pid != os.getpid():  # not a pool inherited by fork
            self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="read-ahead")
            self._pid = os.getpid()
        return self._pool

    def __call__(self, indices: Iterable[int]) -> Iterator[bytes]:
        if self.depth <= 1:
            yield from map(self.read, indices)
            return
        pool, todo = self.pool(), iter(indices)
        pending = deque(pool.submit(self.read, i) for i in itertools.islice(todo, self.depth))
        try:
            while pending:
                data = pending.popleft().result()
                for i in itertools.islice(todo, 1):
                    pending.append(pool.submit(self.read, i))
                yield data
        finally:  # an abandoned epoch: drop the reads not yet started
            for future in pending:
                future.cancel()

    def __getstate__(self):  # a worker process starts its own threads
        return {**self.__dict__, "_pool": None, "_pid": None}

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
