"""Configs: every recipe file loads, overrides are typed, mistakes name the key."""

import subprocess
import sys

import pytest

import wrn_large
from engine.config import (REPO_ROOT, ConfigError, check_paths, config_from_dict, load_config,
                           save_config, to_dict)

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
                       "model.kwargs.dropout=0.3", "data.root=/tmp/x", "optim.nesterov=false",
                       "optim.weight_decay=5e-4"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05
    assert cfg.optim.weight_decay == 5e-4                # YAML 1.1 reads 5e-4 as a string
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
    ("paper.cifar10=120", r"paper.cifar10: must be in \[0, 100\], got 120"),
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
    keys = capsys.readouterr().out.splitlines()
    assert "optim.lr=0.1  # > 0" in keys and "model.name='wrn18_x1'" in keys     # a registry: open
    assert "train.amp='auto'  # auto | off | bf16 | fp16" in keys
    assert "data.listing_cache='auto'  # auto | off | a folder" in keys
    assert "data.num_classes=None  # >= 1 | null" in keys


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


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", r"command line: train.epochs: must be >= 1, got 0$"),
    ("train.batch_size=0", r"train.batch_size: must be >= 1"),
    ("train.grad_accum=0", r"train.grad_accum: must be >= 1"),
    ("optim.lr=0", r"optim.lr: must be > 0, got 0.0"),
    ("optim.lr=-0.1", r"optim.lr: must be > 0"),
    ("optim.lr=.nan", r"optim.lr: must be > 0, got nan"),
    ("optim.lr_batch=0", r"optim.lr_batch: must be >= 1"),
    ("optim.momentum=1", r"optim.momentum: must be in \[0, 1\), got 1.0"),
    ("optim.weight_decay=-1e-4", r"optim.weight_decay: must be >= 0"),
    ("schedule.gamma=0", r"schedule.gamma: must be > 0"),
    ("schedule.warmup_factor=2", r"schedule.warmup_factor: must be in \[0, 1\]"),
    ("run.log_every_steps=0", r"run.log_every_steps: must be >= 1"),
    ("run.eval_every_epochs=0", r"run.eval_every_epochs: must be >= 1"),
    ("run.keep_checkpoints=0", r"run.keep_checkpoints: must be >= 1"),
    ("run.checkpoint_every_steps=-1", r"run.checkpoint_every_steps: must be >= 0"),
    ("data.workers=-1", r"data.workers: must be >= 0, got -1"),
    ("data.read_ahead=0", r"data.read_ahead: must be >= 1"),
    ("data.read_timeout_s=-1", r"data.read_timeout_s: must be >= 0, got -1.0"),
    ("data.image_size=0", r"data.image_size: must be >= 1"),
    ("data.num_classes=0", r"data.num_classes: must be >= 1"),
    ("data.max_bad_images=-1", r"data.max_bad_images: must be >= 0"),
    ("data.min_crop_area=0", r"data.min_crop_area: must be in \(0, 1\], got 0.0"),
    ("data.min_crop_area=1.5", r"data.min_crop_area: must be in \(0, 1\]"),
    ("train.ema_decay=1", r"train.ema_decay: must be in \[0, 1\), got 1.0"),
    ("train.label_smoothing=1", r"train.label_smoothing: must be in \[0, 1\)"),
    ("train.hang_timeout_s=-1", r"train.hang_timeout_s: must be >= 0"),
    ("train.hang_timeout_s=100", r"train.hang_timeout_s=100 must exceed .* \(122.1 s with "
                                 r"data.read_timeout_s=60\)"),
    ("train.straggler_factor=0.5", r"train.straggler_factor: must be 0 \(off\) or > 1, got 0.5"),
    ("paper.runs=0", r"paper.runs: must be >= 1"),
])
def test_a_value_out_of_its_range_names_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", [override])


def test_the_edges_of_the_ranges_load():
    cfg = load_config("configs/quickstart.yaml", [
        "train.straggler_factor=0", "train.ema_decay=0", "data.min_crop_area=1", "data.workers=0",
        "run.max_steps=0", "data.max_bad_images=0", "data.num_classes=null", "train.hang_timeout_s=0",
        "optim.lr=1e12", "data.listing_cache=./cache", "run.resume=step_00000008.pt"])
    assert (cfg.train.straggler_factor, cfg.data.min_crop_area, cfg.data.num_classes) == (0, 1, None)


def test_a_range_in_a_file_names_the_file(tmp_path):
    recipe = tmp_path / "zero.yaml"
    recipe.write_text("base: " + str(REPO_ROOT / "configs/quickstart.yaml") + "\ntrain:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"zero.yaml: train.epochs: must be >= 1, got 0"):
        load_config(recipe)


@pytest.mark.parametrize("config, overrides, message", [
    ("quickstart", ["data.normalization=zca"],
     r"^data.normalization=zca with data.dataset=imagenet: .*meanstd"),
    ("quickstart", ["data.normalization=scale"], r"data.normalization=scale with data.dataset=imagenet"),
    ("cifar/recipe", ["data.dataset=svhn", "data.normalization=zca"],
     r"data.normalization=zca is for cifar10/cifar100, not svhn"),
    ("cifar/recipe", ["data.dataset=imagenet"], r"data.mean/data.std set the CIFAR/SVHN"),
    ("quickstart", ["data.mean=[120, 115, 100]"], r"data.mean/data.std set the CIFAR/SVHN"),
    ("cifar/recipe", ["data.mean=[125.3, 123.0]"], r"data.mean=\[125.3, 123.0\]: three numbers"),
    ("cifar/recipe", ["data.std=[63.0, 0, 66.7]"], r"data.std=.*: three numbers .*above 0"),
    ("cifar/recipe", ["data.mean=[1, 2, 300]"], r"data.mean=.*0-255"),
    ("quickstart", ["data.val_resize=60"], r"data.val_resize=60 is below data.image_size=64"),
    ("quickstart", ["train.batch_size=64", "train.grad_accum=3"],
     r"train.batch_size=64 is not divisible by train.grad_accum=3"),
    ("quickstart", ["optim.dampening=0.5"], r"optim.nesterov=true needs optim.momentum > 0 and optim.dampening=0"),
    ("quickstart", ["optim.momentum=0"], r"optim.nesterov=true needs"),
    ("quickstart", ["schedule.milestones=[30, -1]"], r"schedule.milestones=\[30, -1\]: epochs, numbers >= 0"),
    ("quickstart", ["schedule.milestones=[a]"], r"schedule.milestones=\['a'\]"),
    ("quickstart", ["model.pretrained_ema=true"], r"model.pretrained_ema=true needs model.pretrained"),
])
def test_values_that_do_not_go_together_are_named(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(f"configs/{config}.yaml", overrides)


def test_combinations_are_checked_after_every_override():
    """The order of overrides does not matter: an ImageNet recipe turned into a CIFAR one."""
    cfg = load_config("configs/quickstart.yaml", ["data.normalization=zca", "data.dataset=cifar10"])
    assert (cfg.data.dataset, cfg.data.normalization) == ("cifar10", "zca")
    assert load_config("configs/quickstart.yaml", ["optim.nesterov=false", "optim.momentum=0"])


# ------------------------------------------------------------------ paths (check_paths)
@pytest.fixture
def places(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    checkpoint = tmp_path / "step_00000008.pt"
    checkpoint.write_bytes(b"PK\x03\x04")
    return {"data": data, "checkpoint": checkpoint, "missing": tmp_path / "no_such_thing",
            "tmp": tmp_path}


def paths_problem(overrides: list[str], config="quickstart", training=True) -> str | None:
    cfg = load_config(f"configs/{config}.yaml", overrides)   # reading never looks at the paths
    try:
        check_paths(cfg, training=training)
    except ConfigError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


def test_paths_that_exist_pass(places):
    assert paths_problem([f"data.root={places['data']}", f"model.pretrained={places['checkpoint']}",
                          f"run.resume={places['checkpoint']}", "engine.name=deepspeed"]) is None
    assert paths_problem([]) is None                      # the built-in data set, no checkpoint
    assert paths_problem(["data.backend=synthetic"], "cifar/recipe") is None  # reads no data


def test_a_missing_path_is_named(places):
    missing = places["missing"]
    assert paths_problem([f"data.root={missing}"]) == f"data.root={missing} does not exist"
    assert paths_problem([f"data.root={places['checkpoint']}"]).startswith(    # its source says
        f"data.root={places['checkpoint']} ")
    assert paths_problem([f"model.pretrained={missing}"]) == f"model.pretrained: checkpoint not found: {missing}"
    assert "is a folder; a checkpoint file is meant" in paths_problem([f"model.pretrained={places['data']}"])
    assert paths_problem([f"run.resume={missing}"]) == f"run.resume={missing}: no such checkpoint"
    assert paths_problem([f"run.resume={missing}"], training=False) is None   # --eval-only
    assert paths_problem(["engine.name=deepspeed", "engine.deepspeed_config=launch/nope.json"]) \
        .startswith("engine.deepspeed_config=launch/nope.json: no such file")
    assert paths_problem(["engine.deepspeed_config=launch/nope.json"]) is None  # ddp reads none
    assert paths_problem([], "cifar/recipe").startswith(
        "data.dataset=cifar10 has no built-in data set: set data.root")


def test_a_url_is_not_taken_for_a_local_path(places):
    problem = paths_problem(["data.root=gs://bucket/imagenet"])
    assert problem.startswith("data.root") and "no data source reads gs:// URLs" in problem
    assert "a URL" in paths_problem(["model.pretrained=https://example.com/w.pt"])


def test_a_file_list_is_checked_for_each_split_the_command_reads(places):
    lists = places["tmp"] / "lists"
    lists.mkdir()
    (lists / "val_clean.txt").write_text("")
    pattern = str(lists / "{split}_clean.txt")
    overrides = [f"data.root={places['data']}", f"data.file_list={pattern}"]
    assert paths_problem(overrides) == (f"data.file_list={pattern}: no file {lists / 'train_clean.txt'} "
                                        f"(`python -m pipelines verify DATA_DIR` writes the clean lists)")
    assert paths_problem(overrides, training=False) is None   # evaluation reads val only
    (lists / "train_clean.txt").write_text("")
    assert paths_problem(overrides) is None


def test_a_saved_config_reads_where_its_paths_are_gone(places, tmp_path):
    """predict/export read a checkpoint's config on another machine: reading must not need its
    data.root or checkpoint there; only the commands that train or evaluate check them."""
    cfg = load_config("configs/cifar/recipe.yaml", [f"data.root={places['missing']}",
                                                     f"model.pretrained={places['missing']}"])
    again = config_from_dict(to_dict(cfg), "step_00000008.pt (its config)")
    assert again == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        check_paths(again)


def test_commands_check_paths_before_the_run(places, capsys):
    import reproduce
    import train_imagenet
    out = places["tmp"] / "out"
    missing = places["missing"]
    assert train_imagenet.main([f"run.output_dir={out}", f"data.root={missing}"]) == 2
    assert capsys.readouterr().err == f"config error: data.root={missing} does not exist\n"
    assert train_imagenet.main(["--eval-only", f"model.pretrained={missing}"]) == 2
    assert capsys.readouterr().err == f"config error: model.pretrained: checkpoint not found: {missing}\n"
    assert train_imagenet.main(["--print-config", f"data.root={missing}"]) == 0   # reads nothing
    capsys.readouterr()
    assert reproduce.main(["configs/quickstart.yaml", "--seeds", "1", "--out", str(out),
                           f"data.root={missing}"]) == 2
    assert capsys.readouterr().err == f"config error: data.root={missing} does not exist\n"
    assert not out.exists()
