"""The registry, parametrized over every model as in timm's tests/test_models.py."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import wrn_large
from wrn_large.cifar import PreActBlock
from wrn_large.stats import build_on_meta

ALL = wrn_large.list_models()
CIFAR = wrn_large.list_models(family="cifar")
IMAGENET = wrn_large.list_models(family="imagenet")
# Real forward/backward on the small networks; the >20M ones are checked on the meta device.
SMALL = [n for n in ALL if wrn_large.count_params(n) < 20e6]


def test_registry_has_every_network_of_the_paper():
    expected = {"wrn_40_1", "wrn_40_2", "wrn_40_4", "wrn_40_8", "wrn_28_10", "wrn_28_12",
                "wrn_22_8", "wrn_22_10", "wrn_16_8", "wrn_16_10", "wrn_40_10",
                "wrn_40_2_b131", "wrn_40_2_b31", "wrn_40_2_b13", "wrn_40_2_b311",
                "wrn_28_2_b33", "wrn_22_2_b313", "wrn_40_2_l1", "wrn_40_2_l4",
                "wrn18_x1", "wrn18_x1_5", "wrn18_x2", "wrn18_x3", "wrn34_x1", "wrn34_x1_5",
                "wrn34_x2", "wrn50_2_bottleneck", "wrn_cifar", "wrn_imagenet"}
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", [n for n in ALL if wrn_large.model_info(n).paper_params_m])
def test_param_count_matches_paper(name):
    printed = wrn_large.model_info(name).paper_params_m
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    ours = wrn_large.count_params(name) / 1e6
    assert f"{ours:.{decimals}f}" == printed, f"{name}: {ours:.3f}M vs paper {printed}M"


def test_generic_builders_give_the_paper_networks():
    assert wrn_large.count_params("wrn_cifar", depth=28, widen_factor=10) == \
        wrn_large.count_params("wrn_28_10")
    assert wrn_large.count_params("wrn_imagenet", depth=50, width=2.0) == \
        wrn_large.count_params("wrn50_2_bottleneck")
    # WRN-50-2-bottleneck is torchvision's wide_resnet50_2 exactly.
    assert wrn_large.count_params("wrn50_2_bottleneck") == 68_883_240


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward(name):
    family = wrn_large.model_info(name).family
    size = 32 if family == "cifar" else 64
    model = wrn_large.create_model(name, num_classes=7)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", ALL)
def test_features_strides_and_channels(name):
    model = build_on_meta(name)
    family = wrn_large.model_info(name).family
    size = 32 if family == "cifar" else 64
    feats = model.feature_maps(torch.empty(1, 3, size, size, device="meta"))
    assert list(feats) == [f.name for f in model.feature_info]
    expected_strides = [1, 2, 4] if family == "cifar" else [4, 8, 16, 32]
    assert [f.stride for f in model.feature_info] == expected_strides
    for info in model.feature_info:
        t = feats[info.name]
        assert t.shape[1] == info.channels
        assert t.shape[-1] == size // info.stride
    assert model.feature_info[-1].channels == model.num_features == model.fc.in_features


def test_imagenet_stage_widths_follow_table_7():
    # basic blocks: 64w..512w channels, stem stays 64
    m = build_on_meta("wrn34_x2")
    assert [f.channels for f in m.feature_info] == [128, 256, 512, 1024]
    assert m.conv1.out_channels == 64
    # bottleneck: inner 3x3 doubles, block outputs unchanged
    b = build_on_meta("wrn50_2_bottleneck")
    assert [f.channels for f in b.feature_info] == [256, 512, 1024, 2048]
    assert b.layer1[0].conv2.out_channels == 128 and b.layer4[0].conv2.out_channels == 1024


def test_dropout_sits_between_the_convolutions_after_relu():
    model = wrn_large.create_model("wrn_16_4", dropout=0.3).train()
    block = model.layer2[1]
    assert isinstance(block, PreActBlock) and isinstance(block.dropout, nn.Dropout)
    seen = {}
    block.dropout.register_forward_hook(lambda m, i, o: seen.update(drop_in=i[0], drop_out=o))
    block.convs[1].register_forward_hook(lambda m, i, o: seen.update(conv2_in=i[0]))
    block.convs[0].register_forward_hook(lambda m, i, o: seen.update(conv1_out=o))
    model(torch.randn(4, 3, 32, 32))
    # input of dropout = ReLU(BN(conv1 output)), its output feeds conv2 directly
    expected = torch.relu(block.bns[1](seen["conv1_out"]))
    torch.testing.assert_close(seen["drop_in"], expected)
    assert torch.equal(seen["conv2_in"], seen["drop_out"])
    active = seen["drop_in"] > 0
    dropped = (seen["drop_out"][active] == 0).float().mean()
    assert 0.25 < dropped < 0.35, f"dropout zeroed {dropped:.2f} of the activations, not 0.3"
    model.eval()
    seen.clear()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(seen["drop_in"], seen["drop_out"])


def test_no_dropout_module_by_default():
    model = wrn_large.create_model("wrn_16_4")
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize("name", ["wrn_40_2_b131", "wrn_22_2_b313", "wrn_40_2_l4"])
def test_block_types(name):
    model = build_on_meta(name)
    kernels = [c.kernel_size[0] for c in model.layer1[0].convs]
    assert tuple(kernels) == model.kernels
    assert "B(" + ",".join(map(str, kernels)) + ")" == wrn_large.model_info(name).description.split(
        "-")[-1].split(" ")[0]


@pytest.mark.parametrize("tv_name, ours", [("resnet18", "wrn18_x1"), ("resnet34", "wrn34_x1"),
                                          ("wide_resnet50_2", "wrn50_2_bottleneck")])
def test_torchvision_weights_load_with_identical_outputs(tv_name, ours, tmp_path):
    tv = getattr(torchvision.models, tv_name)(weights=None).eval()
    path = tmp_path / f"{tv_name}.pth"
    torch.save(tv.state_dict(), path)
    model = wrn_large.create_model(ours, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))


def test_our_checkpoint_with_ddp_prefix_loads(tmp_path):
    src = wrn_large.create_model("wrn_16_4", num_classes=10).eval()
    ckpt = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    model = wrn_large.create_model("wrn_16_4", pretrained=str(tmp_path / "ckpt.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_ema_weights_of_our_trainer_checkpoint(tmp_path):
    """Our trainer saves the EMA under "ema": use_ema reads it (it used to look for timm's
    "model_ema" only and fall back to the plain weights without a word)."""
    from wrn_large.weights import read_state_dict

    plain, ema = (wrn_large.create_model("wrn_16_4").state_dict() for _ in range(2))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in ema.items()}
    torch.save({"model": plain, "ema": ema, "step": 5}, tmp_path / "ckpt.pt")
    got = read_state_dict(tmp_path / "ckpt.pt", use_ema=True)
    assert all(torch.equal(got[k], ema[k]) for k in ema)
    torch.save({"model": plain}, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="no EMA weights in this checkpoint"):
        read_state_dict(tmp_path / "no_ema.pt", use_ema=True)


def test_pretrained_with_other_num_classes_keeps_the_backbone(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    model = wrn_large.create_model("wrn18_x1", num_classes=10, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, tv.conv1.weight)
    assert model.fc.out_features == 10


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        wrn_large.create_model("wrn_16_4", pretrained=str(tmp_path / "missing.pth"))
    truncated = tmp_path / "truncated.pth"
    torch.save(wrn_large.create_model("wrn_16_4").state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pth"):
        wrn_large.create_model("wrn_16_4", pretrained=str(truncated))
    other = tmp_path / "other.pth"
    torch.save(wrn_large.create_model("wrn_16_8").state_dict(), other)
    with pytest.raises(ValueError, match="shapes do not match"):
        wrn_large.create_model("wrn_16_4", pretrained=str(other))


def test_bad_name_lists_choices():
    with pytest.raises(ValueError, match="Did you mean.*wrn_28_10") as e:
        wrn_large.create_model("wrn_28_1O")
    assert "wrn50_2_bottleneck" in str(e.value)


def test_bad_arguments_list_choices():
    with pytest.raises(TypeError, match="valid arguments: .*widen_factor"):
        wrn_large.create_model("wrn_cifar", widen=4)
    with pytest.raises(ValueError, match="valid depths: 18, 34, 50, 101, 152"):
        wrn_large.create_model("wrn_imagenet", depth=20)
    with pytest.raises(ValueError, match=r"depth must be 6\*N \+ 4"):
        wrn_large.create_model("wrn_cifar", depth=27)
    with pytest.raises(ValueError, match=r"B\(3,3\)"):
        wrn_large.create_model("wrn_cifar", depth=16, block_type="B(5,5)")


def test_timm_builds_our_models():
    names = timm.list_models("wrn*")
    assert set(wrn_large.list_models()) <= set(names)
    model = timm.create_model("wrn_16_4", num_classes=5, dropout=0.3)
    assert isinstance(model, wrn_large.cifar.WideResNetCIFAR) and model.fc.out_features == 5
    # our names do not shadow timm's own wide ResNets
    assert "wide_resnet50_2" in timm.list_models("wide_resnet*")
    assert type(timm.create_model("wide_resnet50_2")).__module__.startswith("timm")


def test_registry_table_prints(capsys):
    from wrn_large.__main__ import main
    assert main(["wrn_28_10"]) == 0
    out = capsys.readouterr().out
    assert "wrn_28_10" in out and "36.48" in out and "36.5" in out


@pytest.mark.parametrize("name, kwargs", [("wrn_16_4", {"dropout": 0.3}), ("wrn_40_2_b131", {}),
                                          ("wrn_40_2_l3", {}), ("wrn18_x1", {}),
                                          ("wrn_imagenet", {"depth": 50, "width": 0.5}),
                                          # timm's drop_rate and stochastic depth script too
                                          ("wrn_16_4", {"drop_rate": 0.2, "drop_path_rate": 0.2}),
                                          ("wrn18_x1", {"drop_rate": 0.2, "drop_path_rate": 0.2})])
def test_registry_models_script(name, kwargs):
    model = wrn_large.create_model(name, num_classes=7, **kwargs).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
