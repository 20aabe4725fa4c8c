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
"""
from __future__ import annotations

import logging

from .sample_rng import sample_uniforms

log = logging.getLogger(__name__)
CANDIDATES = 64   # substitutes tried in turn; past them the data set is mostly bad anyway
BAD_IMAGES = "bad_images.txt"


class TooManyBadImages(RuntimeError):
    pass


class Quarantine:
    """One split's quarantined samples (index -> reason) of a ``Samples``."""

    def __init__(self, split: str, samples, limit: int | None = None):
        self.split, self.samples, self.size = split, samples, len(samples)
        self.limit = limit if limit is not None else max(1, self.size // 1000)
        self.bad: dict[int, str] = {}

    def __contains__(self, index: int) -> bool:
        return index in self.bad

    def __len__(self) -> int:
        return len(self.bad)

    def add(self, index: int, reason: str) -> None:
        if index in self.bad:
            return
        self.bad[index] = reason
        log.warning("bad image quarantined (%d of at most %d, data.max_bad_images): %s: %s",
                    len(self.bad), self.limit, self.samples.describe(index), reason)
        if len(self.bad) > self.limit:
            listing = "\n".join(f"  {self.samples.describe(i)}: {r}" for i, r in self.bad.items())
            raise TooManyBadImages(
                f"{len(self.bad)} bad images in the {self.split} split, more than "
                f"data.max_bad_images={self.limit}: a broken mount or data set, not bad luck. "
                f"Check the data (python -m pipelines verify), then resume:\n{listing}")

    def substitute(self, index: int, seed: int, epoch: int) -> int:
        """``index`` itself, or for a quarantined sample the first good one of its candidates."""
        if index not in self.bad:
            return index
        for u in sample_uniforms(seed, epoch, [index], CANDIDATES)[0]:
            candidate = int(u * self.size)
            if candidate not in self.bad:
                return candidate
        raise TooManyBadImages(f"no good substitute for {self.samples.describe(index)} among "
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
            relative = files[index] if files is not None else self.samples.describe(index)
            lines += [f"# {self.split}: {self.samples.describe(index)}: {reason}",
                      f"{relative} {self.samples.labels[index]}"]
        return lines


def raise_if_folder_gone(samples, index: int, error: Exception) -> None:
    """A missing file whose class folder is gone too is no bad image but a broken data set (an
    unmounted or deleted folder): an error naming the folder, whatever data.on_bad_image says."""
    if isinstance(error, FileNotFoundError) and hasattr(samples, "files"):
        folder = (samples.root / samples.files[index]).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is gone (a class folder of the data set: an "
                                    f"unmounted or deleted folder, not a bad image)")


def quarantine_for(cfg, split: str, samples) -> Quarantine | None:
    """The split's quarantine under ``data.on_bad_image=skip``; None under ``stop``."""
    if cfg.on_bad_image not in ("skip", "stop"):
        raise ValueError(f"data.on_bad_image={cfg.on_bad_image!r}: valid: skip, stop")
    return Quarantine(split, samples, cfg.max_bad_images) if cfg.on_bad_image == "skip" else None


def read_bad_images(path) -> set[str]:
    """The relative paths a ``bad_images.txt`` lists."""
    from pathlib import Path
    return {line.rsplit(maxsplit=1)[0] for line in Path(path).read_text().splitlines()
            if line.strip() and not line.startswith("#")}
