"""engine/provenance.py without training: the keys the config digest leaves out (and a sweep's
check of its run directories with them), and the starts a run's records keep. The runs
themselves: tests/test_reproduce.py."""
from __future__ import annotations

import copy
import json

import pytest

from engine.config import ConfigError, schema_keys, load_config, to_dict
from engine.provenance import (NOT_IN_DIGEST, OPERATIONAL, began_training, config_digest,
                               mixed_starts, with_earlier_starts, write_json)
from engine.sweep import claim, plan

QUICKSTART = "configs/quickstart.yaml"


def changed(values: dict, key: str) -> dict:
    values = copy.deepcopy(values)
    section, name = key.split(".", 1)
    values[section][name] = ("another", values[section][name])
    return values


def test_the_digest_leaves_out_the_operational_keys_alone():
    keys = [key for key, _, _ in schema_keys()]
    assert set(OPERATIONAL) <= set(keys), set(OPERATIONAL) - set(keys)   # a typo keeps a key in
    values = to_dict(load_config(QUICKSTART))
    digest = config_digest(values)
    for key in keys:
        left_out = key in NOT_IN_DIGEST or key.split(".")[0] in NOT_IN_DIGEST
        assert (config_digest(changed(values, key)) == digest) == left_out, key
    assert {"data.workers", "data.read_ahead", "train.hang_timeout_s", "run.loggers",
            "run.prometheus_port"} <= set(OPERATIONAL)
    # where saves fall changes a multi-rank run (BatchNorm made equal over ranks at a save,
    # passed on by DDP); which files a run trains on
    assert not {"run.eval_every_epochs", "data.backend", "train.deterministic",
                "run.checkpoint_every_steps", "run.max_steps", "data.on_bad_image",
                "data.max_bad_images"} & set(OPERATIONAL)


def test_a_sweep_directory_takes_other_operational_values_and_names_only_the_rest(tmp_path):
    def claimed(*overrides):
        run, = plan([QUICKSTART], [0], tmp_path, list(overrides))
        claim(run)
        return run

    first = claimed("data.workers=0")
    claimed("data.workers=3", "data.read_ahead=8", "train.hang_timeout_s=0", "run.loggers=[jsonl]")
    with pytest.raises(ConfigError) as refused:
        claimed("data.workers=3", "optim.lr=0.5")
    assert "optim.lr: 0.1 -> 0.5" in str(refused.value) and "workers" not in str(refused.value)
    # a directory claimed while more keys were in the digest: judged by today's list
    path = first.run_dir / "sweep.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "digest": "0" * 12}))
    claimed("data.workers=1")


def start(commit="c1", world_size=1, precision="fp32", step=None):
    return {"time": "2026-12-08T00:00:00+00:00", "commit": commit, "world_size": world_size,
            "hosts": ["node1"], "precision": precision, "hardware": "CPU", "resumed_from_step": step}


def test_a_run_keeps_the_starts_that_trained(tmp_path):
    path = tmp_path / "provenance.json"
    this = {"commit": "c2", "world_size": 2, "starts": [start("c2", 2)]}
    assert with_earlier_starts(this, path)["starts"] == [start("c2", 2)]       # no file yet
    # written before starts were listed: its top-level fields make one
    write_json(path, {"commit": "c0", "world_size": 1, "precision": "fp32", "hardware": "CPU"})
    assert [s["commit"] for s in with_earlier_starts(this, path)["starts"]] == ["c0", "c2"]
    # a start that never began training (it died resuming) is left out
    write_json(path, {"starts": [start("c1", step=0), start("c1", step=None)]})
    joined = with_earlier_starts(this, path)
    assert joined["starts"] == [start("c1", step=0), start("c2", 2)]
    resumed = began_training(joined, 40)
    assert [s["resumed_from_step"] for s in resumed["starts"]] == [0, 40]
    assert mixed_starts(resumed["starts"]) == {"commit": ["c1", "c2"], "world_size": [1, 2]}
    assert began_training(joined, 0)["starts"] == [start("c2", 2, step=0)]   # from scratch
    assert mixed_starts([start(step=0), start(step=4)]) == {}


def test_a_legacy_start_stays_listed_and_an_undone_start_is_dropped(tmp_path):
    path = tmp_path / "provenance.json"
    write_json(path, {"commit": "c0", "world_size": 1, "precision": "fp32", "hardware": "CPU"})
    second = began_training(with_earlier_starts({"starts": [start("c1")]}, path), 40)
    write_json(path, second)
    third = began_training(with_earlier_starts({"starts": [start("c1")]}, path), 80)
    assert [s["commit"] for s in third["starts"]] == ["c0", "c1", "c1"]   # two resumes deep
    assert mixed_starts(third["starts"]) == {"commit": ["c0", "c1"]}
    # a start at world size 2 that resumed at 40 and died before its next save, then a start
    # from the same step-40 checkpoint: the second one's steps undo the first one's
    died = [start("c1", step=0), start("c1", world_size=2, step=40)]
    again = began_training({"starts": died + [start("c1")]}, 40)
    assert [(s["world_size"], s["resumed_from_step"]) for s in again["starts"]] == [(1, 0), (1, 40)]
    assert mixed_starts(again["starts"]) == {}


def test_a_key_added_later_leaves_digests_as_they_were_at_its_default():
    """train.micro_batch came after runs had digests: a config without it and one with its
    default (null) share a digest, so sweep directories claimed before stay claimed; set, it
    counts. A start recorded before micro_batch was recorded is not a mixed start."""
    values = to_dict(load_config("configs/quickstart.yaml", []))
    before = copy.deepcopy(values)
    del before["train"]["micro_batch"]
    assert config_digest(values) == config_digest(before)
    values["train"]["micro_batch"] = 16
    assert config_digest(values) != config_digest(before)
    assert mixed_starts([{"world_size": 2}, {"world_size": 2, "micro_batch": 8}]) == {}
    assert mixed_starts([{"micro_batch": 4}, {"micro_batch": 8}]) == {"micro_batch": [4, 8]}
