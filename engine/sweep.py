"""The runs of a sweep (reproduce.py): every (config, seed) pair in its own run directory,
OUT/<config>/<dataset>/seed<k>, run locally one after another or as one SLURM job array.

A run is finished when its result.json exists (the trainer writes it last), and is never run
again; any other run is started, or resumed from its checkpoint by the trainer's
run.resume=auto. Each run directory holds ``sweep.json``: the config and overrides it was
started with; a later sweep that asks something else of the same directory is refused, unless
what differs is operational (``engine.provenance.OPERATIONAL``: workers, read-ahead, timeouts,
logging, ports), which a run may change between its starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import REPO_ROOT, ConfigError, find_config, load_config, to_dict
from .provenance import config_digest, digest_values


@dataclass
class PlannedRun:
    config: str          # as given on the command line
    name: str            # the config's path under configs/, without .yaml
    order: int
    seed: int
    run_dir: Path
    overrides: list      # the user's, then the seed's and the run directory's
    values: dict         # the config as requested (before the trainer fills in 'auto')
    paper: dict

    @property
    def finished(self) -> bool:
        return (self.run_dir / "result.json").is_file()

    @property
    def started(self) -> bool:
        return (self.run_dir / "checkpoints").is_dir()

    def train_args(self) -> list[str]:
        return ["--config", self.config, *self.overrides]


def config_name(found: Path) -> str:
    """A resolved config's path under configs/, without .yaml (its file name elsewhere)."""
    try:
        return str(found.relative_to(REPO_ROOT / "configs").with_suffix(""))
    except ValueError:
        return found.stem


def plan(configs: list[str], seeds: list[int], out: Path, overrides: list[str]) -> list[PlannedRun]:
    """Every (config, seed) run, each config checked (unknown keys, bad values) before any run."""
    runs = []
    for order, given in enumerate(configs):
        found = find_config(given).resolve()
        name, config = config_name(found), str(found)
        dataset = load_config(config, overrides).data.dataset
        for seed in seeds:
            run_dir = out / name / dataset / f"seed{seed}"
            extra = [f"train.seed={seed}", f"run.output_dir={run_dir}"]
            values = to_dict(load_config(config, overrides + extra))
            runs.append(PlannedRun(config, name, order, seed, run_dir, overrides + extra,
                                   values, values["paper"]))
    return runs


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def claim(run: PlannedRun) -> None:
    """Record what this run directory is for, or refuse if it holds another config's run. The
    recorded values' digest is computed again, so a directory claimed before a key became
    operational is judged by today's list."""
    path = run.run_dir / "sweep.json"
    digest = config_digest(run.values)
    if path.is_file():
        old = json.loads(path.read_text())
        if config_digest(old["values"]) != digest:
            changed = differences(digest_values(old["values"]), digest_values(run.values))
            raise ConfigError(f"{run.run_dir} holds a run of another config ({'; '.join(changed[:5])})"
                              f": use another --out, or remove that directory")
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": run.config, "overrides": run.overrides,
                                "digest": digest, "values": run.values}, indent=2) + "\n")


STOPPED = 143   # the exit code of a run stopped by SIGTERM after its checkpoint


def run_locally(run: PlannedRun, nproc: int, python: str = sys.executable) -> int:
    """The run in a fresh process (torchrun for ``nproc`` > 1); its exit code, or ``STOPPED``
    when this process was sent SIGTERM meanwhile. The signal is passed on, and the run
    waited for: the trainer checkpoints and stops (torchrun passes it to its ranks), so a
    `kill` of the sweep neither loses the run's work nor leaves it running on its own."""
    script = str(REPO_ROOT / "train_imagenet.py")
    if nproc > 1:
        cmd = [python, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script]
    else:
        cmd = [python, script]
    stopped, child = [], None

    def pass_on(signum, frame):
        stopped.append(signum)
        if child is not None:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        child = subprocess.Popen(cmd + run.train_args(), cwd=REPO_ROOT)
        if stopped:                 # it came before the child was there to pass it on to
            child.send_signal(signal.SIGTERM)
        code = child.wait()
    except KeyboardInterrupt:       # Ctrl-C reached the run's process group too: let it end
        if child is not None:
            child.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return STOPPED if stopped else code


# ---------------------------------------------------------------------------- SLURM
def submit_array(runs: list[PlannedRun], out: Path, sbatch_args: list[str]) -> str:
    """One job array of launch/slurm.sbatch, an element per run: its line of the plan file
    (run directory, then train_imagenet.py's arguments, tab-separated) tells it which. Returns
    the array's job id, also kept in OUT/slurm/submitted.json."""
    folder = out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / f"array-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.tsv"
    plan_file.write_text("".join("\t".join([str(r.run_dir.resolve()), *r.train_args()]) + "\n"
                                 for r in runs))
    cmd = ["sbatch", "--parsable", f"--array=0-{len(runs) - 1}", "--job-name=reproduce",
           f"--export=ALL,WRN_SWEEP={plan_file.resolve()}", *sbatch_args,
           str(REPO_ROOT / "launch" / "slurm.sbatch")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"sbatch failed ({' '.join(cmd)}): {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    (folder / "submitted.json").write_text(json.dumps({"job": job, "plan": str(plan_file)}) + "\n")
    return job


def queued_array(out: Path) -> str | None:
    """The job id of this sweep's array while any of its elements is still in SLURM's queue."""
    path = out / "slurm" / "submitted.json"
    if not path.is_file():
        return None
    job = json.loads(path.read_text())["job"]
    try:
        listed = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return job if listed.returncode == 0 and listed.stdout.strip() else None
