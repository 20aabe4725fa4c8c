"""Where samples come from, apart from how they become tensors.

A *source* turns ``data.root`` into a split's ``Samples`` (below): a folder
(``folder.py``; a file list is the folder read through the list), a pack (``pack.py``).
The backends (DALI, torch) only ever call ``open_samples``; a source never decodes.

A new source (object storage, say) is one new file that reads its samples, plus one
``register_source(Source(...))`` line here naming the URL schemes it reads. Sources do not
import this module: it imports them. Nothing here imports torch, so the config checks can ask
``root_problem(data.root)`` in a fraction of a second.

A URL (``scheme://...``) is only ever read by the source that owns its scheme: it is never
taken for a local path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from . import folder, pack, s3_pack
from .folder import url_scheme


@runtime_checkable
class Samples(Protocol):
    """A split's samples by index, as every backend reads them. Picklable (DataLoader workers
    receive it); a source may add ``root`` and ``files`` (paths relative to the split, which
    ``bad_images.txt`` then lists in DALI's file-list format)."""

    labels: list[int]
    classes: list[str]             # class names in label order

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes: ...        # the encoded image; OSError if it cannot

    def describe(self, index: int) -> str: ...      # sample ``index`` as a user finds it


@dataclass(frozen=True)
class Source:
    """One place samples come from.

    ``open(root, split, file_list=, listing_cache=, pinned=)`` gives the split's ``Samples``
    (options that do not apply to the source are ignored, or refused where the user set them);
    ``problem(root)`` says what makes ``root`` unreadable for it, or None, without listing it;
    ``schemes``: the URL schemes it reads (none: local paths); ``claims(path)``: whether a
    local path is this source's (a pack: its ``pack.json``); the folder source takes the rest."""

    name: str
    open: Callable[..., Samples]
    problem: Callable[[str], "str | None"] = lambda root: None
    schemes: tuple[str, ...] = ()
    claims: Callable[[str], bool] | None = None


_sources: dict[str, Source] = {}
LOCAL_FALLBACK = "folder"


def register_source(source: Source) -> Source:
    for scheme in source.schemes:
        owner = next((s.name for s in _sources.values() if scheme in s.schemes), None)
        if owner is not None and owner != source.name:
            raise ValueError(f"{scheme}:// is read by the {owner} source already")
    _sources[source.name] = source
    return source


register_source(Source("pack", pack.open_pack, pack.pack_problem, claims=pack.is_pack))
register_source(Source(LOCAL_FALLBACK, folder.open_folder, folder.folder_problem))
register_source(Source("s3", s3_pack.open_s3_pack, s3_pack.s3_pack_problem, schemes=("s3",)))


def available_sources() -> list[str]:
    return list(_sources)


def _unread_scheme(root: str, scheme: str) -> str:
    readers = [f"{s.name} ({', '.join(x + '://' for x in s.schemes)})" if s.schemes else s.name
               for s in _sources.values()]
    return f"no data source reads {scheme}:// URLs (sources: {', '.join(readers)}): {root}"


def source_for(root: str | os.PathLike) -> Source:
    """The source that reads ``root``: a URL's by its scheme, a local path's by what it holds."""
    scheme = url_scheme(root)
    if scheme is not None:
        for source in _sources.values():
            if scheme in source.schemes:
                return source
        raise ValueError(_unread_scheme(str(root), scheme))
    for source in _sources.values():
        if source.claims is not None and source.claims(root):
            return source
    return _sources[LOCAL_FALLBACK]


def open_samples(root: str | os.PathLike, split: str, file_list: str | None = None,
                 listing_cache: str = "auto", pinned: Path | None = None,
                 shard_cache: str | None = None) -> Samples:
    """A split's samples from whichever source reads ``root`` (``data.root``).

    ``file_list``: ``data.file_list`` (the folder source reads the folder through it);
    ``listing_cache``: ``data.listing_cache``; ``pinned``: where the run pins the listing of its
    first start (``LoaderSpec.pinned_listing``), so a resumed run reads the same samples;
    ``shard_cache``: ``data.shard_cache`` (for an s3:// pack)."""
    return source_for(root).open(root, split, file_list=file_list, listing_cache=listing_cache,
                                 pinned=pinned, shard_cache=shard_cache)


def root_problem(root: str | os.PathLike | None) -> str | None:
    """What is wrong with a ``data.root`` value, in one line, or None. Cheap: no listing, no
    torch. None (the built-in default data set) is fine; a URL is checked by the source that
    owns its scheme (an error if none does); a local path must exist, then its source checks
    it (a pack's manifest; the folder source: a folder, not a file)."""
    if root is None:
        return None
    scheme = url_scheme(root)
    if scheme is not None and not any(scheme in s.schemes for s in _sources.values()):
        return _unread_scheme(str(root), scheme)
    if scheme is None and not Path(root).exists():
        return f"data.root={root} does not exist"
    return source_for(root).problem(str(root))
