"""Every user command, given a wrong path, the wrong kind of file or a missing folder, ends with
one line that names it and a non-zero exit code: no traceback, no advice of a library's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer_utils import REPO, base_overrides, make_folder, run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def things(tmp_path_factory):
    """A real data folder, a real run (its checkpoint and config.yaml), a plain file."""
    base = tmp_path_factory.mktemp("things")
    data = make_folder(base / "data", train_per_class=4, val_per_class=2)
    run = base / "run"
    run_training(base_overrides(data, run, **{"train.epochs": 1}))
    checkpoint = next((run / "checkpoints").glob("step_*.pt"))
    text = base / "notes.txt"
    text.write_text("not a folder\n")
    return {"data": data, "checkpoint": checkpoint, "config": run / "config.yaml",
            "text": text, "missing": base / "no_such_thing", "out": base / "out"}


def command(name: str, t: dict, case: str) -> tuple[list[str], str]:
    """(argv, the path the error must name) of ``name`` given the ``case`` mistake."""
    train = [sys.executable, "train_imagenet.py", "--config", "configs/quickstart.yaml",
             *base_overrides(t["data"], t["out"] / f"{name} {case}")]   # cases run side by side
    wrong = {"wrong path": t["missing"], "wrong kind": t["config"] if name != "train config"
             else t["checkpoint"], "missing folder": t["missing"]}[case]
    if name == "train config":                     # --config
        if case == "missing folder":
            return train + [f"data.root={t['missing']}"], str(t["missing"])
        return train[:3] + [str(wrong)] + train[4:], str(wrong)
    if name == "train pretrained":                 # model.pretrained
        if case == "missing folder":
            return train + [f"data.root={t['text']}"], str(t["text"])
        return train + [f"model.pretrained={wrong}"], str(wrong)
    if name == "evaluate":
        if case == "missing folder":
            return train + ["--eval-only", f"model.pretrained={t['checkpoint']}",
                            f"data.root={t['missing']}"], str(t["missing"])
        return train + ["--eval-only", f"model.pretrained={wrong}"], str(wrong)
    if name == "reproduce":
        cmd = [sys.executable, "reproduce.py", "--seeds", "1", "--out", str(t["out"] / f"{name} {case}")]
        if case == "missing folder":
            return cmd + ["configs/quickstart.yaml", f"data.root={t['missing']}"], str(t["missing"])
        return cmd + [str(t["missing"] if case == "wrong path" else t["checkpoint"])], \
            str(t["missing"] if case == "wrong path" else t["checkpoint"])
    if name in ("predict", "export"):
        tail = ["--format", "onnx", "--out", str(t["out"] / "m.onnx")] if name == "export" else []
        if case == "missing folder":
            images = ["--images", str(t["missing"])] if name == "export" else [str(t["missing"])]
            return [sys.executable, "-m", "engine", name, str(t["checkpoint"]), *images, *tail], \
                str(t["missing"])
        images = [] if name == "export" else [str(t["data"] / "val")]
        return [sys.executable, "-m", "engine", name, str(wrong), *images, *tail], str(wrong)
    if name == "verify":
        where = {"wrong path": t["missing"], "wrong kind": t["text"], "missing folder": t["missing"]}[case]
        return [sys.executable, "-m", "pipelines", "verify", str(where)], str(where)
    if name == "pack":
        if case == "wrong kind":
            return [sys.executable, "-m", "pipelines", "pack", str(t["data"]), str(t["text"])], str(t["text"])
        return [sys.executable, "-m", "pipelines", "pack", str(t["missing"]), str(t["out"] / "p")], \
            str(t["missing"])
    raise KeyError(name)


COMMANDS = ["train config", "train pretrained", "evaluate", "reproduce", "predict", "export",
            "verify", "pack"]


CASES = ["wrong path", "wrong kind", "missing folder"]


def outcome(name: str, t: dict, case: str) -> str | None:
    """What is wrong with how ``name`` meets the ``case`` mistake, or None."""
    argv, culprit = command(name, t, case)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    if proc.returncode == 0:
        return "exit code 0"
    if "Traceback" in proc.stderr or "weights_only" in proc.stderr:
        return "a traceback or torch's advice:\n" + proc.stderr[-2000:]
    if len(errors) != 1 or culprit not in errors[0]:
        return f"not one error line naming {culprit}:\n" + proc.stderr[-2000:]
    return None


def test_a_user_mistake_ends_in_one_line_naming_it(things):
    """The whole table, commands x mistakes, each in a fresh process (two at a time: most of
    each is the start-up's imports)."""
    from concurrent.futures import ThreadPoolExecutor
    table = [(name, case) for name in COMMANDS for case in CASES]
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(lambda nc: outcome(nc[0], things, nc[1]), table))
    wrong = {f"{name} / {case}": why for (name, case), why in zip(table, found) if why}
    assert not wrong, "\n\n".join(f"{k}: {v}" for k, v in wrong.items())
