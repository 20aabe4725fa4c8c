"""The paper recipes against the authors' code (szagoruyko/wide-residual-networks at ae6d0d0):
initialisation, the lr schedule's boundaries, a fresh optimizer at each drop, GCN + ZCA as
pylearn2 defines them, CIFAR-10's mean/std and SVHN's train + extra."""
from __future__ import annotations

import math
from itertools import groupby

import numpy as np
import pytest
import torch
import torch.nn as nn

import wrn_large
from engine.config import load_config
from engine.schedule import lr_at, scaled_lr
from pipelines import DataConfig, LoaderSpec, build_loader
from pipelines.small_datasets import fit_zca, global_contrast_normalize
from pipeline_data import write_cifar, write_svhn

CIFAR_PRESETS = wrn_large.list_models(family="cifar")
BN_UNIFORM_STD = 1 / math.sqrt(12)


def assert_conv_std(conv: nn.Conv2d, fan: int, name: str):
    """Sample std of N(0, sqrt(2/fan)) weights, within 6 standard errors (1/sqrt(2n))."""
    w = conv.weight.detach().double()
    expected = math.sqrt(2.0 / fan)
    tolerance = 6 / math.sqrt(2 * w.numel())
    assert abs(w.std().item() / expected - 1) < tolerance, (name, w.std().item(), expected)
    assert abs(w.mean().item()) < 6 * expected / math.sqrt(w.numel()), name


@pytest.mark.parametrize("name", CIFAR_PRESETS)
def test_cifar_presets_start_from_the_official_init(name):
    """models/utils.lua MSRinit: N(0, sqrt(2 / (k*k*in_channels))); BN weight U(0, 1), bias 0."""
    torch.manual_seed(0)
    model = wrn_large.create_model(name)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for n, conv in convs:
        k = conv.kernel_size[0]
        assert_conv_std(conv, k * k * conv.in_channels, n)
    weights = torch.cat([bn.weight.detach() for _, bn in bns]).double()
    for n, bn in bns:
        assert 0 <= bn.weight.min() and bn.weight.max() < 1, n
        assert torch.count_nonzero(bn.bias) == 0, n
    assert abs(weights.mean().item() - 0.5) < 6 * BN_UNIFORM_STD / math.sqrt(len(weights))
    assert abs(weights.std().item() / BN_UNIFORM_STD - 1) < 6 / math.sqrt(len(weights))
    assert torch.count_nonzero(model.fc.bias) == 0           # utils.lua FCinit


def test_torchvision_init_is_a_named_option_and_the_imagenet_default():
    torch.manual_seed(0)
    for model in (wrn_large.create_model("wrn_28_10", init="torchvision"),
                  wrn_large.create_model("wrn18_x1")):
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0]
                assert_conv_std(m, k * k * m.out_channels, n)      # fan_out
            elif isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.weight == 1), n
    with pytest.raises(ValueError, match="unknown init 'kaiming'"):
        wrn_large.create_model("wrn_16_4", init="kaiming")


def official_lr_per_epoch(lr: float, epoch_step: list[int], ratio: float, max_epoch: int):
    """train.lua L173-183 (and pytorch/main.py L155-164): at the start of each 1-based epoch,
    multiply the lr by the ratio if the epoch is listed."""
    lrs = []
    for epoch in range(1, max_epoch + 1):
        if epoch in epoch_step:
            lr *= ratio
        lrs.append(lr)
    return lrs


@pytest.mark.parametrize("recipe, official, epochs_per_lr", [
    ("configs/cifar/recipe.yaml", (0.1, [60, 120, 160], 0.2, 200), [59, 60, 40, 41]),
    ("configs/svhn/recipe.yaml", (0.01, [80, 120], 0.1, 160), [79, 40, 41]),
])
def test_recipe_lr_of_every_epoch_is_the_official(recipe, official, epochs_per_lr):
    cfg = load_config(recipe)
    base = scaled_lr(cfg.optim.lr, cfg.optim.lr_batch, cfg.train.batch_size)
    expected = official_lr_per_epoch(*official)
    spe = 390                                       # 50,000 // 128
    for epoch, lr in enumerate(expected):           # 0-based epoch of our trainer
        for step in (epoch * spe, (epoch + 1) * spe - 1):
            assert lr_at(step, base, spe, cfg.train.epochs, cfg.schedule) == pytest.approx(lr), \
                (epoch + 1, step)
    runs = [len(list(g)) for _, g in groupby(expected)]
    assert runs == epochs_per_lr


def test_after_epochs_rule_stays_the_imagenet_one():
    """fb.resnet.torch: decay = floor((epoch - 1) / 30), 1-based: 30 epochs per lr."""
    cfg = load_config("configs/imagenet/recipe.yaml")
    assert cfg.schedule.milestone_rule == "after_epochs"
    lrs = [lr_at(e * 10, 0.1, 10, 90, cfg.schedule) for e in range(90)]
    assert lrs == [pytest.approx(0.1 * 0.1 ** ((e - 1) // 30)) for e in range(1, 91)]


def test_cifar_and_svhn_recipes_use_the_official_data_and_optimizer():
    c10 = load_config("configs/cifar/table6/wrn_28_10_dropout.yaml")
    c100 = load_config("configs/cifar/table9/wrn_40_10_cifar100.yaml")
    for cfg in (c10, c100):
        assert cfg.data.mean == [125.3, 123.0, 113.9] and cfg.data.std == [63.0, 62.1, 66.7]
        assert cfg.optim.fresh_at_lr_drops and cfg.schedule.milestone_rule == "start_of_epoch"
        assert "init" not in cfg.model.kwargs            # the CIFAR builders default to official
    svhn = load_config("configs/svhn/wrn_16_8_dropout.yaml")
    assert svhn.data.svhn_extra and svhn.optim.fresh_at_lr_drops


# ----------------------------------------------------------------- fresh optimizer at drops
def tiny_run(tmp_path, **overrides):
    """In-process trainer on synthetic 32x32 data: 4 steps per epoch, drops when epochs 2 and 3
    start (steps 4 and 8)."""
    values = {"model.name": "wrn_cifar", "model.kwargs": "{depth: 10, widen_factor: 1}",
              "data.backend": "synthetic", "data.synthetic_samples": 64, "data.image_size": 32,
              "train.batch_size": 16, "train.epochs": 3, "optim.lr_batch": 16,
              "schedule.name": "step", "schedule.milestones": "[2, 3]",
              "schedule.milestone_rule": "start_of_epoch", "optim.fresh_at_lr_drops": True,
              "run.output_dir": str(tmp_path / "run"), "run.progress": False}
    values.update(overrides)
    return load_config("configs/quickstart.yaml", [f"{k}={v}" for k, v in values.items()])


def steps_with_empty_state(cfg) -> list[int]:
    """Train; the steps whose optimizer step began with no per-parameter state."""
    from engine.build import build_trainer
    from engine.distributed import cleanup
    trainer = build_trainer(cfg)
    optimizer = trainer.engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    empty = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: empty.append(trainer.state.step) if not opt.state else None)
    try:
        trainer.train()
    finally:
        cleanup()
    return empty


@pytest.fixture
def one_process_group(monkeypatch):
    """DeepSpeed needs a process group: describe a job of one as torchrun would."""
    from trainer_utils import free_port
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(key, value)


def test_momentum_buffers_are_empty_right_after_each_drop(tmp_path):
    assert steps_with_empty_state(tiny_run(tmp_path)) == [0, 4, 8]
    kept = tiny_run(tmp_path / "kept", **{"optim.fresh_at_lr_drops": False})
    assert steps_with_empty_state(kept) == [0]


def test_deepspeed_optimizer_is_fresh_after_each_drop(tmp_path, one_process_group):
    """The state lives in the torch optimizer that DeepSpeed's wrapper holds. (One DeepSpeed
    run per process: DeepSpeed keeps its process groups across engines.)"""
    assert steps_with_empty_state(tiny_run(tmp_path, **{"engine.name": "deepspeed"})) == [0, 4, 8]


def test_a_resume_that_lands_on_a_drop_starts_with_empty_buffers(tmp_path):
    first = tiny_run(tmp_path, **{"run.max_steps": 8})    # stops with a checkpoint at step 8
    assert steps_with_empty_state(first) == [0, 4]
    assert (tmp_path / "run" / "checkpoints" / "step_00000008.pt").is_file()
    resumed = tiny_run(tmp_path)
    assert steps_with_empty_state(resumed) == [8]           # step 8 is the second drop


# ----------------------------------------------------------------- GCN + ZCA (pylearn2)
def test_gcn_centres_each_row_and_scales_it_to_norm_55():
    x = torch.tensor([[0.0, 2.0], [3.0, 3.0], [1.0, 2.0]], dtype=torch.float64)
    out = global_contrast_normalize(x)
    # row 1: [-1, 1] has norm sqrt(2); a constant row stays 0 (min_divisor), not NaN
    expected = torch.tensor([[-55 / math.sqrt(2), 55 / math.sqrt(2)], [0.0, 0.0],
                             [-55 / math.sqrt(2), 55 / math.sqrt(2)]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    rows = global_contrast_normalize(torch.rand(20, 3072, dtype=torch.float64) * 255)
    torch.testing.assert_close(rows.norm(dim=1), torch.full((20,), 55.0, dtype=torch.float64))
    torch.testing.assert_close(rows.mean(1), torch.zeros(20, dtype=torch.float64))


def test_zca_filter_bias_on_a_hand_worked_example():
    """Rows (+-s, 0), (0, +-t): mean 0, covariance diag(s^2/2, t^2/2) (divided by N), so
    P = diag(1/sqrt(s^2/2 + 0.1), 1/sqrt(t^2/2 + 0.1))."""
    s, t = 2.0, 0.5
    x = torch.tensor([[s, 0], [-s, 0], [0, t], [0, -t]], dtype=torch.float64)
    mean, p = fit_zca(x)
    torch.testing.assert_close(mean, torch.zeros(2))
    torch.testing.assert_close(p, torch.diag(torch.tensor([1 / math.sqrt(s * s / 2 + 0.1),
                                                           1 / math.sqrt(t * t / 2 + 0.1)])))


def test_zca_whitens_gcn_rows_up_to_the_filter_bias():
    """Whitened covariance = P C P = U diag(s / (s + 0.1)) U^T, P symmetric (ZCA, not PCA)."""
    rng = np.random.default_rng(0)
    x = global_contrast_normalize(torch.from_numpy(rng.normal(size=(400, 48)) @
                                                   rng.normal(size=(48, 48))))
    mean, p = fit_zca(x)
    p = p.double()
    centred = x - mean.double()
    cov = centred.T @ centred / len(x)
    s, u = torch.linalg.eigh(cov)
    torch.testing.assert_close(p, p.T, atol=1e-6, rtol=0)
    white = centred @ p
    torch.testing.assert_close(white.T @ white / len(x), (u * (s / (s + 0.1))) @ u.T,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p @ (cov + 0.1 * torch.eye(48, dtype=torch.float64)) @ p,
                               torch.eye(48, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def test_zca_normalisation_of_the_loader_is_gcn_then_zca(tmp_path):
    root = tmp_path / "c10"
    train_x, *_ = write_cifar(root, per_batch=20)
    cfg = DataConfig(dataset="cifar10", root=str(root), backend="torch", augment=False,
                     normalization="zca")
    loader = build_loader(cfg, LoaderSpec("train", batch_size=20))
    x = torch.cat([b for b, _ in loader])
    rows = torch.from_numpy(train_x[loader.order.numpy()]).permute(0, 3, 1, 2).reshape(100, -1)
    gcn = global_contrast_normalize(rows.double())
    mean, p = fit_zca(global_contrast_normalize(
        torch.from_numpy(train_x).permute(0, 3, 1, 2).reshape(100, -1).double()))
    expected = ((gcn - mean.double()) @ p.double()).float().view(100, 3, 32, 32)
    torch.testing.assert_close(x, expected, atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------- data of the recipes
def test_meanstd_constants_are_used_as_given(tmp_path):
    train_x, *_ = write_cifar(tmp_path / "c100", classes=100)
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path / "c100"), backend="torch",
                     augment=False, mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7])
    loader = build_loader(cfg, LoaderSpec("val", batch_size=10))
    x = torch.cat([b for b, _ in loader])
    raw = torch.cat([b for b, _ in build_loader(
        DataConfig(dataset="cifar100", root=str(tmp_path / "c100"), backend="torch",
                   augment=False, normalization="scale"), LoaderSpec("val", batch_size=10))])
    mean = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1)
    std = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw * 255 - mean) / std, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="data.mean/data.std set the CIFAR/SVHN"):
        build_loader(DataConfig(mean=[0.0, 0.0, 0.0]), LoaderSpec("train", batch_size=1))


def test_svhn_extra_joins_the_training_set(tmp_path):
    train_x, _, _, _ = write_svhn(tmp_path, train=30, extra=50)
    cfg = DataConfig(dataset="svhn", root=str(tmp_path), backend="torch", augment=False,
                     normalization="scale", svhn_extra=True)
    loader = build_loader(cfg, LoaderSpec("train", batch_size=10))
    assert loader.num_samples == 80
    without = build_loader(DataConfig(dataset="svhn", root=str(tmp_path), backend="torch",
                                      normalization="scale"), LoaderSpec("train", batch_size=10))
    assert without.num_samples == 30
