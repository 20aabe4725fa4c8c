"""Bad images met during training (``data.on_bad_image=skip``): quarantined, replaced, counted.

A file can go bad after ``verify`` ran (a partial re-sync, a disk error, a growing data set).
With ``skip`` a file that cannot be read or decoded costs one log line and a substitute, never
the job:

- the substitute of sample i in epoch e is a function of (seed, e, i) and of the quarantine
  (the first of a fixed sequence of candidates that is not quarantined), never a draw at run
  time: every rank still yields its full batches, N processes still see what 1 process with
  accumulation sees, and a resumed epoch replays what an uninterrupted one saw (the
  quarantine travels with the checkpoint);
- evaluation drops the sample instead (a substitute would count another image twice) and the
  reported accuracy says over how many images it was computed;
- past ``data.max_bad_images`` (default: 0.1% of the split, at least 1) the run stops with the
  list: many bad files mean a broken mount, not bad luck.

``bad_images.txt`` in the run directory lists them in DALI's file-list format (``relative/path
label``, relative to the split folder, as ``verify``'s clean lists), each under a ``#`` line with
the split and reason: ``python -m pipelines verify DATA_DIR --exclude RUN/bad_images.txt``
writes clean lists without them for ``data.file_list``.

Who holds what: the caller that builds a loader owns the split's ``Quarantine``
(``quarantine_for(cfg, split)``, passed as ``LoaderSpec.quarantine``; ``build_loader`` makes one
where the caller passes none) and reads its state from its own object; the backend binds it to
the samples and fills it. The policy itself, which sample fills a slot and what a bad one
costs, is ``BadImagePolicy``, the one loop both backends (DALI, torch) call.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

from .read_ahead import ReadAhead, read_or_error
from .read_guard import Retrying, ShardUnreadable, SourceUnusable, timed
from .sample_rng import sample_uniforms

log = logging.getLogger(__name__)
CANDIDATES = 64   # substitutes tried in turn; past them the data set is mostly bad anyway
BAD_IMAGES = "bad_images.txt"


class TooManyBadImages(RuntimeError):
    pass


class CorruptImageError(RuntimeError):
    """A sample that cannot be read or decoded under ``data.on_bad_image=stop``, named."""


VERIFY_HINT = ("Run `python -m pipelines verify DATA_DIR` to list every bad file, and train on the "
               "clean list it writes (data.file_list=...).")


class BadImage(Exception):
    """Raised by a backend's check of one sample's bytes: ``reason`` is why they cannot be used
    (what the quarantine records)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Quarantine:
    """One split's quarantined samples (index -> reason).

    Made before its samples are known (``quarantine_for``: by whoever builds the loader, who
    keeps it and checkpoints ``state()``); the backend ``bind``s it to the split's samples.

    A shard of a pack in object storage that stays unreadable (``read_guard.ShardUnreadable``)
    is one event: every sample of the shard is quarantined at once under one reason naming the
    shard (``unreadable shard URL: why``), logged once and counted against ``shard_limit``
    (``data.max_bad_shards``), not against the image budget. The state stays index -> reason:
    the shards are read back from the reasons (a checkpoint's, another rank's)."""

    def __init__(self, split: str, limit: int | None = None, shard_limit: int | None = None):
        self.split, self._limit, self._shard_limit = split, limit, shard_limit
        self.samples, self.size = None, 0
        self.bad: dict[int, str] = {}

    def bind(self, samples) -> "Quarantine":
        """Its samples (``pipelines.sources.Samples``): what indices mean, and the default limit
        (0.1% of the split, at least 1). Bound again, it must be to as many samples."""
        if self.samples is not None and len(samples) != self.size:
            raise ValueError(f"the {self.split} quarantine holds indices of {self.size} samples, "
                             f"not of {len(samples)}: one quarantine per split and sample list")
        self.samples, self.size = samples, len(samples)
        return self

    @property
    def limit(self) -> int:
        return self._limit if self._limit is not None else max(1, self.size // 1000)

    @property
    def shard_limit(self) -> int:
        """``data.max_bad_shards`` (None: 0.1% of the split's shards, at least 1)."""
        shards = len(getattr(self.samples, "shards", ()))
        return self._shard_limit if self._shard_limit is not None else max(1, shards // 1000)

    def __contains__(self, index: int) -> bool:
        return index in self.bad

    def __len__(self) -> int:
        return len(self.bad)

    def describe(self, index: int) -> str:
        return self.samples.describe(index) if self.samples is not None else f"sample {index}"

    def bad_images(self) -> dict[int, str]:
        """The samples quarantined one by one (not as part of an unreadable shard)."""
        return {i: r for i, r in self.bad.items() if shard_of(r) is None}

    def bad_shards(self) -> dict[str, str]:
        """Unreadable shards: URL -> reason."""
        return {shard: r for r in self.bad.values() if (shard := shard_of(r)) is not None}

    def add(self, index: int, reason: str) -> None:
        if index in self.bad:
            return
        if shard_of(reason) is not None:
            return self.add_shard(index, reason)
        self.bad[index] = reason
        images = self.bad_images()
        log.warning("bad image quarantined (%d of at most %d, data.max_bad_images): %s: %s",
                    len(images), self.limit, self.describe(index), reason)
        if len(images) > self.limit:
            listing = "\n".join(f"  {self.describe(i)}: {r}" for i, r in images.items())
            raise TooManyBadImages(
                f"{len(images)} bad images in the {self.split} split, more than "
                f"data.max_bad_images={self.limit}: a broken mount or data set, not bad luck. "
                f"Check the data (python -m pipelines verify), then resume:\n{listing}")

    def add_shard(self, index: int, reason: str) -> None:
        """Every sample of the shard holding ``index``, under ``reason`` (which names it)."""
        members = getattr(self.samples, "shard_members", lambda i: [i])(index)
        for i in members:
            self.bad.setdefault(i, reason)
        shards = self.bad_shards()
        log.warning("unreadable shard quarantined (%d of at most %d, data.max_bad_shards), its "
                    "%d samples set aside: %s", len(shards), self.shard_limit, len(members), reason)
        if len(shards) > self.shard_limit:
            listing = "\n".join(f"  {r}" for r in shards.values())
            raise TooManyBadImages(
                f"{len(shards)} unreadable shards in the {self.split} split, more than "
                f"data.max_bad_shards={self.shard_limit}: a broken bucket or connection, not "
                f"bad luck. Check the pack's objects, then resume:\n{listing}")

    def substitute(self, index: int, seed: int, epoch: int) -> int:
        """``index`` itself, or for a quarantined sample the first good one of its candidates."""
        if index not in self.bad:
            return index
        for u in sample_uniforms(seed, epoch, [index], CANDIDATES)[0]:
            candidate = int(u * self.size)
            if candidate not in self.bad:
                return candidate
        raise TooManyBadImages(f"no good substitute for {self.describe(index)} among "
                               f"{CANDIDATES} candidates")

    # ---- the checkpoint's and the other ranks' view
    def state(self) -> dict[int, str]:
        return dict(self.bad)

    def merge(self, state: dict) -> None:
        """Another rank's (or a checkpoint's) quarantine: skipped here from now on."""
        for index, reason in state.items():
            self.bad.setdefault(int(index), reason)

    def listing(self) -> list[str]:
        """Its lines of ``bad_images.txt``."""
        lines = []
        for index, reason in sorted(self.bad.items()):
            files = getattr(self.samples, "files", None)
            relative = files[index] if files is not None else self.describe(index)
            label = self.samples.labels[index] if self.samples is not None else -1
            lines += [f"# {self.split}: {self.describe(index)}: {reason}", f"{relative} {label}"]
        return lines


_SHARD_EVENT = re.compile(r"^unreadable shard (\S+): ")


def shard_of(reason: str) -> str | None:
    """The shard a quarantine reason names as unreadable (``read_guard.ShardUnreadable``)."""
    match = _SHARD_EVENT.match(reason)
    return match.group(1) if match else None


def raise_if_folder_gone(samples, index: int, error: Exception) -> None:
    """A missing file whose class folder is gone too is no bad image but a broken data set (an
    unmounted or deleted folder): an error naming the folder, whatever data.on_bad_image says."""
    if isinstance(error, FileNotFoundError) and hasattr(samples, "files"):
        folder = (samples.root / samples.files[index]).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is gone (a class folder of the data set: an "
                                    f"unmounted or deleted folder, not a bad image)")


def quarantine_for(cfg, split: str) -> Quarantine | None:
    """The split's quarantine under ``data.on_bad_image=skip`` (unbound: the backend binds it
    to the samples); None under ``stop``."""
    if cfg.on_bad_image not in ("skip", "stop"):
        raise ValueError(f"data.on_bad_image={cfg.on_bad_image!r}: valid: skip, stop")
    if cfg.on_bad_image == "stop":
        return None
    return Quarantine(split, cfg.max_bad_images, cfg.max_bad_shards)


class BadImagePolicy:
    """``data.on_bad_image``, written once for every backend: which sample fills a slot of the
    epoch's order, and what happens when its bytes cannot be used.

    - ``stop`` (no quarantine): ``CorruptImageError`` naming the file;
    - ``skip``, training: the sample is quarantined and the slot takes its substitute (a
      function of (seed, epoch, slot) and the quarantine), checked in turn;
    - ``skip``, evaluation (``drop_bad``): quarantined and left out (``resolve`` gives None).

    A failed read (an ``OSError`` in place of the bytes, ``read_ahead.read_or_error``) is a bad
    image unless its class folder is gone (an error naming the folder). Reads are guarded
    (``read_guard``): a transient error is tried again with backoff before it counts, a read
    that does not answer in ``read_timeout_s`` (``data.read_timeout_s``, 0: never given up on)
    is abandoned, tried once more, then counts as failed (``ReadTimeout``, naming the path).
    ``read_one`` reads one sample (in a thread of its own when timed); ``reader(depth)`` is a
    ``ReadAhead`` of the same reads, timed in the threads it has anyway. The backend's ``check``
    judges the bytes: it returns what the backend needs of them (a decoded image, a size) or
    raises ``BadImage(reason)``. ``found``, if given, collects (index, reason) of what this
    call quarantined, for a worker process to report to the loader's quarantine."""

    def __init__(self, samples, quarantine: Quarantine | None, seed: int, drop_bad: bool,
                 read_timeout_s: float = 0.0):
        self.samples, self.quarantine = samples, quarantine
        self.seed, self.drop_bad, self.read_timeout_s = seed, drop_bad, read_timeout_s
        self.read_each = Retrying(samples.read)            # raises what it could not read
        self.read_one = read_or_error(timed(self.read_each, read_timeout_s))

    def reader(self, depth: int) -> ReadAhead:
        """A ``ReadAhead`` of this policy's reads (errors returned in place of the bytes)."""
        return ReadAhead(read_or_error(self.read_each), depth, self.read_timeout_s)

    def wanted(self, slot: int, epoch: int) -> int:
        """The sample to read for ``slot`` as the quarantine is now."""
        if self.quarantine is None or self.drop_bad:
            return slot
        return self.quarantine.substitute(slot, self.seed, epoch)

    def resolve(self, slot: int, epoch: int, read: int, data, check: Callable,
                found: list | None = None) -> tuple[int, object, object] | None:
        """(sample used for ``slot``, its bytes, ``check``'s result), or None for a dropped one.
        ``data``: what was read ahead for sample ``read`` (read again here if the quarantine has
        grown since and the slot now wants another sample)."""
        index = self.wanted(slot, epoch)
        if index != read:
            data = self.read_one(index)
        while True:
            if self.drop_bad and self.quarantine is not None and index in self.quarantine:
                return None
            if isinstance(data, SourceUnusable):     # not bad data: the end, nothing set aside
                raise data
            try:
                if isinstance(data, ShardUnreadable):
                    raise BadImage(data.strerror)          # names the shard: one event
                if isinstance(data, OSError):
                    raise_if_folder_gone(self.samples, index, data)
                    raise BadImage(f"cannot read: {data.strerror or data}")
                return index, data, check(index, data)
            except BadImage as bad:
                if self.quarantine is None:
                    cause = bad.__cause__ or (data if isinstance(data, OSError) else None)
                    raise CorruptImageError(f"{self.samples.describe(index)} ({bad.reason}). "
                                            f"{VERIFY_HINT}") from cause
                self.quarantine.add(index, bad.reason)
                if found is not None:
                    found.append((index, bad.reason))
            index = self.wanted(slot, epoch)
            data = self.read_one(index)


def read_bad_images(path) -> set[str]:
    """The relative paths a ``bad_images.txt`` lists."""
    from pathlib import Path
    return {line.rsplit(maxsplit=1)[0] for line in Path(path).read_text().splitlines()
            if line.strip() and not line.startswith("#")}
