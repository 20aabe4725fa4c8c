"""Every rank's health for Prometheus (``run.prometheus_port``): each rank serves its own figures
over HTTP (``prometheus_client``, a thread of its own), so a scrape reaches a rank whatever its
main thread is doing.

- ``run.prometheus_port=N``: rank r serves on N + its local rank (one port per rank of a node).
  A port that is taken is one error on every rank, naming the port and the key.
- ``run.prometheus_port=0``: each rank takes a free port (job-array elements sharing a node).

Either way rank 0 writes the targets as a Prometheus ``file_sd`` file, ``RUN_DIR/``
``prometheus_targets.json``: one entry per rank, ``{"targets": ["HOST:PORT"], "labels": {...}}``
with the labels below, so that ``up`` says which rank a target is. A run that ends (finished,
stopped, preempted) empties it; a run that died leaves it, and its targets show ``up == 0``.

Series (gauges), each with the labels ``rank``, ``local_rank``, ``node``, ``host``, ``job_id``:

- ``wrn_step``, ``wrn_epoch``: optimizer steps done, the epoch they belong to (0-based);
- ``wrn_last_progress_timestamp_seconds``: the wall time of this rank's last step or phase
  change (the watchdog's progress): ``time() - wrn_last_progress_timestamp_seconds`` grows on a
  stuck rank, and on the ranks waiting for it;
- ``wrn_phase{phase=...}``: 1 for the phase the rank is in (``hooks.base``), 0 for the others;
- ``wrn_images_per_second``, ``wrn_data_wait_share``: at each check (``run.log_every_steps``),
  the job's images/s (as in ``metrics.jsonl``) and this rank's share of the interval spent
  waiting for input;
- ``wrn_last_checkpoint_step``: the step of the last checkpoint saved or resumed from (-1: none);
- ``wrn_bad_images{split=...}``: images quarantined (``data.on_bad_image=skip``), as last shared.

``node`` is the host name where each node (torchrun agent, ``GROUP_RANK``) has its own host, and
the ``GROUP_RANK`` where several share one (simulated nodes); ``host`` is the host name always.
``job_id`` is ``SLURM_JOB_ID``, else torchrun's ``--rdzv-id``, else the run directory's name: a
label named ``job`` would clash with the scrape job's own. Scrape with ``honor_labels: true``,
else Prometheus renames these (``exported_rank``) where the targets carry the same labels.

Per step: two attribute writes and ``time.time()``; the server reads them when scraped.
The server binds ``0.0.0.0`` (Prometheus scrapes from another host) unless
``WRN_PROMETHEUS_ADDR`` names an address; the targets name the host by ``socket.gethostname()``
where it binds every address."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..checkpoint import write_text_atomic
from ..config import ConfigError
from ..distributed import all_gather_object
from .base import CHECKPOINT, COLLECTIVE, COMPUTE, DATA, EVALUATION, START, Check, Hook

log = logging.getLogger("wrn_large.train")

TARGETS = "prometheus_targets.json"
KEY = "run.prometheus_port"
EXTRA = f"{KEY} needs prometheus_client: pip install 'wrn-large[tracking]'"
ADDR_ENV = "WRN_PROMETHEUS_ADDR"
PHASES = (START, DATA, COMPUTE, COLLECTIVE, EVALUATION, CHECKPOINT)
LABELS = ("rank", "local_rank", "node", "host", "job_id")


def require_client() -> None:
    """ValueError naming the extra where prometheus_client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ValueError(EXTRA) from None


def job_id(out: Path) -> str:
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var, "")
        if value and value != "none":
            return value
    return Path(out).resolve().name


def rank_labels(ranks: list[dict]) -> list[dict]:
    """Each rank's labels, from every rank's ``host``, ``group_rank``, ``local_rank`` and the
    job's ``job_id`` (rank 0's)."""
    groups_on = {}
    for r in ranks:
        groups_on.setdefault(r["host"], set()).add(r["group_rank"])
    shared = any(len(groups) > 1 for groups in groups_on.values())
    return [{"rank": str(rank), "local_rank": str(r["local_rank"]),
             "node": str(r["group_rank"]) if shared else r["host"], "host": r["host"],
             "job_id": ranks[0]["job_id"]} for rank, r in enumerate(ranks)]


class PrometheusHook(Hook):
    """On every rank. After StepTimesHook (its figures at a check) and the checkpoint and
    quarantine hooks (what they saved and found) in the hook list."""

    def __init__(self, port: int, out: str | Path, *, rank: int = 0, local_rank: int = 0,
                 is_main: bool = True):
        self.port, self.out, self.is_main = port, Path(out), is_main
        self.rank, self.local_rank = rank, local_rank
        self.addr = os.environ.get(ADDR_ENV, "0.0.0.0")
        self.server = self.thread = None
        self.labels: dict[str, str] = {}
        # what a scrape reads (plain attributes: written by the loop, read by the server thread)
        self.step = self.epoch = 0
        self.progress_at = time.time()
        self.phase = START
        self.images_per_s = self.data_wait = float("nan")
        self.checkpoint_step = -1
        self.bad_images: dict[str, int] = {}

    # ------------------------------------------------------------------ the server
    def before_train(self) -> None:
        from .checkpoint import CheckpointHook
        from .quarantine import QuarantineHook
        self.checkpoints = self.trainer.hooks.of_type(CheckpointHook)
        self.quarantine = self.trainer.hooks.of_type(QuarantineHook)
        self.step, self.epoch = self.trainer.state.step, self.trainer.state.epoch
        self.read_saved()
        error = self.serve()
        ranks = all_gather_object({
            "host": socket.gethostname(), "target": self.target,
            "port": self.server.server_port if self.server is not None else None,
            "error": error, "local_rank": self.local_rank, "job_id": job_id(self.out),
            "group_rank": int(os.environ.get("GROUP_RANK", "0"))})
        failed = [(rank, r["error"]) for rank, r in enumerate(ranks) if r["error"]]
        if failed:
            self.shutdown()
            rank, why = failed[0]
            more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            raise ConfigError(f"{KEY}={self.port}: rank {rank}{more} {why}")
        everyone = rank_labels(ranks)
        self.labels = everyone[self.rank]
        if self.is_main:
            targets = [{"targets": [f"{r['target']}:{r['port']}"], "labels": labels}
                       for r, labels in zip(ranks, everyone)]
            write_text_atomic(self.out / TARGETS, json.dumps(targets, indent=1) + "\n")
            log.info("Prometheus: rank 0 serves on %s:%d; %d target(s) in %s", ranks[0]["target"],
                     ranks[0]["port"], len(ranks), self.out / TARGETS)

    def serve(self) -> str | None:
        """Start this rank's server; why it could not (None: it serves)."""
        from prometheus_client import CollectorRegistry, start_http_server
        port = self.port + self.local_rank if self.port else 0
        if port > 65535:
            return f"would serve on port {port} (N + local rank {self.local_rank}): past 65535"
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        try:
            self.server, self.thread = start_http_server(port, addr=self.addr, registry=registry)
        except OSError as e:
            return (f"cannot serve on {self.addr}:{port} (N + local rank {self.local_rank}) on "
                    f"{socket.gethostname()}: {e.strerror or e}; choose another {KEY}, or 0 "
                    f"for free ports listed in RUN_DIR/{TARGETS}")
        return None

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = self.thread = None

    def after_train(self) -> None:
        self.shutdown()
        if self.is_main and self.labels and self.trainer.status is not None:
            write_text_atomic(self.out / TARGETS, "[]\n")   # ended: nothing left to scrape

    # ------------------------------------------------------------------ the figures
    @property
    def target(self) -> str:
        wildcard = self.addr in ("", "0.0.0.0", "::")
        return socket.gethostname() if wildcard else self.addr

    def on_phase(self, phase: str) -> None:
        self.phase = phase
        self.progress_at = time.time()

    def after_step(self) -> None:
        self.step = self.trainer.state.step
        self.progress_at = time.time()

    def after_check(self, check: Check) -> None:
        self.epoch = check.epoch
        self.images_per_s = check.metrics.get("images_per_s", float("nan"))
        waits = check.reduced.get("data_wait")
        if waits is not None:
            self.data_wait = min(waits[self.rank] / max(check.seconds, 1e-9), 1.0)
        self.read_saved()

    def after_epoch(self) -> None:
        self.epoch = self.trainer.state.epoch
        self.read_saved()

    def read_saved(self) -> None:
        saved = self.checkpoints.saved if self.checkpoints is not None else None
        self.checkpoint_step = saved[0] if saved is not None else -1
        if self.quarantine is not None:
            self.bad_images = {s: len(q) for s, q in self.quarantine.quarantines.items()}


class _Collector:
    """The hook's figures as gauges, read when scraped."""

    def __init__(self, hook: PrometheusHook):
        self.hook = hook

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        h = self.hook
        names, values = list(LABELS), [h.labels.get(k, "") for k in LABELS]

        def gauge(name, doc, value, **extra):
            family = GaugeMetricFamily(name, doc, labels=names + list(extra))
            family.add_metric(values + list(extra.values()), value)
            return family

        yield gauge("wrn_step", "optimizer steps done", h.step)
        yield gauge("wrn_epoch", "the epoch of those steps (0-based)", h.epoch)
        yield gauge("wrn_last_progress_timestamp_seconds",
                    "wall time of this rank's last step or phase change", h.progress_at)
        phase = GaugeMetricFamily("wrn_phase", "1 for the phase this rank is in",
                                  labels=names + ["phase"])
        current = h.phase
        for name in PHASES + (() if current in PHASES else (current,)):
            phase.add_metric(values + [name], 1.0 if name == current else 0.0)
        yield phase
        yield gauge("wrn_images_per_second", "the job's images/s over the last logging "
                    "interval", h.images_per_s)
        yield gauge("wrn_data_wait_share", "this rank's share of the last logging interval "
                    "spent waiting for input", h.data_wait)
        yield gauge("wrn_last_checkpoint_step", "step of the last checkpoint saved or resumed "
                    "from (-1: none)", h.checkpoint_step)
        bad = GaugeMetricFamily("wrn_bad_images", "images quarantined, by split",
                                labels=names + ["split"])
        for split, count in sorted(h.bad_images.items()):
            bad.add_metric(values + [split], count)
        yield bad
