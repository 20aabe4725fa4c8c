"""What a run's numbers came from: the commit, the config's digest, the seed, the world size, the
precision, the hardware and the versions of what it imported. Rank 0 writes it at the start of a
run (``provenance.json``) and again, with the final metrics, when the run finishes
(``result.json``: its presence is what ``reproduce.py`` takes for "this run is done").

A run may be started several times (resumed after a kill, a requeue, a torchrun restart), each
time perhaps at another commit, config digest, world size or precision: both files list every start that
trained (``starts``: time, commit, world size, hosts, precision, hardware, the step it resumed
from), and their top-level fields are the latest start's. ``mixed_starts`` names what the
starts of a run differ in (reproduce.py flags such a run).

``config_digest`` decides which runs are "the same run" (a sweep's run directory, a row of its
table): it leaves out the seed, the ``paper:`` section and ``OPERATIONAL``, the keys that do
not change what a run computes."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from .config import REPO_ROOT, Config, to_dict

PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda120", "deepspeed", "timm", "numpy",
            "pillow", "onnx", "onnxruntime", "detectron2", "pycocotools")
# The keys that change where a run goes, how it reports, or how it meets faults, never what it
# computes: a run resumed with other values of them is the same run, and runs of one table row
# may differ in them. Each with the reason it cannot change the numbers. Not among them:
# run.checkpoint_every_steps and run.max_steps (a save makes the BatchNorm statistics equal over
# ranks, and DDP's forward passes rank 0's on: where saves fall changes a multi-rank run's
# numbers), data.on_bad_image and data.max_bad_images (which files a run trains on).
OPERATIONAL = {
    "run.output_dir": "where the run goes (a sweep's run directory is its identity already)",
    "run.resume": "which checkpoint a start resumes from; resuming is exact (tested)",
    "run.keep_checkpoints": "how many saves stay on disk",
    "run.checkpoint_dir": "where the saves go (a folder or an S3 prefix), not what they hold",
    "run.async_checkpoint": "when a save's bytes are written, not what they hold (a copy of the "
                            "state at the same step; resuming is exact, tested)",
    "run.log_every_steps": "how often the loop logs and checks for NaN and stop requests",
    "run.progress": "rank 0's progress bar",
    "run.loggers": "where the figures are written (jsonl, tensorboard, mlflow, wandb)",
    "run.prometheus_port": "the health exporter's port",
    "data.workers": "DataLoader workers / DALI threads: every random draw is a function of "
                    "(seed, epoch, sample), never of the process that makes it",
    "data.read_ahead": "files read ahead by threads: the same bytes, earlier",
    "data.read_timeout_s": "when a stuck read is given up on: a fault's handling",
    "data.listing_cache": "where the listing is cached (checked against the folders)",
    "train.hang_timeout_s": "when the watchdog ends a stuck job",
    "train.straggler_factor": "when a slow rank is named in the log",
}
# besides them: the seed (a row's runs differ in it) and the paper's numbers (not the run's)
NOT_IN_DIGEST = ("train.seed", "paper", *OPERATIONAL)
# what the starts of one run must share for its numbers to be one computation's
START_KEYS = ("commit", "config_digest", "world_size", "precision", "micro_batch")


# keys added after runs had digests, each with the default that computes as before: at that
# value they are left out, so a config that does not use them keeps the digest it had (a sweep's
# run directories, engine/sweep.py, stay claimed across the upgrade)
LATER_KEYS = {"train.micro_batch": None}


def digest_values(values: dict) -> dict:
    """``values`` (a config as a dict) without the keys ``config_digest`` leaves out."""
    kept = {}
    for section, keys in values.items():
        if section in NOT_IN_DIGEST:
            continue
        kept[section] = {k: v for k, v in keys.items() if f"{section}.{k}" not in NOT_IN_DIGEST
                         and not (f"{section}.{k}" in LATER_KEYS
                                  and v == LATER_KEYS[f"{section}.{k}"])} \
            if isinstance(keys, dict) else keys
    return kept


def config_digest(values: dict) -> str:
    """sha256 (first 12 hex) of a config's values as a run computes with them (``digest_values``):
    the runs of one row of a table share it, and a sweep's run directory keeps it across the
    run's starts (``engine/sweep.py``)."""
    text = yaml.safe_dump(digest_values(values), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def git_commit(repo: Path = REPO_ROOT) -> str:
    """HEAD's hash, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def hardware(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}"


def provenance(cfg: Config, world_size: int, device, precision: str,
               hosts: list[str] = (), batching=None) -> dict:
    """This start's provenance; ``starts`` lists this start alone (``with_earlier_starts``).
    ``batching`` (engine/membership.py): the start's micro-batch and accumulation, which an
    elastic restart at another world size changes (the latter) or keeps (the former)."""
    values = to_dict(cfg)
    found = {"commit": git_commit(), "config_digest": config_digest(values),
             "model": cfg.model.name, "dataset": cfg.data.dataset, "seed": cfg.train.seed,
             "world_size": world_size, "precision": precision,
             "deterministic": cfg.train.deterministic, "hardware": hardware(device),
             "versions": versions()}
    start = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "commit": found["commit"], "config_digest": found["config_digest"],
             "world_size": world_size,
             "hosts": list(dict.fromkeys(hosts)), "precision": precision,
             "hardware": found["hardware"], "resumed_from_step": None}
    if batching is not None:
        start.update(micro_batch=batching.micro_batch, accumulation=batching.accumulation)
    return {**found, "starts": [start]}


def earlier_starts(path: Path) -> list[dict]:
    """The starts a run's ``provenance.json`` lists that went on to train (a start's
    ``resumed_from_step`` is set when its training begins); one made of the top-level fields
    of a file written before starts were listed."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if "starts" not in old:       # the step it trained from is not known: -1
        return [{"time": None, **{k: old[k] for k in (*START_KEYS, "hardware") if k in old},
                 "hosts": [], "resumed_from_step": -1}] if "commit" in old else []
    return [s for s in old["starts"] if s.get("resumed_from_step") is not None]


def with_earlier_starts(values: dict, path: Path) -> dict:
    """``values`` with the starts of ``path`` before its own (which is the last)."""
    return {**values, "starts": earlier_starts(path) + values["starts"][-1:]}


def began_training(values: dict, step: int) -> dict:
    """``values`` once its start's training begins at ``step``: the earlier starts whose work
    it builds on, those that began before ``step`` (a start from scratch owes nothing to the
    earlier ones; one that resumed at or after ``step`` was undone, as its steps are done
    again)."""
    start = {**values["starts"][-1], "resumed_from_step": step}
    kept = [s for s in values["starts"][:-1] if s["resumed_from_step"] < step]
    return {**values, "starts": kept + [start]}


def mixed_starts(starts: list[dict]) -> dict[str, list]:
    """What the starts of one run differ in: {key: its values in order} for ``START_KEYS``."""
    mixed = {}
    for key in START_KEYS:     # a start written before a key was recorded does not count for it
        seen = list(dict.fromkeys(s[key] for s in starts if key in s))
        if len(seen) > 1:
            mixed[key] = seen
    return mixed


def write_json(path: Path, values: dict) -> None:
    from .checkpoint import write_text_atomic
    write_text_atomic(path, json.dumps(values, indent=2) + "\n")
