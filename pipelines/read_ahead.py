"""Reads that hide a file system's latency: samples are read in order with up to ``depth``
reads in flight (``data.read_ahead``).

On a parallel file system (NFS, Lustre, GPFS) each open is a round trip to a metadata server,
0.5-5 ms; read one after another, 2 ms per file caps a process at ~400 files/s whatever its
decoder does. Threads are the right tool: a read waits in the kernel with the GIL released, and
the bytes land in this process with no copy through shared memory (DALI's parallel
external_source would add worker processes and a copy). Memory is bounded: at most ``depth``
files read ahead of the consumer, each the size of one encoded image (~110 KB for ImageNet).

How many threads: as many as the latency needs, not ``depth``. By Little's law the reads in
flight that keep a consumer fed are its rate times the read latency (1,000 files/s x 5 ms = 5),
so threads start at ``START_THREADS`` and one is added each time the consumer waits more than
``GROW_AFTER_S`` for the read it wants, up to ``depth``: a local disk or page cache settles at 1-3 threads, a 2 ms
mount at about latency / (consumer's time per file) + 1. ``depth`` stays the cap on files held.
The threads are daemon threads of our own pool (a ``ThreadPoolExecutor`` joins its threads at
interpreter exit, which a read blocked on a hung mount would never allow). Each stream (an
epoch's reads) has its own, ended when the stream is exhausted, closed or collected, so no
thread outlives the epoch that started it; ``close()`` (the loaders' ``close``) ends those of
streams still open.

``timeout_s`` (``data.read_timeout_s``): a read in flight longer than that is abandoned (its
thread is left blocked, replaced, and counted: ``read_guard.abandon``) and tried once more; then
its slot gets a ``read_guard.ReadTimeout`` (raised where the sample is due, or returned in place
of the bytes when ``read`` returns its errors, ``read_or_error``).
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterable, Iterator

from .read_guard import TIMEOUT_TRIES, ReadTimeout, abandon

START_THREADS = 2
GROW_AFTER_S = 0.0005   # a consumer that waited this long for its next read adds a thread


class ReadOrError:
    """``read``, returning a failed read's OSError instead of raising it (a missing file is one
    bad sample, not the end of the stream). Picklable, for worker processes that are not
    forked."""

    returns_errors = True

    def __init__(self, read: Callable[[int], bytes]):
        self.read = read

    def __call__(self, index: int):
        try:
            return self.read(index)
        except OSError as e:
            return e


def read_or_error(read: Callable[[int], bytes]) -> Callable[[int], "bytes | OSError"]:
    return ReadOrError(read)


class _Task:
    """One read submitted to the pool: when it started and in which thread."""

    __slots__ = ("read", "index", "started", "thread", "future")

    def __init__(self, read, index: int):
        self.read, self.index = read, index
        self.started, self.thread, self.future = None, None, Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        self.thread, self.started = threading.get_ident(), time.monotonic()
        try:
            self.future.set_result(self.read(self.index))
        except BaseException as e:  # noqa: BLE001 - raised where the sample is due
            self.future.set_exception(e)


def _work(tasks: queue.SimpleQueue, retired: set) -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        task.run()
        del task
        if threading.get_ident() in retired:   # abandoned, then its read came back: replaced
            retired.discard(threading.get_ident())
            return


class _Pool:
    """Daemon threads reading ``_Task``s in submission order; grown by ``grow``."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.retired: set[int] = set()
        self.threads: list[threading.Thread] = []
        self._stop = weakref.finalize(self, _stop, self.tasks, self.threads, self.retired)

    def submit(self, task: _Task) -> None:
        if self.size == 0:
            self.grow(min(START_THREADS, self.limit))
        self.tasks.put(task)

    def grow(self, n: int = 1) -> None:
        for _ in range(min(n, self.limit - self.size)):
            thread = threading.Thread(target=_work, args=(self.tasks, self.retired), daemon=True,
                                      name="read-ahead")
            thread.start()
            self.threads.append(thread)
            self.size += 1

    def replace(self, thread: int | None) -> None:
        """``thread`` is blocked in an abandoned read: it ends when (if) that read returns; a
        new thread takes its place now."""
        if thread is not None:
            self.retired.add(thread)
        self.threads[:] = [t for t in self.threads if t.ident != thread]
        self.size -= 1
        self.grow()

    def close(self) -> None:
        self._stop()   # once: later calls do nothing
        self.size = 0


def _stop(tasks: queue.SimpleQueue, threads: list, retired: set) -> None:
    while True:   # reads not started: dropped (their futures are never waited on again)
        try:
            task = tasks.get_nowait()
        except queue.Empty:
            break
        if task is not None:
            task.future.cancel()
    for _ in range(len(threads) + len(retired)):   # an abandoned one may come back for one
        tasks.put(None)
    threads.clear()


class ReadAhead:
    """``read_ahead(indices)`` yields ``read(i)`` for each index in order, reading up to
    ``depth`` ahead. A failed read raises where its sample is due, so the error names it.

    Each stream (one call) has its own threads, ended when the stream ends, is closed, or is
    collected: nothing outlives an epoch. ``close()`` ends those of every stream still open."""

    def __init__(self, read: Callable[[int], bytes], depth: int, timeout_s: float = 0.0):
        self.read, self.depth, self.timeout_s = read, depth, timeout_s
        self._pools: weakref.WeakSet = weakref.WeakSet()

    def threads(self) -> int:
        """Threads reading for this ReadAhead now (abandoned ones not counted)."""
        return sum(pool.size for pool in list(self._pools))

    def __call__(self, indices: Iterable[int]) -> Iterator[bytes]:
        if self.depth <= 1 and not self.timeout_s:
            yield from map(self.read, indices)
            return
        pool = _Pool(self.depth)
        self._pools.add(pool)
        todo = iter(indices)
        pending = deque(self.submit(pool, i) for i in itertools.islice(todo, self.depth))
        try:
            while pending:
                task = pending.popleft()
                asked = None if task.future.done() else time.monotonic()
                data = self.result(pool, task)
                if asked is not None and time.monotonic() - asked > GROW_AFTER_S:
                    pool.grow()          # the consumer waited: one more read in flight
                for i in itertools.islice(todo, 1):
                    pending.append(self.submit(pool, i))
                yield data
        finally:  # the end of the stream, or an abandoned epoch: the reads not started dropped
            for task in pending:
                task.future.cancel()
            pool.close()

    def submit(self, pool: _Pool, index: int) -> _Task:
        task = _Task(self.read, index)
        pool.submit(task)
        return task

    def result(self, pool: _Pool, task: _Task):
        """``task``'s bytes; with a timeout, a read that does not answer is abandoned and tried
        again (``TIMEOUT_TRIES`` in all), then its ``ReadTimeout``."""
        if not self.timeout_s:
            return task.future.result()
        path, pooled = None, True
        for tries in itertools.count(1):
            while not task.future.done():
                started = task.started
                if started is not None and time.monotonic() - started >= self.timeout_s:
                    break
                left = self.timeout_s if started is None else started + self.timeout_s - time.monotonic()
                try:
                    return task.future.result(timeout=max(left, 0.001))
                except TimeoutError:
                    if task.future.done():   # the read's own TimeoutError, not the wait's
                        raise
            if task.future.done():
                return task.future.result()
            path = abandon(task.thread, self.timeout_s) or path
            if pooled:
                pool.replace(task.thread)
            if tries >= TIMEOUT_TRIES:
                error = ReadTimeout(path or f"sample {task.index}", self.timeout_s)
                if getattr(self.read, "returns_errors", False):
                    return error
                raise error
            task, pooled = self.retry(task.index), False

    def retry(self, index: int) -> _Task:
        """The second try of a read that did not answer, started now in a thread of its own: at
        the back of the pool's queue it would wait behind reads that block as well (a hung
        mount), and its timeout would never start."""
        task = _Task(self.read, index)
        threading.Thread(target=task.run, daemon=True, name="read-retry").start()
        return task

    def __getstate__(self):  # a worker process starts its own threads
        return {**self.__dict__, "_pools": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _pools=weakref.WeakSet())

    def close(self) -> None:
        """Ends the threads of every stream still open (a read blocked in one ends it when it
        returns); such a stream then yields nothing more it had not read."""
        for pool in list(self._pools):
            pool.close()
