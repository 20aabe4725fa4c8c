"""``data.shuffle=shards``: a pack's shards in a random order, a few at a time
(``pipelines.base.train_permutation``), and where it is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import DataConfig, LoaderSpec, build_loader
from pipelines.base import ShardGroups, train_permutation, train_shard_indices
from pipelines.pack import pack
from trainer_utils import make_folder


def layout(num_samples: int, per_shard: int, seed: int = 0) -> np.ndarray:
    """Each sample's shard in a mixed layout: shards of ``per_shard`` samples (the last one
    shorter), the samples scattered over them."""
    shard_of = np.arange(num_samples) // per_shard
    return shard_of[np.random.default_rng(seed).permutation(num_samples)]


def test_the_global_shuffle_is_the_permutation_it_always_was():
    g = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    assert torch.equal(train_permutation(1000, 5, 2), torch.randperm(1000, generator=g))


@pytest.mark.parametrize("at_once", [1, 3, 8])
def test_shards_come_a_few_at_a_time_each_sample_once(at_once):
    shard_of = layout(1003, per_shard=50)                # 21 shards, the last of 3 samples
    groups = ShardGroups(shard_of, at_once)
    perm = train_permutation(1003, seed=7, epoch=1, groups=groups)
    assert sorted(perm.tolist()) == list(range(1003))
    shards = shard_of[perm.numpy()]
    # the order is a sequence of groups: each group's shards are read through before the next
    boundaries = [0]
    seen: set[int] = set()
    for k, shard in enumerate(shards):
        if shard not in seen and len(seen) == at_once:
            boundaries.append(k)
            seen = set()
        seen.add(int(shard))
    spans = [set(shards[a:b].tolist()) for a, b in zip(boundaries, boundaries[1:] + [1003])]
    assert all(len(span) <= at_once for span in spans)
    assert len(spans) == -(-21 // at_once)
    assert set().union(*spans) == set(range(21)) and sum(map(len, spans)) == 21
    # deterministic in (seed, epoch); another epoch is another order of the shards
    assert torch.equal(perm, train_permutation(1003, 7, 1, groups))
    other = shard_of[train_permutation(1003, 7, 2, groups).numpy()]

    def first_reads(shards):
        return list(dict.fromkeys(shards.tolist()))
    assert first_reads(other) != first_reads(shards)
    # within a group the samples are mixed, not shard after shard
    if at_once > 1:
        first = shards[:boundaries[1]] if len(boundaries) > 1 else shards
        assert (np.diff(first) != 0).sum() > len(set(first.tolist()))


def test_every_world_size_reads_the_same_global_batches():
    groups = ShardGroups(layout(96, per_shard=8), 3)
    one = train_shard_indices(96, 12, 0, 1, seed=1, epoch=0, groups=groups).view(-1, 12)
    three = torch.stack([train_shard_indices(96, 4, r, 3, 1, 0, groups).view(-1, 4)
                         for r in range(3)], 1).reshape(-1, 12)
    assert torch.equal(one, three)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"), train_per_class=8, val_per_class=2)


def test_shard_order_is_refused_where_there_are_no_mixed_shards(folder, tmp_path):
    spec = LoaderSpec("train", batch_size=4)
    with pytest.raises(ValueError, match="data.shuffle=shards reads a pack's shards a few at a "
                                         "time; .* is not a pack"):
        build_loader(DataConfig(root=str(folder), backend="torch", shuffle="shards"), spec)
    pack(str(folder), str(tmp_path / "source"), shard_mb=0.01, progress=False, layout="source")
    with pytest.raises(ValueError, match="was packed with --layout source"):
        build_loader(DataConfig(root=str(tmp_path / "source"), backend="torch",
                                shuffle="shards"), spec)
    assert "data.shuffle=shards" in DataConfig(dataset="cifar10", shuffle="shards").problem()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_loader_reads_in_the_shard_order_and_resumes_mid_epoch(folder, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("pipelines.dali")
    pack(str(folder), str(tmp_path / "pack"), shard_mb=0.01, progress=False)
    cfg = DataConfig(root=str(tmp_path / "pack"), backend=backend, image_size=32, val_resize=36,
                     workers=1, shuffle="shards", shuffle_shards=2)
    spec = LoaderSpec("train", batch_size=2, rank=1, world_size=2, seed=4)
    with build_loader(cfg, spec) as loader:
        groups = ShardGroups(loader.samples.shard if backend == "dali"
                             else loader.dataset.samples.shard, 2)
        want = train_shard_indices(24, 2, 1, 2, 4, 1, groups)
        loader.set_epoch(1)
        assert torch.equal(loader.order, want)
        assert not torch.equal(want, train_shard_indices(24, 2, 1, 2, 4, 1))
        whole = list(loader)
        loader.set_epoch(1, 2)
        tail = list(loader)
    assert len(whole) == 6 and len(tail) == 4
    for (a, la), (b, lb) in zip(whole[2:], tail):
        assert torch.equal(a, b) and torch.equal(la, lb)
