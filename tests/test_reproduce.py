"""reproduce.py: a tiny table (2 configs x 3 seeds on a learnable JPEG folder), its numbers and
its summary file against the runs' own metrics.jsonl and result.json, a sweep killed in the
middle of a run and finished by the same command with another data.workers (accepted: an
operational key), SIGTERM to a two-process sweep whose run is resumed at another commit
(flagged), and two fresh runs of one seed that agree exactly."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_utils import (PAPER, REPO, THREADS, base_overrides, epochs, isolated,
                           live_processes_mentioning, make_folder, read_metrics, run_training,
                           sweep_overrides, write_table_configs)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


def reproduce(args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "reproduce.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"reproduce.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def reproduce_here(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """``reproduce.main(args)`` in this process, as ``reproduce``: for a call that trains
    nothing (every run finished, or refused), whose imports would be most of a new process's
    time. A run it started would go to a process of its own, and print its "starts" line here."""
    import contextlib
    import io

    import reproduce as command
    out, err = io.StringIO(), io.StringIO()
    with isolated(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = command.main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    if check and code != 0:
        raise AssertionError(f"reproduce.py failed ({code}):\n{out.getvalue()[-3000:]}\n"
                             f"{err.getvalue()[-4000:]}")
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def final_errors(run_dir: Path) -> dict:
    last = [e for e in epochs(run_dir) if "top1" in e][-1]
    return {"top1": 100 - last["top1"], "top5": 100 - last["top5"]}


def test_tiny_table_equals_the_runs_own_metrics(tmp_path, data):
    configs = write_table_configs(tmp_path / "configs")
    out = tmp_path / "sweep"
    # one epoch: the seeds' errors differ, so median, mean and spread are told apart
    args = [*map(str, configs), "--seeds", "3", "--out", str(out),
            *sweep_overrides(data, **{"train.epochs": 1})]
    reproduce(args)

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 3 * 2                       # configs x seeds x (top-1, top-5)
    md = (out / "results.md").read_text()
    spread = False
    for name, width in (("a", 1), ("b", 2)):
        runs = [out / f"net_{name}" / "imagenet" / f"seed{s}" for s in range(3)]
        truth = [final_errors(r) for r in runs]
        mine = [r for r in rows if r["network"] == f"WRN-10-{width}"]
        for metric in ("top1", "top5"):
            values = [t[metric] for t in truth]
            spread |= statistics.median(values) != statistics.mean(values)
            listed = sorted(float(r["test_error"]) for r in mine if r["metric"] == metric)
            assert listed == pytest.approx(sorted(values), abs=1e-4)
            med, mean, std = statistics.median(values), statistics.mean(values), statistics.stdev(values)
            paper = PAPER[name][metric]
            line = next(l for l in md.splitlines() if l.startswith(f"| WRN-10-{width} "))
            assert (f"{med:.2f} ({mean:.2f} ± {std:.2f}, {min(values):.2f}-{max(values):.2f}, "
                    f"n=3) | {paper:.2f} | {med - paper:+.2f}") in line
        digests = {r["config_digest"] for r in mine}
        assert len(digests) == 1 and {r["seed"] for r in mine} == {"0", "1", "2"}
        assert all(r["world_size"] == "1" and r["precision"] == "fp32" and "torch=" in r["versions"]
                   and r["commit"] for r in mine)
    assert spread, "the runs agree: this table cannot tell median from mean"
    assert {(r["starts"], r["mixed_starts"]) for r in rows} == {("1", "")}

    # the summary beside results.csv: per network and metric, from the runs' result.json
    summary = list(csv.DictReader(open(out / "results_summary.csv")))
    assert len(summary) == 2 * 2
    for name, width in (("a", 1), ("b", 2)):
        results = [json.loads((out / f"net_{name}" / "imagenet" / f"seed{s}" / "result.json")
                              .read_text()) for s in range(3)]
        for metric in ("top1", "top5"):
            values = [100 - r[f"final_{metric}"] for r in results]
            line = next(r for r in summary
                        if r["network"] == f"WRN-10-{width}" and r["metric"] == metric)
            assert float(line["median"]) == pytest.approx(statistics.median(values), abs=1e-4)
            assert float(line["mean"]) == pytest.approx(statistics.mean(values), abs=1e-4)
            assert float(line["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
            assert (float(line["min"]), float(line["max"])) == pytest.approx(
                (min(values), max(values)), abs=1e-4)
            assert float(line["diff"]) == pytest.approx(
                statistics.median(values) - PAPER[name][metric], abs=1e-4)
            assert (line["n"], line["table"], line["dataset"], float(line["paper"]),
                    line["paper_statistic"], line["paper_runs"], line["mixed_start_runs"]) == \
                ("3", "T1", "imagenet", PAPER[name][metric], "median", "3", "0")
        start = results[0]["starts"]
        assert len(start) == 1 and start[0]["resumed_from_step"] == 0 and start[0]["hosts"]
        assert start[0]["commit"] == results[0]["commit"] and start[0]["world_size"] == 1
    assert "## Table T1" in md and "median of 3 runs" in md
    assert (out / "results.png").stat().st_size > 0
    assert any(line.startswith("# versions: ") and "torch " in line
               for line in (runs[0] / "config.yaml").read_text().splitlines())

    # the same command again: nothing runs
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*/result.json")}
    again = reproduce_here(args)
    assert "starts" not in again.stdout and "resumes" not in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*/result.json")}

    # a run of another commit under one row: refused, or shown apart
    moved = out / "net_a" / "imagenet" / "seed1" / "result.json"
    result = json.loads(moved.read_text())
    moved.write_text(json.dumps({**result, "commit": "0" * 40}))
    refused = reproduce_here(args + ["--table"], check=False)
    assert refused.returncode == 2 and "seed1" in refused.stderr and "differ" in refused.stderr
    reproduce_here(args + ["--table", "--split-mixed"])
    assert "[00000000 " in (out / "results.md").read_text()

    # another config asked of the same run directories: refused, naming the key
    changed = reproduce_here(args + ["optim.lr=0.01"], check=False)
    assert changed.returncode == 2 and "optim.lr" in changed.stderr


def sweep_until_a_checkpoint(args: list[str], run_dir: Path, threads: int = THREADS,
                             repo: Path = REPO) -> subprocess.Popen:
    """reproduce.py ARGS (``repo``'s) started in a session of its own, returned once
    ``run_dir`` holds a checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, str(repo / "reproduce.py"), *args], cwd=repo,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 600
    while not list((run_dir / "checkpoints").glob("step_*.pt")):
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no checkpoint in {run_dir}:\n{proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.1)
    return proc


def repo_at_another_commit(folder: Path) -> tuple[Path, str]:
    """This checkout's files as they are now (tracked, untracked but not ignored, and the built
    extensions), committed in a repository of their own: (its folder, the commit), the same
    code at another commit."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True)
    if listed.returncode:
        pytest.skip(f"{REPO} is not a git checkout")
    names = [n for n in listed.stdout.decode().split("\0") if n]
    names += [str(p.relative_to(REPO)) for package in ("wrn_large", "pipelines", "engine")
              for p in (REPO / package).rglob("*.so")]
    for name in names:
        if (REPO / name).is_file():            # a tracked file deleted meanwhile is listed too
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    git = ["git", "-C", str(folder), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "another commit"]):
        subprocess.run(git + command, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    return folder, head.stdout.strip()


def test_a_killed_sweep_is_finished_by_the_same_command(tmp_path, data):
    """... with another data.workers (an operational key: the same run, the same numbers)."""
    config = write_table_configs(tmp_path / "configs")[0]
    out = tmp_path / "sweep"
    extra = {"train.epochs": 3, "run.checkpoint_every_steps": 2}
    args = [str(config), "--seeds", "2", "--out", str(out), *sweep_overrides(data, **extra)]
    assert "data.workers=0" in args
    second = out / "net_a" / "imagenet" / "seed1"
    proc = sweep_until_a_checkpoint(args, second)
    os.killpg(proc.pid, signal.SIGKILL)                  # the sweep and its run, at once
    proc.wait()
    first = out / "net_a" / "imagenet" / "seed0"
    assert (first / "result.json").is_file() and not (second / "result.json").exists()
    stamp = (first / "result.json").stat().st_mtime_ns

    again = reproduce([a.replace("data.workers=0", "data.workers=1") for a in args])
    assert f"seed 1 resumes in {second}" in again.stdout and "seed 0" not in again.stdout
    assert (first / "result.json").stat().st_mtime_ns == stamp
    assert "resumed from" in (second / "train.log").read_text()
    starts = json.loads((second / "result.json").read_text())["starts"]
    assert [s["resumed_from_step"] > 0 for s in starts] == [False, True]
    assert "warning" not in again.stderr           # one commit, one world size, one precision

    # the interrupted run ends where an uninterrupted one of the same seed does
    whole = tmp_path / "whole"
    reproduce([str(config), "--seeds", "1", "--first-seed", "1", "--out", str(whole),
               *sweep_overrides(data, **extra)])
    assert final_errors(second) == final_errors(whole / "net_a" / "imagenet" / "seed1")
    assert epochs(second)[-1]["train_loss"] == epochs(whole / "net_a" / "imagenet" / "seed1")[-1]["train_loss"]


def test_sigterm_to_a_two_process_sweep_stops_its_run_with_a_checkpoint(tmp_path, data):
    """reproduce.py --nproc 2 (torchrun per run), SIGTERM to reproduce.py alone (a `kill PID`):
    it is passed on, the run checkpoints and stops, nothing is left running, the sweep exits
    143; the same command resumes the run with its 2 processes and finishes it. The first start
    ran the same code at another commit: the run is flagged (warning, results.csv, results.md)."""
    config = write_table_configs(tmp_path / "configs")[0]
    out = tmp_path / "sweep"
    args = [str(config), "--seeds", "1", "--nproc", "2", "--out", str(out),
            *sweep_overrides(data, **{"train.epochs": 3, "run.checkpoint_every_steps": 2})]
    run = out / "net_a" / "imagenet" / "seed0"
    other, commit = repo_at_another_commit(tmp_path / "repo")
    proc = sweep_until_a_checkpoint(args, run, threads=1, repo=other)
    try:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-3000:]
    assert "the same command resumes the sweep" in output
    assert "checkpointing at the next check" in (run / "train.log").read_text()
    deadline = time.time() + 2          # none left within 2 s of the sweep's exit
    while (left := live_processes_mentioning(f"run.output_dir={run}")) and time.time() < deadline:
        time.sleep(0.1)
    assert not left, left
    assert not (run / "result.json").exists()

    again = reproduce(args)
    assert f"seed 0 resumes in {run}" in again.stdout
    assert "resumed from" in (run / "train.log").read_text()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["world_size"] for row in rows} == {"2"}
    starts = json.loads((run / "result.json").read_text())["starts"]
    assert starts[0]["commit"] == commit != starts[1]["commit"] == rows[0]["commit"]
    assert [(s["world_size"], s["precision"]) for s in starts] == [(2, "fp32")] * 2
    assert {(row["starts"], row["mixed_starts"]) for row in rows} == \
        {("2", f"commit: {commit} -> {starts[1]['commit']}")}
    assert f"warning: {run}: its starts differ (commit: {commit[:12]} -> " in again.stderr
    assert f"- net_a/imagenet/seed0: commit: {commit[:12]} -> " in (out / "results.md").read_text()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_two_fresh_runs_of_one_seed_are_identical(tmp_path, data, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        run_training(base_overrides(data, out, **{"data.backend": backend, "train.seed": 7,
                                                 "data.workers": 2}),
                     in_process=False)   # fresh processes: hash seeds and the like differ too
        runs.append([(m["type"], m["step"], m.get("loss"), m.get("top1"), m.get("val_loss"))
                     for m in read_metrics(out) if m["type"] in ("train", "epoch")])
    assert len(runs[0]) > 4 and runs[0] == runs[1]


def test_table6_layout_from_the_real_configs(tmp_path):
    """Table 6's three configs over CIFAR-10 and CIFAR-100 (result.json files as the trainer
    writes them, no training): networks down, both data sets across, the paper's numbers read
    from the configs."""
    from engine.results_table import read_run, write_table
    from engine.sweep import plan
    configs = sorted(str(p) for p in (REPO / "configs" / "cifar" / "table6").glob("*.yaml"))
    runs = []
    for dataset in ("cifar10", "cifar100"):
        runs += plan(configs, [0, 1, 2], tmp_path, [f"data.dataset={dataset}"])
    svhn = sorted(str(p) for p in (REPO / "configs" / "svhn" / "table6").glob("*.yaml"))
    runs += plan(svhn, [0, 1, 2], tmp_path, [])
    for k, run in enumerate(runs):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "result.json").write_text(json.dumps({
            "status": "finished", "final_top1": 95.0 - k % 3, "final_top5": 99.0,
            "dataset": run.values["data"]["dataset"], "seed": run.seed,
            "config_digest": run.name, "commit": "c" * 40, "world_size": 8,
            "precision": "bf16", "deterministic": False, "hardware": "A100",
            "versions": {"torch": "2.14.1"}}))
    results = [read_run(r.run_dir, r.name, r.order, r.paper) for r in runs]
    write_table(results, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert ("| network | CIFAR-10 ours | CIFAR-10 paper | CIFAR-10 Δ | CIFAR-100 ours | "
            "CIFAR-100 paper | CIFAR-100 Δ | SVHN ours | SVHN paper | SVHN Δ |") in md
    assert "CIFAR-10: median of 5 runs" in md and "SVHN: how many runs is not stated" in md
    row = next(line for line in md.splitlines() if line.startswith("| WRN-28-10, dropout |"))
    # errors 5, 6, 7 per network and data set: median 6
    assert "6.00 (6.00 ± 1.00, 5.00-7.00, n=3) | 3.89 | +2.11 |" in row
    assert "| 18.85 | -12.85 |  |  |  |" in row                      # no SVHN number
    assert "| cifar/table6/wrn_28_10_dropout |" in row
    row = next(line for line in md.splitlines() if line.startswith("| WRN-52-1, dropout |"))
    assert "| 1.70 | +4.30 |" in row
    assert "| cifar/table6/wrn_52_1_dropout, svhn/table6/wrn_52_1_dropout |" in row
    assert [line.split(" |")[0] for line in md.splitlines() if line.startswith("| WRN")] == \
        ["| WRN-16-4, dropout", "| WRN-28-10, dropout", "| WRN-52-1, dropout"]
