"""Experiment trackers as metric sinks (``run.loggers``): MLflow and Weights & Biases.

Each tracker's calls run in a thread of its own, in order (``Background``): a tracker server
that is slow or gone costs a warning in the log, never a step of the run. At the end the thread
is given ``CLOSE_WAIT_S`` to send what is queued; what it could not send is named in the log.

A tracker's run is kept in ``RUN_DIR/trackers/<name>.json`` (its id). A resumed run continues
the same tracker run: it first sends metrics.jsonl's records from before its start that the
tracker does not hold (a start killed with records queued), then its own steps, skipping those
the tracker holds (a resumed run recomputes them exactly; MLflow keeps a metric's every value,
so sending them again would record them twice).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from .checkpoint import CHECKSUM_SUFFIX, MANIFEST, write_text_atomic
from .metrics import RunInfo, record, register_sink, scalars

log = logging.getLogger("wrn_large.train")
CLOSE_WAIT_S = float(os.environ.get("WRN_TRACKER_CLOSE_WAIT_S", 60))
MAX_QUEUED = 100_000         # records kept while a server does not answer; older ones dropped
BATCH = 200                  # records per send (MLflow takes up to 1000 metrics a request)
RETRY_S, MAX_RETRY_S = 5.0, 120.0   # after a failure, the next try (doubling)
# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes): a
# tracker thread stuck that long falls behind the run. Users' own settings win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def checkpoint_sha256(artifacts: list[Path]) -> str | None:
    """The final checkpoint file's sha256, from its ``.sha256`` among the artifacts (a
    DeepSpeed directory has a manifest of its files instead: None)."""
    for path in artifacts:
        if path.name.endswith(CHECKSUM_SUFFIX) and path.name != MANIFEST:
            return path.read_text().split()[0]
    return None


def flatten(values: dict, prefix: str = "") -> dict:
    """A nested config as ``section.key -> value``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TrackerRecord:
    """``RUN_DIR/trackers/<name>.json``: which tracker run is this run's (its id, where)."""

    def __init__(self, out: Path, name: str):
        self.path = out / "trackers" / f"{name}.json"
        self.values = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def set(self, **values) -> None:
        self.values = values
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(values, indent=2) + "\n")


class Background:
    """A tracker driven from a daemon thread: the loop's records go to ``pending`` (oldest
    first) and the thread sends them in batches, in order. What fails (opening the tracker, a
    send) stays pending and is tried again after ``RETRY_S`` (doubling up to ``MAX_RETRY_S``),
    each failure logged (the first of its kind, then every 50th); past ``MAX_QUEUED`` pending
    records the oldest are dropped, and counted. ``close`` asks the thread to send what is left
    and close the tracker; ``wait_closed`` gives all trackers one deadline together."""

    def __init__(self, name: str, open_tracker, run: RunInfo):
        self.name, self.open_tracker, self.run = name, open_tracker, run
        self.tracker, self.failures, self.dropped = None, {}, 0
        self.lock = threading.Lock()
        self.pending: deque = deque(run.earlier)   # those the tracker holds are skipped
        self.closing: tuple | None = None
        self.wake: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.work, name=f"tracker-{name}", daemon=True)
        self.thread.start()

    def write(self, kind: str, step: int, values: dict) -> None:
        with self.lock:
            if len(self.pending) >= MAX_QUEUED:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append(record(kind, step, values))
        self.wake.put(True)

    def close(self, status: str | None, artifacts: list[Path]) -> None:
        self.closing = (status, list(artifacts))
        self.wake.put(True)

    def work(self) -> None:
        retry_s = RETRY_S
        while True:
            if self.send():
                retry_s = RETRY_S
                if self.closing is not None:
                    self.finish()
                    return
                self.wake.get()
            else:                     # the tracker did not answer: again in a while (records
                self.pause(retry_s)   # written meanwhile wait; the run's end does not)
                retry_s = min(2 * retry_s, MAX_RETRY_S)

    def pause(self, seconds: float) -> None:
        """``seconds``, or until the run's end asks for a last try (once)."""
        deadline, closed = time.monotonic() + seconds, self.closing is not None
        while (closed or self.closing is None) and (left := deadline - time.monotonic()) > 0:
            try:
                self.wake.get(timeout=left)
            except queue.Empty:
                return

    def send(self) -> bool:
        """Open the tracker if it is not yet, then send every pending record; False on a
        failure (the records not sent stay pending)."""
        try:
            if self.tracker is None:
                self.tracker = self.open_tracker(self.run)
            while True:
                with self.lock:
                    batch = list(itertools.islice(self.pending, BATCH))
                if not batch:
                    return True
                self.tracker.write_many(batch)
                with self.lock:       # unless the loop dropped them meanwhile (MAX_QUEUED)
                    for record in batch:
                        if self.pending and self.pending[0] is record:
                            self.pending.popleft()
        except Exception as e:  # noqa: BLE001 - a tracker never ends the run
            self.failed("open" if self.tracker is None else "send", e)
            return False

    def finish(self) -> None:
        try:
            self.tracker.close(*self.closing)
        except Exception as e:  # noqa: BLE001
            self.failed("close", e)

    def unsent(self) -> int:
        with self.lock:
            return len(self.pending) + self.dropped

    def failed(self, what: str, error: Exception) -> None:
        count = self.failures[what] = self.failures.get(what, 0) + 1
        if count == 1 or count % 50 == 0:
            first = str(error).splitlines()[0][:300] if str(error) else ""
            log.warning("%s: %s failed (%d time(s) so far; the run goes on, records are kept "
                        "and sent again): %s: %s", self.name, what, count,
                        type(error).__name__, first)


def wait_closed(sinks) -> None:
    """Wait for the closing trackers among ``sinks``, all within one deadline; name what each
    could not send."""
    deadline = time.monotonic() + CLOSE_WAIT_S
    for sink in sinks:
        if isinstance(sink, Background):
            sink.thread.join(max(0.0, deadline - time.monotonic()))
            left = sink.unsent()
            if sink.thread.is_alive() or left:
                log.warning("%s: %d record(s) not sent and the run not closed there (the tracker "
                            "did not answer within %g s of the run's end); metrics.jsonl has "
                            "every record", sink.name, left, CLOSE_WAIT_S)


def register_tracker(name: str, open_tracker, requires: str, prepare=None) -> None:
    """The sink ``name``: its tracker ``open_tracker(run)`` driven by a ``Background`` thread;
    ``prepare()`` first, in the calling thread (the environment is set there, before the
    thread); ``requires``: the module it imports."""
    def sink(run: RunInfo) -> Background:
        if prepare is not None:
            prepare()
        return Background(name, open_tracker, run)

    sink.requires = requires
    register_sink(name)(sink)


# ------------------------------------------------------------------ MLflow
def mlflow_defaults() -> None:
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


STATUS = {"finished": "FINISHED", "max_steps": "FINISHED", None: "FAILED"}   # else KILLED


class MlflowTracker:
    """One MLflow run per run directory, on ``MLFLOW_TRACKING_URI`` (experiment
    ``MLFLOW_EXPERIMENT_NAME``, else MLflow's default): params = the resolved config, metrics
    KIND/KEY at each step, and at the end ``training_curves.png``, ``config.yaml`` and the final
    checkpoint's ``.sha256`` as artifacts (its hash also as the tag ``final_checkpoint_sha256``).
    A start from step 0 is a new MLflow run (a run begun again owes nothing to the earlier
    one); a resumed start continues the recorded one."""

    def __init__(self, run: RunInfo):
        import mlflow
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient()
        uri = mlflow.get_tracking_uri()
        record = TrackerRecord(run.out, "mlflow")
        self.held: dict[str, int] = {}        # kind -> the last step the server holds
        if run.start_step and record.get("run_id") and record.get("tracking_uri") == uri:
            self.run_id = record.get("run_id")
            self.client.update_run(self.run_id, status="RUNNING")
            self.held = self.steps_held()
            log.info("mlflow: continuing run %s at %s (it holds steps up to %s)", self.run_id,
                     uri, self.held or "none")
        else:
            created = self.client.create_run(self.experiment_id(), run_name=run.name,
                                             tags={"run_dir": str(run.out.resolve())})
            self.run_id = created.info.run_id
            record.set(run_id=self.run_id, tracking_uri=uri)
            log.info("mlflow: run %s at %s", self.run_id, uri)
        self.log_params(flatten(run.config))

    def steps_held(self) -> dict[str, int]:
        """Per kind of record, the last step the server holds: asked, not remembered (a start
        killed after a send and before it learnt of the answer leaves either state); records
        are sent in order, a batch in one request."""
        held: dict[str, int] = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            kind = key.split("/", 1)[0]
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            held[kind] = max([held.get(kind, -1), *steps])
        return held

    def experiment_id(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return "0"                                  # MLflow's "Default"
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def log_params(self, params: dict) -> None:
        """The params this run does not hold yet (a param is set once in MLflow; a resume
        with another value of an operational key, say data.workers, keeps the first)."""
        from mlflow.entities import Param
        held = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in held]
        changed = sorted(k for k, v in params.items() if k in held and held[k] != str(v))
        if changed:
            log.warning("mlflow: run %s keeps its first value of %s", self.run_id,
                        ", ".join(changed))
        for i in range(0, len(new), 100):               # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def write_many(self, records: list[dict]) -> None:
        """The records the server does not hold, as one request."""
        from mlflow.entities import Metric
        now, metrics, held = int(time.time() * 1000), [], dict(self.held)
        for r in records:
            if r["step"] > held.get(r["type"], -1):
                metrics += [Metric(tag, float(v), now, r["step"]) for tag, v in scalars(r).items()]
                held[r["type"]] = r["step"]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.held = held

    def close(self, status: str | None, artifacts: list[Path]) -> None:
        if sha256 := checkpoint_sha256(artifacts):
            self.client.set_tag(self.run_id, "final_checkpoint_sha256", sha256)
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, STATUS.get(status, "KILLED"))


register_tracker("mlflow", MlflowTracker, requires="mlflow", prepare=mlflow_defaults)


# ------------------------------------------------------------------ Weights & Biases
class WandbTracker:
    """One W&B run per run directory (``WANDB_PROJECT``, else "wrn-large"; ``WANDB_MODE=offline``
    writes it under RUN_DIR/wandb without a network, for ``wandb sync``): the resolved config,
    KIND/KEY at each step, the final checkpoint's sha256 in the summary. A start from step 0 is
    a new W&B run. W&B knows itself which steps a resumed run holds (its ``starting_step``; a
    sync drops a step it holds): what it was sent is only written out by its service every 15 s
    (``x_transaction_log_flush_interval``), so a start that is killed loses up to that much, and
    a record of ours of what it was sent would skip steps it never kept. A stop asked from W&B's
    side is a warning: the job's scheduler stops a job (W&B's default interrupts the main
    thread, which would leave the other ranks waiting)."""

    def __init__(self, run: RunInfo):
        import wandb
        record = TrackerRecord(run.out, "wandb")
        run_id = record.get("id") if run.start_step and record.get("id") else secrets.token_hex(4)
        record.set(id=run_id)           # before init: a start killed inside it keeps the id
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "wrn-large"), id=run_id,
                              resume="allow", name=run.name, dir=str(run.out), config=run.config,
                              settings=wandb.Settings(console="off", stop_fn=self.stop_asked))

    @staticmethod
    def stop_asked() -> None:
        log.warning("wandb: the run was marked stopped in W&B; training goes on (stop the job "
                    "with its scheduler: it checkpoints)")

    def write_many(self, records: list[dict]) -> None:
        for r in records:
            if r["step"] >= self.run.starting_step:
                self.run.log(scalars(r), step=r["step"])

    def close(self, status: str | None, artifacts: list[Path]) -> None:
        if sha256 := checkpoint_sha256(artifacts):
            self.run.summary["final_checkpoint_sha256"] = sha256
        self.run.finish(exit_code=0 if status is not None else 1)


register_tracker("wandb", WandbTracker, requires="wandb")
