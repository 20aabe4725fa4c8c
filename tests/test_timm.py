"""Our registry as first-class timm models: timm's own tests/test_models.py (from the sdist of the
installed timm, downloaded at test time) over one name per structure, and our checks of what a
timm user relies on: features_only, resolve_data_config, local weights, activation
checkpointing."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.data import create_transform, resolve_data_config
from timm.layers import DropPath

import wrn_large
from trainer_utils import REPO
from wrn_large._registry import _builders
from wrn_large.cifar import PreActBlock
from wrn_large.imagenet import BasicBlock, Bottleneck

OURS = wrn_large.list_models()
# timm's suite runs on one name per structure: every CIFAR block type and deepening factor, a
# CIFAR net of width 1, basic ImageNet blocks at a fractional width, bottlenecks. The other
# names repeat one of these at another depth or width (same code, bigger tensors), and the
# generic builders (wrn_cifar, wrn_imagenet) build the same classes at the 28-10 and 34-2
# defaults (12-14 s each here): every name is built and its feature maps checked in
# test_models.py (its parameter count too where the paper prints one), and timm.create_model
# is called with train.py's arguments in test_timm_train_py_arguments.
SUITE = ["wrn_16_4", "wrn_40_1", "wrn_22_2_b313", "wrn_40_2_b13", "wrn_40_2_b131", "wrn_40_2_b31",
         "wrn_40_2_b311", "wrn_40_2_l1", "wrn_40_2_l4", "wrn18_x1_5", "wrn50_2_bottleneck"]


# ----------------------------------------------------------------- timm's own test-suite
@pytest.fixture(scope="module")
def timm_tests(tmp_path_factory) -> Path:
    """tests/ of the installed timm's sdist, without its timm/ sources (the installed timm is
    the one under test), in a folder of their own."""
    cache = Path(os.environ.get("WRN_LARGE_CACHE", tmp_path_factory.mktemp("cache"))) / "timm_sdist"
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"timm-{timm.__version__}.tar.gz"
    if not sdist.exists():
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                              "--no-binary", ":all:", "-d", str(cache), f"timm=={timm.__version__}"],
                             capture_output=True, text=True)
        if got.returncode != 0 or not sdist.exists():
            pytest.skip(f"cannot download the timm {timm.__version__} sdist: {got.stderr[-500:]}")
    dest = tmp_path_factory.mktemp("timm_tests")
    top = f"timm-{timm.__version__}"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith((f"{top}/tests/", f"{top}/pyproject.toml"))]
        tar.extractall(dest, members=members, filter="data")
    return dest / top


@pytest.mark.slow
def test_timm_model_suite_passes_on_each_structure(timm_tests):
    """timm's test_models.py unchanged: forward (+ grad checkpointing), backward, default cfgs
    (the model API contract, meta device, dtype), features_only, torch.fx forward/backward,
    TorchScript and fx + TorchScript, for each name of SUITE."""
    assert not [n for n in timm.list_models() if "wrn" in n and n not in OURS]
    assert set(SUITE) <= set(OURS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "wrn_large",
         "-k", " or ".join(f"{n}]" for n in SUITE),     # test ids end in "-<name>]"
         "-q", "-p", "no:cacheprovider", "-c", "pyproject.toml", "--rootdir", "."],
        cwd=timm_tests, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    tests = ("test_model_forward[", "test_model_backward[", "test_model_default_cfgs[",
             "test_model_forward_features[", "test_model_forward_fx[", "test_model_backward_fx[",
             "test_model_forward_torchscript[", "test_model_forward_fx_torchscript[")
    assert passed >= len(SUITE) * len(tests), tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail


# ----------------------------------------------------------------- what timm users rely on
@pytest.mark.parametrize("name, size", [("wrn_16_4", 32), ("wrn34_x2", 64),
                                        ("wrn50_2_bottleneck", 64)])
def test_features_only_matches_feature_info(name, size):
    reference = wrn_large.create_model(name)
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == [f.channels for f in reference.feature_info]
    assert model.feature_info.reduction() == [f.stride for f in reference.feature_info]
    outputs = model(torch.randn(1, 3, size, size))
    for out, info in zip(outputs, reference.feature_info):
        assert out.shape[1:] == (info.channels, size // info.stride, size // info.stride)
    picked = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert picked.feature_info.channels() == [f.channels for f in reference.feature_info[1:3]]


def test_features_only_outputs_are_the_models_levels():
    torch.manual_seed(0)
    model = wrn_large.create_model("wrn_16_4").eval()
    features = timm.create_model("wrn_16_4", features_only=True).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items()
                              if not k.startswith("fc.")})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(features(x), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(model.forward_features(x), features(x)[-1])


@pytest.mark.parametrize("name, expected", [
    ("wrn_28_10", dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
                       mean=tuple(m / 255 for m in (125.3, 123.0, 113.9)),
                       std=tuple(s / 255 for s in (63.0, 62.1, 66.7)))),
    ("wrn50_2_bottleneck", dict(input_size=(3, 224, 224), crop_pct=0.875,
                                interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                                std=(0.229, 0.224, 0.225))),
])
def test_resolve_data_config_gives_our_preprocessing(name, expected):
    config = resolve_data_config({}, model=timm.create_model(name))
    for key, value in expected.items():
        assert config[key] == pytest.approx(value) if key in ("mean", "std", "crop_pct") \
            else config[key] == value, key
    transform = create_transform(**config)
    from PIL import Image
    image = Image.new("RGB", (300, 260), (125, 123, 114))
    assert transform(image).shape == expected["input_size"]


def test_local_weights_load_the_timm_way(tmp_path):
    """pretrained=True + pretrained_cfg_overlay=dict(file=...): one of our checkpoints (the
    trainer's {"model": ...} with DDP prefixes) and a torchvision state dict, with the outputs
    of wrn_large.create_model(pretrained=path)."""
    torch.manual_seed(0)
    ours = wrn_large.create_model("wrn_16_4", num_classes=100).eval()
    ckpt = tmp_path / "step_00000010.pt"
    torch.save({"model": {f"module.{k}": v for k, v in ours.state_dict().items()}, "step": 10},
               ckpt)
    tv = torchvision.models.resnet18(weights=None).eval()
    tv_path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), tv_path)
    x32, x64 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    # the overlay's num_classes is the checkpoint's (else timm leaves the classifier out)
    for name, path, x, want, kwargs in [("wrn_16_4", ckpt, x32, ours(x32), dict(num_classes=100)),
                                        ("wrn18_x1", tv_path, x64, tv(x64), {})]:
        overlay = dict(file=str(path), **kwargs)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                                  **kwargs).eval()
        same = wrn_large.create_model(name, pretrained=str(path), **kwargs).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)
            torch.testing.assert_close(same(x), want, rtol=0, atol=0)


def saved_activation_bytes(model, x) -> tuple[int, dict]:
    """Bytes of the tensors autograd keeps for backward, and the gradients of a backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().mean()
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, size", [("wrn_16_4", 32), ("wrn18_x1", 64)])
def test_grad_checkpointing_keeps_gradients_and_saves_memory(name, size):
    torch.manual_seed(0)
    model = wrn_large.create_model(name, **({"dropout": 0.3} if "_16_" in name else {})).train()
    x = torch.randn(4, 3, size, size)
    state = torch.get_rng_state()
    plain_bytes, plain = saved_activation_bytes(model, x)
    model.set_grad_checkpointing(True)
    torch.set_rng_state(state)                       # the same dropout masks
    ckpt_bytes, ckpt = saved_activation_bytes(model, x)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)


def test_timm_options_and_errors():
    model = timm.create_model("wrn_16_4", num_classes=0, global_pool="")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 256, 8, 8)
    model.reset_classifier(7, "avg")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    meta = wrn_large.create_model("wrn50_2_bottleneck", device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.bfloat16)}
    with pytest.raises(TypeError, match="unknown argument.*'widen'"):
        wrn_large.create_model("wrn_16_4", widen=3)
    with pytest.raises(TypeError):
        timm.create_model("wrn_16_4", widen=3)


# ----------------------------------------------------------------- the registry in timm's
def test_registry_is_in_timms_through_its_public_api():
    assert set(OURS) <= set(timm.list_models("wrn*"))
    for name in OURS:
        assert timm.is_model(name), name
        assert timm.models.model_entrypoint(name) is _builders[name], name
        assert timm.models.get_pretrained_cfg(name).input_size == \
            wrn_large.model_info(name).pretrained_cfg["input_size"], name
    # a re-import registers nothing again (timm would warn on each name it overwrites)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(wrn_large.timm_compat)
        assert wrn_large.timm_compat.register_all() == []


def test_a_name_timm_already_has_is_an_error_at_import(monkeypatch):
    """Checked for every name before any is registered: timm's resnet18 stays timm's and the
    name before it is not registered either."""
    timms_resnet18 = timm.models.model_entrypoint("resnet18")

    def probe_builder(pretrained=False, **kwargs):
        raise AssertionError("never built")

    def resnet18(pretrained=False, **kwargs):
        raise AssertionError("never built")

    monkeypatch.setitem(_builders, "probe_builder", probe_builder)
    monkeypatch.setitem(_builders, "resnet18", resnet18)
    with pytest.raises(RuntimeError, match=r"'resnet18' \(timm's is timm\.models\.resnet\)"):
        importlib.reload(wrn_large.timm_compat)
    assert timm.models.model_entrypoint("resnet18") is timms_resnet18
    assert not timm.is_model("probe_builder")


# ----------------------------------------------------------------- timm's model arguments
# One name per structure: CIFAR basic block, another CIFAR block type, ImageNet basic block,
# ImageNet bottleneck (input sizes that keep them quick).
STRUCTURES = [("wrn_16_4", 32), ("wrn_22_2_b313", 32), ("wrn18_x1", 64),
              ("wrn50_2_bottleneck", 32)]


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (PreActBlock, BasicBlock, Bottleneck))]


def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name, size", STRUCTURES)
def test_timm_train_py_arguments(name, size):
    """timm's train.py calls create_model(name, drop_rate=..., num_classes=..., in_chans=...)
    always, and adds drop_path_rate, global_pool, bn_momentum, bn_eps when they are set."""
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(0)
    model = timm.create_model(name, drop_rate=0.0, num_classes=10, in_chans=3).train()
    torch.manual_seed(0)
    plain = wrn_large.create_model(name, num_classes=10).train()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 plain.state_dict().values()))
    assert torch.equal(model(x), plain(x))           # 0.0 changes nothing, even in train mode
    assert {(bn.momentum, bn.eps) for bn in batchnorms(plain)} == {(0.1, 1e-5)}

    options = dict(drop_rate=0.1, drop_path_rate=0.1, global_pool="catavgmax",
                   bn_momentum=0.01, bn_eps=1e-3)
    model = timm.create_model(name, pretrained=False, num_classes=10, in_chans=3, **options)
    assert model.drop_rate == 0.1 and model.global_pool.pool_type == "catavgmax"
    assert model.fc.in_features == model.head_hidden_size == 2 * model.num_features
    bns = batchnorms(model)
    assert len(bns) == len(batchnorms(plain))
    assert {(bn.momentum, bn.eps) for bn in bns} == {(0.01, 1e-3)}
    blocks = residual_blocks(model)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.1 * i / (len(blocks) - 1) for i in range(len(blocks))])
    assert model.train()(x).shape == (2, 10)
    # our own entry point takes the same arguments and builds the same network
    ours = wrn_large.create_model(name, num_classes=10, in_chans=3, device="meta", **options)
    assert repr(ours) == repr(model)


@pytest.mark.parametrize("name, size", STRUCTURES)
def test_drop_rate_is_dropout_before_the_classifier(name, size):
    torch.manual_seed(0)
    plain = wrn_large.create_model(name, num_classes=10).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_rate=0.2).eval()
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))        # the same weights; eval: no dropout
        seen = {}
        model.global_pool.register_forward_hook(
            lambda m, i, o: seen.update(features=i[0], pooled=o))
        model.fc.register_forward_hook(lambda m, i, o: seen.update(fc_in=i[0]))
        model.train()(x)
        pooled, fc_in = seen["pooled"], seen["fc_in"]
        active = pooled != 0
        kept = fc_in != 0
        torch.testing.assert_close(fc_in[kept], pooled[kept] / 0.8)
        dropped = 1 - kept[active].float().mean()
        assert 0.15 < dropped < 0.25, f"dropped {dropped:.2f} of the pooled features, not 0.2"
        # pre_logits too, as timm's ResNet
        pre = model.forward_head(seen["features"], pre_logits=True)
        assert (pre == 0).float().mean() > 0.1


@pytest.mark.parametrize("name, size", STRUCTURES)
def test_drop_path_drops_residual_branches_in_train_mode(name, size):
    torch.manual_seed(0)
    plain = wrn_large.create_model(name, num_classes=10).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.5).eval()
    blocks = residual_blocks(model)
    assert isinstance(blocks[0].drop_path, nn.Identity)      # rate 0 at the first block
    assert isinstance(blocks[-1].drop_path, DropPath) and blocks[-1].drop_path.drop_prob == 0.5
    x = torch.randn(16, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))        # eval: the identity
        last, seen = blocks[-1], {}
        assert getattr(last, "shortcut", None) is None and getattr(last, "downsample", None) is None
        last.register_forward_hook(lambda m, i, o: seen.update(block_in=i[0], block_out=o))
        last.drop_path.register_forward_hook(lambda m, i, o: seen.update(branch=i[0], kept=o))
        model.train()(x)
    branch, kept = seen["branch"], seen["kept"]
    dropped = (kept.flatten(1) == 0).all(1)
    assert 0 < dropped.sum() < len(x), dropped            # each sample's branch, p = 0.5
    torch.testing.assert_close(kept[~dropped], branch[~dropped] / 0.5)
    # a dropped branch leaves the block's shortcut: its input (ReLU'd on ImageNet, already >= 0)
    torch.testing.assert_close(seen["block_out"][dropped], seen["block_in"][dropped],
                               rtol=0, atol=0)


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        timm.create_model("wrn_16_4", drop_path_rate=1.0)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\), got -0.1"):
        wrn_large.create_model("wrn18_x1", drop_rate=-0.1)
