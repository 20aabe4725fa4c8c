"""CIFAR-10/100 and SVHN from files in their real formats (pickles, .mat)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines import DataConfig, LoaderSpec, build_loader
from pipelines.small_datasets import fit_zca, pad_crop_flip
from pipelines.sample_rng import sample_uniforms
from pipeline_data import write_cifar, write_svhn


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_cifar10_returns_the_stored_images_and_labels(tmp_path, backend):
    pytest.importorskip("nvidia.dali") if backend == "dali" else None
    train_x, train_y, test_x, test_y = write_cifar(tmp_path / "cifar-10-batches-py")
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path / "cifar-10-batches-py"),
                     backend=backend, normalization="scale", augment=True, image_size=32)
    val = build_loader(cfg, LoaderSpec("val", batch_size=8))
    assert val.num_classes == 10 and val.num_samples == 30 and len(val) == 4
    x, y = collect(val)
    assert x.dtype == torch.float32 and x.shape == (30, 3, 32, 32)
    expected = torch.from_numpy(test_x).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, expected)
    assert y.tolist() == test_y.tolist()

    train = build_loader(cfg, LoaderSpec("train", batch_size=10, seed=3))
    assert train.num_samples == 100
    order = [int(i) for i in train.order]
    x, y = collect(train)
    assert y.tolist() == train_y[order].tolist()
    # each augmented image is a flipped/unflipped 32x32 window of the reflect-padded original
    original = torch.from_numpy(train_x[order]).permute(0, 3, 1, 2).float() / 255
    padded = F.pad(original, (4, 4, 4, 4), mode="reflect")
    u = sample_uniforms(3, 0, order, 3)
    flips = 0
    for k in range(len(order)):
        oy, ox = int(u[k, 0] * 9), int(u[k, 1] * 9)
        window = padded[k, :, oy:oy + 32, ox:ox + 32]
        flip = u[k, 2] < 0.5
        flips += flip
        torch.testing.assert_close(x[k], window.flip(-1) if flip else window)
    assert 20 < flips < 80


def test_cifar100_fine_labels_and_meanstd(tmp_path):
    train_x, train_y, _, test_y = write_cifar(tmp_path / "c100", classes=100)
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path / "c100"), backend="torch",
                     augment=False, normalization="meanstd")
    train = build_loader(cfg, LoaderSpec("train", batch_size=25))
    assert train.num_classes == 100
    x, y = collect(train)
    assert sorted(y.tolist()) == sorted(train_y.tolist())
    per_channel = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-3, rtol=0)
    val = build_loader(cfg, LoaderSpec("val", batch_size=7))
    assert collect(val)[1].tolist() == test_y.tolist()


def test_svhn_mat_layout_and_digit_zero(tmp_path):
    train_x, train_y, test_x, test_y = write_svhn(tmp_path)
    cfg = DataConfig(dataset="svhn", root=str(tmp_path), backend="torch", augment=False,
                     normalization="scale")
    val = build_loader(cfg, LoaderSpec("val", batch_size=6))
    x, y = collect(val)
    torch.testing.assert_close(x, torch.from_numpy(test_x).permute(0, 3, 1, 2).float() / 255)
    assert y.tolist() == test_y.tolist() and 0 in y.tolist() and 10 not in y.tolist()


def test_zca_whitens_and_is_cached(tmp_path):
    root = tmp_path / "c10"
    write_cifar(root, per_batch=20)
    cfg = DataConfig(dataset="cifar10", root=str(root), backend="torch", augment=False,
                     normalization="zca")
    x, _ = collect(build_loader(cfg, LoaderSpec("train", batch_size=20)))
    flat = x.reshape(len(x), -1).double()
    assert flat.mean(0).abs().max() < 1e-3
    # whitened: the covariance's non-null eigenvalues are s / (s + eps), all close to 1 here
    eig = torch.linalg.eigvalsh(flat @ flat.T / len(flat))
    assert eig[1:].min() > 0.9 and eig.max() < 1.0 + 1e-4
    cached = list(root.glob(".zca_*.pt"))
    assert len(cached) == 1
    # the cache is what a second loader uses: overwrite it and see the output change
    saved = torch.load(cached[0])
    torch.save({"mean": saved["mean"], "w": 2 * saved["w"]}, cached[0])
    x2, _ = collect(build_loader(cfg, LoaderSpec("train", batch_size=20)))
    torch.testing.assert_close(x2, 2 * x, rtol=1e-4, atol=1e-4)


def test_two_ranks_partition_and_resume_is_exact(tmp_path):
    write_cifar(tmp_path, per_batch=40)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), backend="torch")
    for epoch in range(3):
        seen = []
        for rank in range(2):
            loader = build_loader(cfg, LoaderSpec("train", batch_size=10, rank=rank, world_size=2,
                                                  seed=1))
            loader.set_epoch(epoch)
            seen += loader.order.tolist()
        assert sorted(seen) == list(range(200))
    loader = build_loader(cfg, LoaderSpec("train", batch_size=8, seed=1))
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start_batch=5)
    tail = list(loader)
    assert len(tail) == len(full) - 5
    for (a, la), (b, lb) in zip(full[5:], tail):
        assert torch.equal(a, b) and torch.equal(la, lb)
    rng_before = torch.get_rng_state()
    list(loader)
    assert torch.equal(rng_before, torch.get_rng_state())


def test_pad_crop_flip_identity_offsets():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    u = torch.tensor([[4 / 9 + 1e-3, 4 / 9 + 1e-3, 0.9], [4 / 9 + 1e-3, 4 / 9 + 1e-3, 0.1]])
    out = pad_crop_flip(x, u)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))


def test_zca_gram_path_equals_covariance_path():
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.integers(0, 256, (40, 48)).astype(np.float64))  # D = 48
    mean_cov, w_cov = fit_zca(rows)             # N >= D: covariance eigh
    mean_gram, w_gram = fit_zca(rows[:30])      # N < D: Gram path ...
    mean_ref, w_ref = fit_zca(torch.cat([rows[:30]] * 2))  # ... vs covariance of a copy
    torch.testing.assert_close(w_gram, w_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mean_gram, mean_ref)
    assert mean_cov.shape == (48,) and w_cov.shape == (48, 48)
