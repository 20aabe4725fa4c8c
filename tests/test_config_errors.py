"""A mistyped value of a closed set, as a user meets it: ``train_imagenet.py``'s ``main`` in a fresh
Python ends in one line on stderr naming the key, the value, the allowed values and where the
value came from, exit code 2, with torch never imported and no run directory made."""
from __future__ import annotations

import json
import subprocess
import sys
import types
import typing

from engine.config import REPO_ROOT, schema_keys
from pipelines.config import ChoiceOrPath

# (key, a wrong value, the allowed values the line must name): every closed key of the schema
TYPOS = [
    ("data.dataset", "imagenett", ["imagenet", "cifar10", "cifar100", "svhn"]),
    ("data.normalization", "zcaa", ["meanstd", "zca", "scale"]),
    ("data.resize_with", "bicubicc", ["auto", "dali", "torch"]),
    ("data.on_bad_image", "skp", ["skip", "stop"]),
    ("data.shuffle", "shard", ["global", "shards"]),
    ("data.listing_cache", "of", ["auto", "off", "a folder"]),
    ("train.amp", "bf61", ["auto", "off", "bf16", "fp16"]),
    ("train.channels_last", "onn", ["auto", "on", "off"]),
    ("train.compile", "maybe", ["auto", "on", "off"]),
    ("train.dist_bn", "mean", ["reduce", "broadcast"]),
    ("schedule.name", "cosin", ["step", "cosine"]),
    ("schedule.milestone_rule", "start", ["after_epochs", "start_of_epoch"]),
    ("engine.dist_backend", "mpi", ["auto", "nccl", "gloo"]),
    ("engine.zero_stage", "4", ["0", "1", "2", "3"]),
    ("run.resume", "latest", ["auto", "none", "a checkpoint"]),
    ("paper.statistic", "average", ["median", "mean", "single", "unstated"]),
]
# the same mistakes written in a YAML file: the line names the file instead of "command line"
IN_A_FILE = [("data.dataset", "imagenett"), ("data.listing_cache", "of"), ("train.amp", "on")]

# Runs every case through train_imagenet.main in this one process (a Python start is ~0.1 s,
# importing torch ~4 s: what must not happen), and says after each whether torch was imported.
RUNNER = r"""
import contextlib, io, json, sys, traceback
import train_imagenet
results = []
for argv in json.load(sys.stdin):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = train_imagenet.main(argv)
        except BaseException:
            code = "raised"
            traceback.print_exc(file=err)
    results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue(),
                    "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def is_closed(tp) -> bool:
    """A Literal, or a choice that also takes a path (possibly or None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(is_closed(arg) for arg in typing.get_args(tp))
    if origin is typing.Annotated:
        return any(isinstance(rule, ChoiceOrPath) for rule in typing.get_args(tp)[1:])
    return origin is typing.Literal


def closed_keys() -> list[str]:
    """Every key of the schema whose values are a few words."""
    return [key for key, _, tp in schema_keys() if is_closed(tp)]


def what_is_wrong(result: dict, key: str, value: str, allowed: list[str], source: str,
                  out_dir) -> str | None:
    lines = result["stderr"].splitlines()
    if result["code"] != 2:
        return f"exit code {result['code']}, not 2:\n{result['stderr'][-1500:]}"
    if len(lines) != 1 or not lines[0].startswith("config error: "):
        return f"not one 'config error: ' line on stderr:\n{result['stderr'][-1500:]}"
    missing = [w for w in [key, value, source, *allowed] if w not in lines[0]]
    if missing:
        return f"the line does not name {missing}: {lines[0]}"
    if result["torch"]:
        return "torch was imported"
    if out_dir.exists():
        return f"run.output_dir {out_dir} was made"
    return None


def test_every_closed_key_is_in_the_table():
    """A closed set added to the schema gets a row above (and the table names no open key)."""
    assert sorted(key for key, _, _ in TYPOS) == sorted(closed_keys())


def test_a_mistyped_value_is_one_line_before_torch_and_the_run_directory(tmp_path):
    cases, argvs = [], []
    for n, (key, value, allowed) in enumerate(TYPOS):
        out_dir = tmp_path / f"out{n}"
        argvs.append(["--config", "configs/quickstart.yaml", f"run.output_dir={out_dir}",
                      f"{key}={value}"])
        cases.append((key, value, allowed, "command line", out_dir))
    words = {key: allowed for key, _, allowed in TYPOS}
    for n, (key, value) in enumerate(IN_A_FILE):
        section, name = key.split(".")
        recipe = tmp_path / f"typo{n}.yaml"
        recipe.write_text(f"base: {REPO_ROOT / 'configs/quickstart.yaml'}\n"
                          f"{section}:\n  {name}: {value}\n")
        out_dir = tmp_path / f"file_out{n}"
        argvs.append(["--config", str(recipe), f"run.output_dir={out_dir}"])
        cases.append((key, value, words[key], str(recipe), out_dir))
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(argvs), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    wrong = {f"{key}={value} ({source})": why
             for (key, value, allowed, source, out_dir), result in zip(cases, results)
             if (why := what_is_wrong(result, key, value, allowed, source, out_dir))}
    assert not wrong, "\n\n".join(f"{case}: {why}" for case, why in wrong.items())


def test_the_command_itself_exits_2_with_one_line_and_no_torch(tmp_path):
    """Once through the real command line: sys.exit's code, the real stderr, -X importtime's
    list of every module imported."""
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-X", "importtime", "train_imagenet.py",
                           f"run.output_dir={out_dir}", "data.on_bad_image=skp"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    said = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert said == ["config error: command line: data.on_bad_image: 'skp' is not one of skip, stop"]
    assert "yaml" in imported and "torch" not in imported
    assert not out_dir.exists()


def test_a_name_or_argument_no_registry_knows_is_a_config_error_naming_the_key():
    """The open sets (registries) are checked by ``engine.build.check_names`` before any process
    group or run directory: train_imagenet.py prints the error as one line, exit code 2
    (tests/test_trackers.py runs the command for run.loggers)."""
    import pytest

    from engine.build import check_names
    from engine.config import ConfigError, load_config
    cases = {"model.name=wrn_nope": "model.name: unknown model 'wrn_nope'",
             "engine.name=ddpp": "engine.name:",
             "data.backend=dalii": "data.backend:",
             "model.kwargs={widen: 2}": "model.kwargs: wrn_imagenet() got unknown argument(s) 'widen'",
             "run.loggers=[jsonl,mlfow]": "run.loggers: unknown logger 'mlfow' (did you mean mlflow?)",
             "run.loggers=[jsonl,tensorboard,jsonl]": "run.loggers: jsonl listed twice"}
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as error:
            check_names(load_config(str(REPO_ROOT / "configs" / "quickstart.yaml"), [override]))
        assert str(error.value).startswith(expected), (override, str(error.value))
