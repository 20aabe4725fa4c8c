"""Every rank's health for Prometheus (engine/hooks/prometheus.py): the hook's server, port and
file_sd file in this process; a training's figures over HTTP; and (slow) Debian's `prometheus`
server scraping a 2-process run: both ranks' steps rising, then one rank SIGSTOPped: its `up` is
0 while the other's series go on."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config import ConfigError
from engine.hooks import Check, CheckpointHook, HookList, PrometheusHook, QuarantineHook
from engine.hooks.prometheus import EXTRA, TARGETS, rank_labels
from pipelines.quarantine import Quarantine
from trainer_utils import (REPO, base_overrides, cli_in_process, free_port, make_folder,
                           train_in_process)

pytest.importorskip("prometheus_client", reason="the tracking extra")
pytestmark = pytest.mark.timeout(300)
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} of a rank's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    (found,) = [v for (n, ls), v in samples.items()
                if n == name and set(labels.items()) <= ls]
    return found


def hook_on_a_stub_trainer(out: Path, port: int, local_rank: int):
    trainer = SimpleNamespace(state=SimpleNamespace(step=7, epoch=1), status=None)
    checkpoints = CheckpointHook(out, engine=None)
    checkpoints.saved = (6, 1)
    bad = Quarantine("train")
    bad.add(3, "corrupt JPEG")
    hook = PrometheusHook(port, out, rank=0, local_rank=local_rank)
    trainer.hooks = HookList([QuarantineHook({"train": bad}, out), checkpoints, hook], trainer)
    return trainer, hook


@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setenv("WRN_PROMETHEUS_ADDR", "127.0.0.1")
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "GROUP_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_a_rank_serves_on_n_plus_its_local_rank_and_lists_itself_for_file_sd(tmp_path,
                                                                                loopback):
    port = free_port()
    trainer, hook = hook_on_a_stub_trainer(tmp_path, port - 2, local_rank=2)
    hook.before_train()
    try:
        trainer.state.step = 8
        hook.on_phase("data")
        hook.after_step()
        hook.after_check(Check(step=8, epoch=1, lr=0.1, steps=4, seconds=2.0, loss=1.0,
                               reduced={"data_wait": [0.5]},
                               metrics={"images_per_s": 123.0, "data_wait": 0.25}))
        before = time.time()
        got = scrape(port)
    finally:
        trainer.status = "finished"
        hook.after_train()
    labels = {"rank": "0", "local_rank": "2", "node": socket.gethostname(),
              "host": socket.gethostname(), "job_id": tmp_path.name}
    assert value(got, "wrn_step", **labels) == 8
    assert value(got, "wrn_epoch") == 1
    assert before - 5 < value(got, "wrn_last_progress_timestamp_seconds") <= before
    assert value(got, "wrn_phase", phase="data") == 1
    assert value(got, "wrn_phase", phase="compute") == 0
    assert value(got, "wrn_images_per_second") == 123.0
    assert value(got, "wrn_data_wait_share") == 0.25        # this rank's: 0.5 s of 2 s
    assert value(got, "wrn_last_checkpoint_step") == 6
    assert value(got, "wrn_bad_images", split="train") == 1
    assert hook.server is None
    assert json.loads((tmp_path / TARGETS).read_text()) == []   # the run ended: no targets


def test_the_file_sd_file_lists_every_rank_with_its_labels(tmp_path, loopback):
    port = free_port()
    _, hook = hook_on_a_stub_trainer(tmp_path, port, local_rank=0)
    hook.before_train()
    try:
        (entry,) = json.loads((tmp_path / TARGETS).read_text())
    finally:
        hook.after_train()     # a run that failed (no status) leaves its targets: up == 0
    assert entry == {"targets": [f"127.0.0.1:{port}"], "labels": hook.labels}
    assert json.loads((tmp_path / TARGETS).read_text()) == [entry]


def test_a_taken_port_is_one_error_naming_it_and_the_key(tmp_path, loopback):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _, hook = hook_on_a_stub_trainer(tmp_path, port - 1, local_rank=1)
        with pytest.raises(ConfigError) as error:
            hook.before_train()
        hook.after_train()
    message = str(error.value)
    assert f"run.prometheus_port={port - 1}: rank 0 cannot serve on 127.0.0.1:{port}" in message
    assert "\n" not in message and hook.server is None
    assert not (tmp_path / TARGETS).exists()


def test_node_is_the_host_unless_nodes_share_one_then_the_group_rank():
    def rank(host, group, local):
        return {"host": host, "group_rank": group, "local_rank": local, "job_id": "77"}
    distinct = rank_labels([rank("a", 0, 0), rank("a", 0, 1), rank("b", 1, 0)])
    assert [r["node"] for r in distinct] == ["a", "a", "b"]
    shared = rank_labels([rank("a", 0, 0), rank("a", 1, 0)])
    assert [(r["node"], r["host"], r["rank"]) for r in shared] == [("0", "a", "0"),
                                                                   ("1", "a", "1")]
    assert {r["job_id"] for r in shared} == {"77"}


def test_without_prometheus_client_the_run_stops_before_it_starts_naming_the_extra(
        tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)   # import fails
    out = tmp_path / "run"
    proc = cli_in_process(base_overrides(tmp_path, out, **{"run.prometheus_port": 0}))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"config error: {EXTRA}", proc.stderr
    assert "wrn-large[tracking]" in EXTRA and not out.exists()


def test_a_training_serves_its_steps_and_phases(tmp_path, loopback):
    """The hook as engine/build.py places it, in a real (1-process) training: scraped at each
    check, the step is the check's and the figures are StepTimesHook's."""
    data = make_folder(tmp_path / "data", train_per_class=8, val_per_class=2)
    seen = []

    def scrape_at_checks(trainer):
        hook = trainer.hooks.of_type(PrometheusHook)
        after_check = hook.after_check

        def spy(check):
            after_check(check)
            seen.append((check.step, scrape(hook.server.server_port)))
        hook.after_check = spy
        trainer.hooks = HookList(trainer.hooks, trainer)     # the spy in the event table

    train_in_process(base_overrides(data, tmp_path / "run", **{
        "run.prometheus_port": 0, "train.epochs": 2, "run.log_every_steps": 1}),
        patch=scrape_at_checks)
    assert [step for step, _ in seen] == list(range(1, 7))
    for step, got in seen:
        assert value(got, "wrn_step") == step
        assert value(got, "wrn_phase", phase="all-reduce") == 1
        assert value(got, "wrn_images_per_second") > 0
        assert 0 <= value(got, "wrn_data_wait_share") <= 1
    assert value(seen[-1][1], "wrn_last_checkpoint_step") == 3   # epoch 1's end
    assert json.loads((tmp_path / "run" / TARGETS).read_text()) == []


# ----------------------------------------------------------------- a real Prometheus server
def ready(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/-/ready", timeout=5).status == 200
    except OSError:
        return False


def api(base: str, query: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    answer = json.load(urllib.request.urlopen(url, timeout=5))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def by_rank(result: list[dict]) -> dict[str, tuple[float, float]]:
    """rank -> (sample time, value) of an instant query's answer."""
    return {r["metric"]["rank"]: (r["value"][0], float(r["value"][1])) for r in result}


def wait_until(what, condition, timeout=30.0, proc=None):
    """condition()'s first true answer, polled; ``proc`` ending first fails with its output."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = condition()
        if got:
            return got
        assert proc is None or proc.poll() is None, output(proc)
        time.sleep(0.25)
    raise TimeoutError(what)


def start(cmd: list[str], log: Path, **popen) -> subprocess.Popen:
    """``cmd`` in a session of its own, its output in ``log`` (a pipe nobody reads would fill
    and block it)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **popen)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()[-3000:]


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK="))[5:])


def stop(proc: subprocess.Popen) -> None:
    """End a process group started with start_new_session (SIGCONT first: a stopped process
    ignores all but SIGKILL)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                    reason="needs Debian's prometheus server (install.sh --test-system)")
def test_prometheus_sees_both_ranks_step_and_a_stopped_rank_go_down(tmp_path):
    data = make_folder(tmp_path / "data", train_per_class=8, val_per_class=2)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "WRN_PROMETHEUS_ADDR": "127.0.0.1"}
    train = start(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}",
         str(REPO / "train_imagenet.py"), "--config", "configs/quickstart.yaml",
         *base_overrides(data, out, **{"run.prometheus_port": 0, "train.epochs": 500,
                                       "run.eval_every_epochs": 500, "train.hang_timeout_s": 0,
                                       "run.log_every_steps": 3})],
        tmp_path / "train.out", cwd=REPO, env=env)
    server = None
    try:
        targets = out / TARGETS
        wait_until("the file_sd file", lambda: targets.exists(), 120, train)
        assert len(json.loads(targets.read_text())) == 2
        (tmp_path / "prometheus.yml").write_text(json.dumps({   # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "500ms"},
            "scrape_configs": [{"job_name": "wrn", "honor_labels": True, "file_sd_configs": [
                {"files": [str(targets)], "refresh_interval": "1s"}]}]}))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            tmp_path / "prometheus.log")
        wait_until("prometheus ready", lambda: ready(base), 30, server)

        def steps():
            got = by_rank(api(base, "wrn_step"))
            return got if len(got) == 2 else None

        def rising(since: float) -> bool:
            got = steps()
            return got is not None and all(got[r][1] > since for r in "01")
        first = wait_until("both ranks' wrn_step", steps, 30, train)
        wait_until("both ranks' steps rising", lambda: rising(max(v for _, v in first.values())),
                   30, train)

        workers = subprocess.run(["pgrep", "-P", str(train.pid)], capture_output=True,
                                 text=True, check=True).stdout.split()
        victim = next(int(p) for p in workers if rank_of(int(p)) == 1)
        os.kill(victim, signal.SIGSTOP)

        def rank_1_down():
            got = by_rank(api(base, "up"))
            return got if got.get("1", (0, 1))[1] == 0 else None
        up = wait_until("rank 1's up == 0", rank_1_down)
        assert up["0"][1] == 1
        # rank 0 waits for rank 1 in its next all-reduce: it is still scraped (its samples'
        # times advance), its step stays, time() - its last progress grows; rank 1's series
        # ended (Prometheus marks a failed target's series stale)
        time.sleep(2.5)
        before = (by_rank(api(base, "timestamp(wrn_step)")), by_rank(api(base, "wrn_step")),
                  by_rank(api(base, "time() - wrn_last_progress_timestamp_seconds")))
        time.sleep(2.5)
        after = (by_rank(api(base, "timestamp(wrn_step)")), by_rank(api(base, "wrn_step")),
                 by_rank(api(base, "time() - wrn_last_progress_timestamp_seconds")))
        assert after[0]["0"][1] > before[0]["0"][1], (before, after)     # scraped since
        assert after[1]["0"][1] == before[1]["0"][1], (before, after)    # no step
        assert 2 < before[2]["0"][1] < after[2]["0"][1], (before, after)  # no progress
        assert "1" not in after[1], after
        assert by_rank(api(base, "up"))["0"][1] == 1
        os.kill(victim, signal.SIGCONT)
        wait_until("rank 1 up again", lambda: by_rank(api(base, "up"))["1"][1] == 1)
        wait_until("both ranks' steps rising again", lambda: rising(after[1]["0"][1]), 30, train)
    finally:
        for proc in (server, train):
            if proc is not None:
                stop(proc)
