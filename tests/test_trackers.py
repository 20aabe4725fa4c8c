"""Trackers against the real thing: an ``mlflow server`` (sqlite store, artifacts served by it)
started on 127.0.0.1 and stopped by PID, W&B in offline mode (its run files read back), and
TensorBoard's event files. A run is SIGKILLed after it has sent steps past its last checkpoint
and resumed: each tracker holds one run with each step once, equal to metrics.jsonl."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer_utils import REPO, THREADS, base_overrides, free_port, make_folder, read_metrics

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow

LOGGERS = "run.loggers=[jsonl,tensorboard,mlflow,wandb]"


def start_mlflow_server(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 with its sqlite store and artifacts in ``folder`` (the
    same store again when started again on it), in a session of its own (uvicorn's workers
    are its children)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT,
        start_new_session=True,
        # MLflow 3's job runner (7 huey consumer processes, for GenAI scorers; ~15 s of CPU
        # per start here) off: the tracking API served is the same
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    import urllib.request
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    stop(server)
    raise AssertionError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """The process and its session (the server's workers), by PID."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


def training(out: Path, data: Path, env: dict, *extra: str) -> subprocess.Popen:
    overrides = base_overrides(data, out, **{"train.epochs": 2})   # checkpoints at 6, 12, ...
    return subprocess.Popen(
        [sys.executable, str(REPO / "train_imagenet.py"), "--config", "configs/quickstart.yaml",
         *overrides, *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(REPO),
                        **env})


def mlflow_steps(url: str, out: Path) -> int:
    """The last step of train/loss the MLflow server holds for the run in ``out``."""
    try:
        run_id = json.loads((out / "trackers" / "mlflow.json").read_text())["run_id"]
    except (OSError, ValueError):
        return -1
    from mlflow.tracking import MlflowClient
    return max((m.step for m in MlflowClient(url).get_metric_history(run_id, "train/loss")),
               default=-1)


# ------------------------------------------------------------------ W&B's offline run files
def wandb_records(path: Path):
    """The records of a ``run-<id>.wandb`` file: W&B's LevelDB-style log (a 7-byte header, then
    32 KiB blocks of chunks: crc32, length, type) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", path
    data, pos, block, pending = raw[7:], 0, 32768, b""
    while pos + 7 <= len(data):
        left_in_block = block - (pos + 7) % block     # offsets count the file's header
        if left_in_block < 7:                          # a block's tail too short for a chunk
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and pending:                 # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_file: Path) -> tuple[set, dict, dict]:
    """A W&B run file's (run ids, {(key, step): [values]}, its last summary)."""
    ids, history, summary = set(), {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            step = items.pop("_step", None)
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault((key, step), []).append(value)
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return ids, history, summary


def tensorboard_steps(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def wandb_steps(out: Path) -> int:
    """The last step of train/loss the (only) W&B run file of ``out`` holds so far."""
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    try:
        return max((step for key, step in wandb_history(files[0])[1] if key == "train/loss"),
                   default=-1) if files else -1
    except Exception:       # noqa: BLE001 - a record half written out: read it again
        return -1


def kill_past_checkpoint(run: subprocess.Popen, out: Path, url: str) -> int:
    """SIGKILL once the loop has recorded step 8 (past the step-6 checkpoint), before the run
    ends: the resumed start redoes steps MLflow holds or sends it the ones it lacks. The step
    MLflow held."""
    deadline = time.time() + 240      # the loop's own record (a file read): polling the
    while (out / "metrics.jsonl").is_file() is False or \
            max([r["step"] for r in read_metrics(out)], default=0) < 8:   # server lagged, loaded
        assert run.poll() is None, f"the run ended before it was killed:\n{run.stdout.read()}"
        assert time.time() < deadline, "the run recorded nothing past step 7"
        time.sleep(0.02)
    run.kill()
    run.wait(timeout=30)
    held = mlflow_steps(url, out)
    assert held < 30, "killed too late"
    return held


def resumed_at(output: str) -> int:
    return int(re.search(r"resumed from \S+ at step (\d+)", output).group(1))


def finish(run: subprocess.Popen) -> str:
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output[-5000:]
    return output


# ------------------------------------------------------------------ the tests
def test_a_killed_and_resumed_run_is_one_tracker_run_with_each_step_once(tmp_path, data):
    server, url = start_mlflow_server(tmp_path / "mlflow")
    try:
        env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_NAME": "wrn-test",
               "WANDB_MODE": "offline", "WANDB_PROJECT": "wrn-test",
               "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.2"}
        out = tmp_path / "run"
        kill_past_checkpoint(training(out, data, env, LOGGERS, "train.epochs=5"), out, url)
        assert resumed_at(finish(training(out, data, env, LOGGERS, "train.epochs=5"))) < 30

        train = [r for r in read_metrics(out) if r["type"] == "train"]
        epochs = [r for r in read_metrics(out) if r["type"] == "epoch"]
        assert [r["step"] for r in train] == list(range(1, 31))     # each step once, in order
        assert [r["step"] for r in epochs] == [6, 12, 18, 24, 30]
        loss = {r["step"]: r["loss"] for r in train}
        checkpoint = out / "checkpoints" / "step_00000030.pt"
        sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

        # MLflow: one run, the config as params, each step once and equal to metrics.jsonl
        from mlflow.tracking import MlflowClient
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("wrn-test")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1, [r.info.run_name for r in runs]
        run = runs[0]
        assert run.info.run_id == json.loads((out / "trackers" / "mlflow.json").read_text())["run_id"]
        assert run.info.status == "FINISHED" and run.info.run_name == str(out)
        config = yaml.safe_load((out / "config.yaml").read_text())
        flat = {f"{s}.{k}": str(v) for s, keys in config.items() for k, v in keys.items()
                if not (isinstance(v, dict) and v)}
        flat.update({f"{s}.{k}.{kk}": str(vv) for s, keys in config.items()
                     for k, v in keys.items() if isinstance(v, dict) and v for kk, vv in v.items()})
        assert run.data.params == flat
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 31))
        assert all(m.value == pytest.approx(loss[m.step], rel=1e-6) for m in history)
        top1 = client.get_metric_history(run.info.run_id, "epoch/top1")
        assert sorted((m.step, m.value) for m in top1) == [(r["step"], r["top1"]) for r in epochs]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"training_curves.png", "config.yaml", "step_00000030.pt.sha256"}
        assert run.data.tags["final_checkpoint_sha256"] == sha256

        # W&B offline: two starts of one run id. The killed start's file holds what W&B's
        # service wrote out (every WANDB__TRANSACTION_LOG_FLUSH_INTERVAL): a prefix; the
        # resumed start sends every step again (offline, W&B holds none): each once
        starts = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(starts) == 2
        kept = json.loads((out / "trackers" / "wandb.json").read_text())["id"]
        killed, resumed = (wandb_history(path) for path in starts)
        assert killed[0] == resumed[0] == {kept}
        for history, complete in ((killed[1], False), (resumed[1], True)):
            losses = {step: v for (key, step), v in history.items() if key == "train/loss"}
            assert sorted(losses) == list(range(1, 31 if complete else len(losses) + 1))
            assert all(len(v) == 1 and v[0] == pytest.approx(loss[s], rel=1e-6)
                       for s, v in losses.items())
        assert resumed[2]["epoch/top1"] == pytest.approx(epochs[-1]["top1"])
        assert resumed[2]["final_checkpoint_sha256"] == sha256

        # TensorBoard: the steps after the checkpoint written by the killed start are purged
        assert [s for s, _ in tensorboard_steps(out, "train/loss")] == list(range(1, 31))
    finally:
        stop(server)


def test_a_tracker_that_hangs_while_the_run_is_killed_gets_every_step_on_resume(tmp_path, data):
    """The server stops answering (SIGSTOP: connections accepted, never answered) once it holds
    a step;
    the loop goes on regardless, checkpoints at step 6 and is SIGKILLed past it with records
    still unsent; the server goes down too (what it had not committed lost) and comes back on
    its store. The resumed start sends the killed start's records from metrics.jsonl, then its
    own: the MLflow run holds each step once."""
    server, url = start_mlflow_server(tmp_path / "mlflow")
    out = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    loggers = ("run.loggers=[jsonl,mlflow]", "train.epochs=5")
    try:
        run = training(out, data, env, *loggers)
        deadline = time.time() + 240
        while mlflow_steps(url, out) < 1:
            assert run.poll() is None and time.time() < deadline, run.stdout.read()
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGSTOP)    # the server and its uvicorn workers
        # past the checkpoint at 6 and a request timed out; a run that finished training by
        # then waits for its tracker (WRN_TRACKER_CLOSE_WAIT_S), alive to be killed
        stopped = time.time()
        while max([r["step"] for r in read_metrics(out)], default=0) < 8 or \
                time.time() < stopped + 4.5:
            assert run.poll() is None and time.time() < deadline, run.stdout.read()
            time.sleep(0.05)
        run.kill()
        output = run.communicate(timeout=60)[0]
        assert re.search(r"mlflow: (open|send) failed", output), output[-3000:]
        stop(server)
        server, url = start_mlflow_server(tmp_path / "mlflow", int(url.rsplit(":", 1)[1]))
        held = mlflow_steps(url, out)
        resumed = resumed_at(finish(training(out, data, env, *loggers)))
        assert held < resumed                  # checkpointed steps the server did not hold

        from mlflow.tracking import MlflowClient
        client = MlflowClient(url)
        run_id = json.loads((out / "trackers" / "mlflow.json").read_text())["run_id"]
        loss = {r["step"]: r["loss"] for r in read_metrics(out) if r["type"] == "train"}
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 31)) == sorted(loss)
        assert all(m.value == pytest.approx(loss[m.step], rel=1e-6) for m in history)
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGCONT)
        stop(server)


def test_a_tracker_server_that_goes_away_costs_a_warning_not_the_run(tmp_path, data):
    """The server goes away for good once it holds a step, while the run still has steps to
    go. The run is frozen (SIGSTOP: its loop and sender thread alike) from the moment the server
    is seen holding a step until the server is gone, so what the run recorded by then bounds
    what it could send: a server slow to open the run (a loaded machine) sends the backlog in
    one batch, as soon as its ``import mlflow`` is done. 8 epochs are a margin for that (an
    ``import mlflow`` that outlasts them fails the test, saying so)."""
    server, url = start_mlflow_server(tmp_path / "mlflow")
    out = tmp_path / "run"
    try:
        run = training(out, data, {"MLFLOW_TRACKING_URI": url, "WRN_TRACKER_CLOSE_WAIT_S": "2",
                                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
                       "run.loggers=[jsonl,mlflow]", "train.epochs=8")
        deadline = time.time() + 240
        while mlflow_steps(url, out) < 1:
            assert run.poll() is None and time.time() < deadline, run.stdout.read()
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGSTOP)
        os.waitpid(run.pid, os.WUNTRACED)       # every thread stopped: no line half-written
        recorded = max(r["step"] for r in read_metrics(out) if r["type"] == "train")
    finally:
        try:
            stop(server)                        # gone for good, mid-run
        finally:
            if run.poll() is None:
                os.kill(run.pid, signal.SIGCONT)
    assert recorded < 48, "the run trained to its end before the server held a step"
    output = finish(run)
    assert (out / "result.json").is_file()
    assert "mlflow: send failed" in output, output[-3000:]
    unsent = re.search(r"mlflow: (\d+) record\(s\) not sent", output)
    # at least the train records the run had not made when the server went away
    assert unsent and int(unsent.group(1)) >= 48 - recorded, output[-3000:]
    assert [r["step"] for r in read_metrics(out) if r["type"] == "train"] == list(range(1, 49))


def test_a_logger_whose_package_is_missing_or_unknown_is_one_line(tmp_path, data):
    """Before anything starts (no run directory). A missing package is made missing the way
    Python's import system knows: ``sys.modules[name] = None``."""
    cases = {"run.loggers=[jsonl,mlfow]": "run.loggers: unknown logger 'mlfow' (did you mean mlflow?)",
             "run.loggers=[wandb]": "run.loggers: wandb needs the wandb package: pip install "
                                    "'wrn-large[tracking]'"}
    for override, expected in cases.items():
        cmd = [sys.executable, "-c", "import runpy, sys; sys.modules['wandb'] = None; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
               str(REPO / "train_imagenet.py"), "--config", "configs/quickstart.yaml",
               *base_overrides(data, tmp_path / "out"), override]
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
        assert not (tmp_path / "out").exists()


def test_a_tracker_that_fails_is_tried_again_after_its_pause_not_at_every_record(tmp_path,
                                                                                  monkeypatch):
    """Records written while a tracker is down wait for its next try (RETRY_S later); the
    run's end asks for one last try at once, then the pause holds again."""
    from engine import trackers
    from engine.metrics import RunInfo
    # 2 s, not 5: the test waits out two pauses (the second one doubled)
    monkeypatch.setattr(trackers, "RETRY_S", 2.0)
    from engine.trackers import RETRY_S, Background

    tries, up = [], []

    class Tracker:
        def write_many(self, records):
            pass

        def close(self, status, artifacts):
            pass

    def never_opens(run):
        tries.append(time.monotonic())
        if up:
            return Tracker()
        raise ConnectionError("down")

    tracker = Background("down", never_opens, RunInfo(tmp_path, "run", {}, 0))
    for step in range(50):
        tracker.write("train", step, {"loss": 1.0})
        time.sleep(0.01)
    assert len(tries) == 1 and tracker.unsent() == 50
    tracker.close("finished", [])
    time.sleep(0.5)
    assert len(tries) == 2 and tries[1] - tries[0] < RETRY_S      # the last try, at once
    time.sleep(1.0)
    assert len(tries) == 2                                         # no spinning after it
    up.append(True)                   # back: its thread sends, closes and ends at the next try
    tracker.thread.join(3 * RETRY_S)
    assert not tracker.thread.is_alive() and tracker.unsent() == 0
