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

import json
import logging
import os
import queue
import secrets
import threading
import time
from pathlib import Path

from .checkpoint import CHECKSUM_SUFFIX, MANIFEST, write_text_atomic
from .metrics import RunInfo, numbers, register_sink

log = logging.getLogger("wrn_large.train")
CLOSE_WAIT_S = float(os.environ.get("WRN_TRACKER_CLOSE_WAIT_S", 60))
MAX_QUEUED = 10_000          # records held while a server does not answer; older ones dropped
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
    """A tracker's opening, writes and close, run in order in a daemon thread. A failure is
    logged (the first of each call, then every 50th) and the next call tries again."""

    def __init__(self, name: str, open_tracker, run: RunInfo):
        self.name, self.tracker, self.failures = name, None, {}
        self.calls: queue.Queue = queue.Queue()
        self.dropped = 0
        self.thread = threading.Thread(target=self.work, name=f"tracker-{name}", daemon=True)
        self.thread.start()
        self.calls.put(("open", (open_tracker, run)))

    def write(self, kind: str, step: int, values: dict) -> None:
        if self.calls.qsize() >= MAX_QUEUED:
            self.dropped += 1
            return
        self.calls.put(("write", (kind, step, dict(values))))

    def close(self, status: str | None, artifacts: list[Path]) -> None:
        self.calls.put(("close", (status, list(artifacts))))
        self.calls.put(None)
        self.thread.join(CLOSE_WAIT_S)
        left = self.calls.qsize() + self.dropped
        if self.thread.is_alive() or self.dropped:
            log.warning("%s: %d record(s) not sent (the tracker did not answer within %g s); "
                        "metrics.jsonl has them all", self.name, left, CLOSE_WAIT_S)

    def work(self) -> None:
        while (call := self.calls.get()) is not None:
            what, args = call
            try:
                if what == "open":
                    opener, run = args
                    self.tracker = opener(run)
                    self.catch_up(run.earlier)
                elif self.tracker is not None:
                    getattr(self.tracker, what)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never ends the run
                self.failed(what, e)

    def catch_up(self, records: list[dict]) -> None:
        """The records of metrics.jsonl from before this start, each sent unless the tracker
        holds it (a killed start can have checkpointed steps its thread had not sent yet)."""
        for record in records:
            values = {k: v for k, v in record.items() if k not in ("type", "step")}
            self.tracker.write(record["type"], record["step"], values)

    def failed(self, what: str, error: Exception) -> None:
        count = self.failures[what] = self.failures.get(what, 0) + 1
        if count == 1 or count % 50 == 0:
            log.warning("%s: %s failed (%d time(s) so far; the run goes on): %s: %s", self.name,
                        what, count, type(error).__name__, str(error).splitlines()[0][:300]
                        if str(error) else "")


def background(name: str, open_tracker):
    """A sink class whose tracker ``open_tracker(run)`` runs in a ``Background`` thread."""
    def sink(run: RunInfo) -> Background:
        return Background(name, open_tracker, run)

    return sink


# ------------------------------------------------------------------ MLflow
class MlflowTracker:
    """One MLflow run per run directory, on ``MLFLOW_TRACKING_URI`` (experiment
    ``MLFLOW_EXPERIMENT_NAME``, else MLflow's default): params = the resolved config, metrics
    KIND/KEY at each step, and at the end ``training_curves.png``, ``config.yaml`` and the final
    checkpoint's ``.sha256`` as artifacts (its hash also as the tag ``final_checkpoint_sha256``)."""

    def __init__(self, run: RunInfo):
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient()
        uri = mlflow.get_tracking_uri()
        record = TrackerRecord(run.out, "mlflow")
        self.held: dict[str, int] = {}        # kind -> the last step the server holds
        if record.get("run_id") and record.get("tracking_uri") == uri:
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
        killed after a send and before it learnt of the answer leaves either state); a record's
        metrics are one request, and records are sent in order."""
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

    def write(self, kind: str, step: int, values: dict) -> None:
        if step <= self.held.get(kind, -1):
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{k}", float(v), now, step) for k, v in numbers(values).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.held[kind] = step

    def close(self, status: str | None, artifacts: list[Path]) -> None:
        if sha256 := checkpoint_sha256(artifacts):
            self.client.set_tag(self.run_id, "final_checkpoint_sha256", sha256)
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", None: "FAILED"}
                                   .get(status, "KILLED"))


register_sink("mlflow")(background("mlflow", MlflowTracker)).requires = "mlflow"


# ------------------------------------------------------------------ Weights & Biases
class WandbTracker:
    """One W&B run per run directory (``WANDB_PROJECT``, else "wrn-large"; ``WANDB_MODE=offline``
    writes it under RUN_DIR/wandb without a network, for ``wandb sync``): the resolved config,
    KIND/KEY at each step, the final checkpoint's sha256 in the summary. W&B knows itself which
    steps a resumed run holds (its ``starting_step``; a sync drops a step it holds): what it was
    sent is only written out by its service every 15 s (``x_transaction_log_flush_interval``),
    so a start that is killed loses up to that much, and a record of ours of what it was sent
    would skip steps it never kept."""

    def __init__(self, run: RunInfo):
        import wandb
        self.record = TrackerRecord(run.out, "wandb")
        run_id = self.record.get("id") or secrets.token_hex(4)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "wrn-large"), id=run_id,
                              resume="allow", name=run.name, dir=str(run.out),
                              config=run.config, settings=wandb.Settings(console="off"))
        if self.record.get("id") != run_id:
            self.record.set(id=run_id)

    def write(self, kind: str, step: int, values: dict) -> None:
        if step >= self.run.starting_step:
            self.run.log({f"{kind}/{k}": v for k, v in numbers(values).items()}, step=step)

    def close(self, status: str | None, artifacts: list[Path]) -> None:
        if sha256 := checkpoint_sha256(artifacts):
            self.run.summary["final_checkpoint_sha256"] = sha256
        self.run.finish(exit_code=0 if status is not None else 1)


register_sink("wandb")(background("wandb", WandbTracker)).requires = "wandb"
