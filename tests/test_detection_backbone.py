"""WRN backbones in detectron2 (real detectron2 on the CPU): shapes, strides, channels, the
config scheme, freezing and norms."""
import pytest
import torch

detectron2 = pytest.importorskip("detectron2")

import wrn_large  # noqa: E402
import detection  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY  # noqa: E402


def wrn_cfg(name="wrn_imagenet", depth=18, width=0.5, out=("res2", "res3", "res4", "res5"),
            norm="BN", freeze_at=0):
    cfg = detection.get_wrn_cfg()
    cfg.MODEL.WRN.NAME, cfg.MODEL.WRN.DEPTH, cfg.MODEL.WRN.WIDTH = name, depth, width
    cfg.MODEL.WRN.OUT_FEATURES = list(out)
    cfg.MODEL.WRN.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return cfg


def build(cfg, builder="build_wrn_backbone"):
    return BACKBONE_REGISTRY.get(builder)(cfg, ShapeSpec(channels=3))


def test_builders_are_registered_by_import():
    for name in ("build_wrn_backbone", "build_wrn_fpn_backbone",
                 "build_wrn_retinanet_fpn_backbone"):
        assert callable(BACKBONE_REGISTRY.get(name))


@pytest.mark.parametrize("name, depth, width, channels", [
    ("wrn34_x2", 0, 0.0, (128, 256, 512, 1024)),            # the paper's COCO model
    ("wrn50_2_bottleneck", 0, 0.0, (256, 512, 1024, 2048)),
    ("wrn18_x1_5", 0, 0.0, (96, 192, 384, 768)),
    ("wrn_imagenet", 18, 0.5, (32, 64, 128, 256)),
    ("wrn_imagenet", 50, 1.0, (256, 512, 1024, 2048)),
])
def test_imagenet_wrn_shapes_strides_channels(name, depth, width, channels):
    backbone = build(wrn_cfg(name, depth, width, norm="FrozenBN")).eval()
    h, w = 64, 96
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, h, w))
    shapes = backbone.output_shape()
    assert list(out) == list(shapes) == ["res2", "res3", "res4", "res5"]
    for (fname, feat), c, stride in zip(out.items(), channels, (4, 8, 16, 32)):
        assert shapes[fname].channels == c and shapes[fname].stride == stride
        assert tuple(feat.shape) == (1, c, h // stride, w // stride), fname


def test_outputs_equal_the_registry_models_feature_maps():
    """Same weights, same features: the backbone is the registry WRN minus its classifier."""
    for name, kw, out in [("wrn_imagenet", dict(depth=18, width=0.5), ("res2", "res3", "res4", "res5")),
                          ("wrn_cifar", dict(depth=10, widen_factor=1), ("res2", "res3", "res4"))]:
        cfg = wrn_cfg(name, kw["depth"], kw.get("width", kw.get("widen_factor")), out)
        backbone = build(cfg).eval()
        ref = wrn_large.create_model(name, **kw).eval()
        missing, unexpected = ref.load_state_dict(backbone.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            got, want = backbone(x), ref.feature_maps(x)
        assert list(got) == list(want)
        for k in got:
            torch.testing.assert_close(got[k], want[k])
        strides = {k: v.stride for k, v in backbone.output_shape().items()}
        assert strides == {f.name: f.stride for f in ref.feature_info}


def test_classifier_dropped_and_names_are_torchvision():
    backbone = build(wrn_cfg())
    keys = set(backbone.state_dict())
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.running_var"} <= keys


def test_out_features_subset_drops_later_stages():
    backbone = build(wrn_cfg(out=("res3", "res4")))
    assert list(backbone.output_shape()) == ["res3", "res4"]
    assert not hasattr(backbone, "layer4")  # unused: would break DDP (params without grads)
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3", "res4"] and out["res4"].shape[-1] == 4


def test_fpn_and_retinanet_fpn_levels():
    cfg = wrn_cfg()
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    fpn = build(cfg, "build_wrn_fpn_backbone").eval()
    assert {k: v.stride for k, v in fpn.output_shape().items()} == \
        {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    cfg = wrn_cfg(out=("res3", "res4", "res5"))
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    retina = build(cfg, "build_wrn_retinanet_fpn_backbone").eval()
    shapes = retina.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == \
        {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    with torch.no_grad():
        out = retina(torch.randn(1, 3, 128, 128))
    for k, v in out.items():
        assert tuple(v.shape) == (1, shapes[k].channels, 128 // shapes[k].stride,
                                  128 // shapes[k].stride), k


def test_fpn_input_not_in_out_features_is_a_clear_error():
    cfg = wrn_cfg(out=("res3", "res4", "res5"))
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    with pytest.raises(ValueError, match=r"FPN.IN_FEATURES .* \['res2'\], not in MODEL.WRN.OUT_FEATURES"):
        build(cfg, "build_wrn_fpn_backbone")


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model 'wrn34_x3'"):
        build(wrn_cfg("wrn34_x3", 0, 0.0))
    with pytest.raises(ValueError, match=r"wrn34_x2.*WRN-34 of width 2.*DEPTH=18"):
        build(wrn_cfg("wrn34_x2", 18, 0.0))
    with pytest.raises(ValueError, match="NORM='GN'"):
        build(wrn_cfg(norm="GN"))
    with pytest.raises(ValueError, match=r"OUT_FEATURES \['res6'\]"):
        build(wrn_cfg(out=("res6",)))
    # a preset with matching DEPTH/WIDTH is fine
    assert build(wrn_cfg("wrn18_x1_5", 18, 1.5)).output_shape()["res2"].channels == 96


def _bn_types(module):
    return {type(m) for m in module.modules()
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))}


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at_really_freezes(freeze_at):
    backbone = build(wrn_cfg(freeze_at=freeze_at))
    groups = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    for i, names in enumerate(groups):
        frozen = i < freeze_at
        for name in names:
            module = getattr(backbone, name)
            params = list(module.parameters())
            assert all(p.requires_grad != frozen for p in params), (name, freeze_at)
            types = _bn_types(module)
            if name != "conv1":
                assert types == ({FrozenBatchNorm2d} if frozen else {torch.nn.BatchNorm2d}), name
    # one training step: frozen weights and BN statistics do not move, the others do
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    backbone.train()
    out = backbone(torch.randn(2, 3, 64, 64))
    loss = sum(v.square().mean() for v in out.values())
    if trainable:
        torch.optim.SGD(trainable, lr=0.1).zero_grad()
        loss.backward()
        torch.optim.SGD(trainable, lr=0.1).step()
    after = backbone.state_dict()
    prefixes = [n + "." for names in groups[:freeze_at] for n in names]
    for k, v in after.items():
        if k.endswith("num_batches_tracked"):
            continue
        changed = not torch.equal(v, before[k])
        if any(k.startswith(p) for p in prefixes):
            assert not changed, f"{k} moved although FREEZE_AT={freeze_at}"
    if freeze_at < 5:
        assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
        assert not torch.equal(after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])


def test_frozen_bn_keeps_statistics_in_train_mode_and_sync_bn_converts():
    backbone = build(wrn_cfg(norm="FrozenBN")).train()
    assert _bn_types(backbone) == {FrozenBatchNorm2d}
    assert all(p.requires_grad for p in backbone.parameters())  # convs still train
    stats = backbone.layer2[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(stats, backbone.layer2[0].bn1.running_mean)
    assert _bn_types(build(wrn_cfg(norm="SyncBN"))) == {torch.nn.SyncBatchNorm}
    assert _bn_types(build(wrn_cfg(norm="naiveSyncBN"))) == {NaiveSyncBatchNorm}
    # frozen stages stay FrozenBN under SyncBN
    mixed = build(wrn_cfg(norm="SyncBN", freeze_at=2))
    assert _bn_types(mixed.layer1) == {FrozenBatchNorm2d}
    assert _bn_types(mixed.layer2) == {torch.nn.SyncBatchNorm}


@pytest.mark.parametrize("builder, name, depth, width, out, norm", [
    ("build_wrn_backbone", "wrn_imagenet", 18, 0.5, ("res2", "res3", "res4", "res5"), "FrozenBN"),
    ("build_wrn_backbone", "wrn_cifar", 10, 1, ("res2", "res3", "res4"), "BN"),
    ("build_wrn_backbone", "wrn_imagenet", 50, 0.25, ("res4",), "FrozenBN"),   # the C4 trunk
    ("build_wrn_fpn_backbone", "wrn_imagenet", 18, 0.5, ("res2", "res3", "res4", "res5"), "BN"),
    ("build_wrn_retinanet_fpn_backbone", "wrn_imagenet", 18, 0.5, ("res3", "res4", "res5"), "FrozenBN"),
])
def test_backbones_script_like_detectron2s_resnet(builder, name, depth, width, out, norm):
    """torch.jit.script, after detectron2's own scripting patches (detectron2.export), as its
    ResNet needs; the scripted model gives the eager outputs exactly."""
    import detectron2.export  # noqa: F401  (patches FPN/ResNet for scripting)

    cfg = wrn_cfg(name, depth, width, out, norm=norm, freeze_at=2)
    cfg.MODEL.FPN.IN_FEATURES = list(out)
    backbone = build(cfg, builder).eval()
    scripted = torch.jit.script(backbone)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want, got = backbone(x), scripted(x)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert any("layer1.0." in k for k in backbone.state_dict())  # eager names unchanged
