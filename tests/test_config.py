"""Configs: every recipe file loads, overrides are typed, mistakes name the key."""

import subprocess
import sys

import pytest

import wrn_large
from engine.config import REPO_ROOT, ConfigError, load_config, save_config

RECIPES = sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "configs").rglob("*.yaml")
                 if "detection" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=str)
def test_every_recipe_loads_and_names_a_registry_model(path):
    cfg = load_config(path)
    assert wrn_large.is_model(cfg.model.name)
    assert cfg.train.epochs > 0 and cfg.optim.lr > 0


def test_cifar_recipe_is_the_papers():
    cfg = load_config("configs/cifar/table4/wrn_28_10.yaml")
    assert cfg.model.name == "wrn_28_10"
    assert cfg.data.normalization == "zca"       # from zca.yaml
    assert (cfg.optim.lr, cfg.optim.lr_batch, cfg.optim.weight_decay) == (0.1, 128, 5e-4)
    assert cfg.optim.nesterov and cfg.optim.momentum == 0.9 and cfg.optim.dampening == 0
    assert (cfg.schedule.milestones, cfg.schedule.gamma, cfg.train.epochs) == ([60, 120, 160], 0.2, 200)


def test_svhn_and_imagenet_recipes():
    svhn = load_config("configs/svhn/wrn_16_8_dropout.yaml")
    assert (svhn.optim.lr, svhn.schedule.milestones, svhn.train.epochs) == (0.01, [80, 120], 160)
    assert svhn.model.kwargs == {"dropout": 0.4} and not svhn.data.augment
    assert svhn.data.normalization == "scale"
    imnet = load_config("configs/imagenet/wrn34_x2.yaml")
    assert (imnet.optim.lr, imnet.optim.lr_batch, imnet.optim.weight_decay) == (0.1, 256, 1e-4)
    assert imnet.schedule.milestones == [30, 60] and imnet.train.epochs == 90
    modern = load_config("configs/imagenet/modern.yaml")
    assert modern.schedule.name == "cosine" and modern.train.label_smoothing == 0.1


def test_overrides_are_typed():
    cfg = load_config("configs/cifar/recipe.yaml",
                      ["train.epochs=3", "optim.lr=0.05", "schedule.milestones=[1,2]",
                       "model.kwargs.dropout=0.3", "data.root=/tmp/x", "optim.nesterov=false"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05
    assert cfg.schedule.milestones == [1, 2]
    assert cfg.model.kwargs["dropout"] == 0.3 and cfg.data.root == "/tmp/x"
    assert cfg.optim.nesterov is False


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", r"unknown key 'train.epoch'.*Did you mean epochs"),
    ("optim.learning_rate=0.1", r"unknown key 'optim.learning_rate'"),
    ("trian.epochs=3", r"unknown key 'trian'.*Did you mean train"),
    ("train.epochs=ten", r"train.epochs: expected an integer, got 'ten'"),
    ("optim.nesterov=maybe", r"optim.nesterov: expected true/false"),
    ("train.amp=fp8", r"train.amp: 'fp8' is not one of"),
    ("train.epochs", r"not of the form key=value"),
    ("paper.cifar10=120", r"paper.cifar10: a test error in %, got 120"),
    ("paper.cifar1O=3.9", r"unknown key 'paper.cifar1O'.*Did you mean cifar10"),
    ("paper.statistic=median", r"paper.runs=1 with paper.statistic=median"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/cifar/recipe.yaml", [override])


def test_bad_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(REPO_ROOT / "configs/cifar/recipe.yaml") + "\ntrain:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.epohcs'.*epochs"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: 3\n optim: 1\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML at line 3, column 2: ") as e:
        load_config(broken)
    assert "\n" not in str(e.value)                       # one line, not PyYAML's three


def test_table_configs_carry_the_papers_numbers():
    """Every table's config names its table, row and at least one number of the paper; those
    over several runs say how many."""
    tables = [p for p in RECIPES if any(part.startswith("table") for part in p.parts)
              or p.name.startswith("wrn") and "imagenet" in p.parts or "dropout" in p.name]
    assert len(tables) > 20
    for path in tables:
        paper = load_config(path).paper
        numbers = [paper.cifar10, paper.cifar100, paper.svhn, paper.top1, paper.top5]
        assert paper.table and paper.row and any(n is not None for n in numbers), path
    t6 = load_config("configs/cifar/table6/wrn_28_10_dropout.yaml").paper
    assert (t6.cifar10, t6.cifar100, t6.runs, t6.statistic) == (3.89, 18.85, 5, "median")


def test_a_binary_file_given_as_config_is_named(tmp_path):
    checkpoint = tmp_path / "step_00000010.pt"
    checkpoint.write_bytes(b"PK\x03\x04\x00\xff\xfe" * 10)
    with pytest.raises(ConfigError, match="step_00000010.pt is not a config file: it is binary"):
        load_config(checkpoint)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config("configs/imagenet/modern.yaml", ["train.epochs=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cli_reports_config_errors(capsys):
    import train_imagenet
    assert train_imagenet.main(["--config", "configs/cifar/recipe.yaml", "train.epoch=1"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    assert train_imagenet.main(["--list-keys"]) == 0
    assert "optim.lr=0.1" in capsys.readouterr().out


@pytest.mark.parametrize("override, key, value", [
    ("train.amp=off", "amp", "off"), ("train.compile=off", "compile", "off"),
    ("train.channels_last=on", "channels_last", "on"), ("train.channels_last=off", "channels_last", "off"),
    ("train.compile=on", "compile", "on"), ("train.amp='off'", "amp", "off"),
    ("train.amp=bf16", "amp", "bf16"),
])
def test_on_off_switches_from_the_command_line(override, key, value, tmp_path):
    """YAML reads a bare on/off as a boolean; the switches take it as the word."""
    cfg = load_config("configs/quickstart.yaml", [override])
    assert getattr(cfg.train, key) == value
    save_config(cfg, tmp_path / "config.yaml")           # and the saved file reads back the same
    assert getattr(load_config(tmp_path / "config.yaml").train, key) == value


def test_on_off_switches_in_a_yaml_file(tmp_path):
    f = tmp_path / "switches.yaml"
    f.write_text("train:\n  amp: off\n  compile: off\n  channels_last: on\n")
    cfg = load_config(f)
    assert (cfg.train.amp, cfg.train.compile, cfg.train.channels_last) == ("off", "off", "on")
    with pytest.raises(ConfigError, match=r"train.amp: 'on' is not one of auto, off, bf16, fp16"):
        load_config("configs/quickstart.yaml", ["train.amp=on"])


def test_overrides_before_and_after_config(capsys):
    """What launch/slurm.sbatch passes: its own run.output_dir, then the user's --config and
    overrides (argparse used to reject KEY=VALUE after --config: 'unrecognized arguments')."""
    import yaml

    import train_imagenet
    assert train_imagenet.main(["run.output_dir=/tmp/run_x", "--config", "configs/cifar/recipe.yaml",
                                "train.epochs=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["output_dir"] == "/tmp/run_x" and printed["train"]["epochs"] == 3
    assert printed["data"]["dataset"] == "cifar10"


def test_reading_a_config_imports_neither_torch_nor_dali():
    """A mistyped key is reported before torch and DALI load (seconds saved on every mistake):
    engine.config and pipelines import them only when a loader is built."""
    code = ("import sys; from engine.config import load_config; import pipelines; "
            "load_config('configs/quickstart.yaml', ['train.epochs=1']); "
            "print(sorted(m for m in ('torch', 'nvidia.dali', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
