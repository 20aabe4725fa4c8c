"""The data set is listed once per job (engine/listings.py), in real gloo processes: rank 0
walks (or validates the cached listing), the others read its pinned listing, and every rank
holds the same list or every rank stops naming the difference."""
from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from pipeline_data import write_jpeg_folder

WORLD = 3


def _rank(rank: int, init: str, data: str, cache: str, run_dir: str, drop_on_rank: int,
          local_on_rank: int) -> None:
    import torch.distributed as dist

    from engine.distributed import DistInfo
    from engine.listings import ListingMismatch, agree, list_once
    from pipelines import folder
    counts = {"walks": 0, "validations": 0}

    def counting(name, fn):
        def wrapped(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapped
    folder.walk_folder = counting("walks", folder.walk_folder)
    folder.unchanged = counting("validations", folder.unchanged)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        from pipelines.config import DataConfig
        cfg = DataConfig(root=data, backend="torch", listing_cache=cache)
        from pathlib import Path
        listings = Path(run_dir) / ("listings" if rank != local_on_rank else f"local{rank}")
        try:
            held = list_once(cfg, DistInfo(rank, WORLD), listings)
        except Exception as e:  # noqa: BLE001
            counts["error"] = f"{type(e).__name__}: {e}"
            return
        counts["train"] = len(held["train"])
        if drop_on_rank == rank:    # a rank that looked at a changed tree
            held["train"].files.pop(4)
            held["train"].labels.pop(4)
        try:
            agree("train", held["train"], DistInfo(rank, WORLD))
        except ListingMismatch as e:
            counts["mismatch"] = str(e)
    finally:
        dist.destroy_process_group()
        Path(run_dir, f"counts{rank}.json").write_text(json.dumps(counts))


def run_job(tmp_path, name, data, cache, drop_on_rank=-1, local_on_rank=-1) -> list[dict]:
    run_dir = tmp_path / name
    run_dir.mkdir()
    mp.spawn(_rank, args=(str(tmp_path / f"{name}.init"), str(data), str(cache), str(run_dir),
                          drop_on_rank, local_on_rank), nprocs=WORLD, join=True)
    return [json.loads((run_dir / f"counts{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.timeout(180)
def test_one_rank_lists_per_job_and_every_rank_holds_the_same_list(tmp_path):
    data = tmp_path / "data"
    write_jpeg_folder(data, per_class=4)
    cache = tmp_path / "cache"
    cold = run_job(tmp_path, "cold", data, cache)
    assert sum(c["walks"] for c in cold) == 2             # train and val, by rank 0 alone
    assert cold[0]["walks"] == 2
    assert [c["train"] for c in cold] == [12] * WORLD
    assert not any("mismatch" in c for c in cold)
    warm = run_job(tmp_path, "warm", data, cache)          # a new job on the cached listing
    assert sum(c["walks"] for c in warm) == 0
    assert sum(c["validations"] for c in warm) == 2       # once per split per job, on rank 0
    assert warm[0]["validations"] == 2


@pytest.mark.timeout(180)
def test_ranks_holding_different_lists_stop_naming_the_first_difference(tmp_path):
    data = tmp_path / "data"
    write_jpeg_folder(data, per_class=4)
    counts = run_job(tmp_path, "job", data, "off", drop_on_rank=2)
    for c in counts:   # every rank raises, with the same message
        assert "rank 2" in c["mismatch"] and "sample 4" in c["mismatch"], c
    assert len({c["mismatch"] for c in counts}) == 1


@pytest.mark.timeout(180)
def test_a_rank_that_cannot_see_the_pinned_listing_ends_every_rank(tmp_path):
    """A run directory that is not shared (node-local): rank 2 cannot read what rank 0 pinned.
    It says so, and the others stop too instead of waiting in the digest's collective."""
    data = write_jpeg_folder(tmp_path / "data", per_class=4)
    counts = run_job(tmp_path, "job", data, "off", local_on_rank=2)
    assert "not there on this node" in counts[2]["error"], counts
    for c in counts[:2]:
        assert c["error"].startswith("RuntimeError: rank 2 could not list"), counts
