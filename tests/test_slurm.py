"""launch/slurm.sbatch under a real SLURM (tests/slurm_cluster.py: munged, slurmctld and three
slurmd on 127.0.0.1, proctrack/cgroup as in production), submitted from a fresh clone as the
README says: training over 2 nodes, and every way to stop a job of the script's header, each
with its checkpoint, the requeue or the end, and the resumed run's losses against the
uninterrupted run's. Skips with the reason where the daemons cannot run (not installed, not
root)."""
import json
import subprocess
import sys
import time

import pytest

from slurm_cluster import SlurmCluster
from trainer_utils import (REPO, base_overrides, free_port, make_folder, read_metrics,
                           step_losses, sweep_overrides, write_table_configs)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
_reason = SlurmCluster.skip_reason()
if _reason:
    pytestmark.append(pytest.mark.skip(reason=_reason))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone, as a cluster user has it (no .venv: PYTHON names the test's interpreter),
    with the working tree's version of every tracked file (the code under test)."""
    dest = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout
    pack = subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], cwd=REPO, input=files,
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-xf", "-", "-C", str(dest)], input=pack, check=True)
    return dest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def signal_data(tmp_path_factory):
    """1,200 images: 150 steps an epoch, so every stop falls in the first few epochs. (The
    torch backend's fork-server workers of finished epochs linger until the garbage collector
    ends their loader, whose shutdown then waits 5 s per worker: around epoch 11 of a 48-image
    set a rank stalls for two minutes, longer than any grace a test can give.)"""
    return make_folder(tmp_path_factory.mktemp("signal_folder"), train_per_class=400)


@pytest.fixture
def linuxproc_cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm_linuxproc"), proctrack="linuxproc").start()
    yield c
    c.stop()


def submit(cluster, clone, overrides, name, sbatch_options=(), env=()):
    # STOP_GRACE_S: the grace rule's one number, within the time limit case's 30 s lead;
    # OMP_NUM_THREADS: one thread per rank wherever the job runs (the script gives a rank the
    # cores of its node, 2 here without task/affinity): losses equal to the last bit
    exports = ",".join([f"PYTHON={sys.executable}", f"MASTER_PORT={free_port()}",
                        f"PYTHONPATH={clone}", "STOP_GRACE_S=20", "OMP_NUM_THREADS=1", *env])
    cmd = ["sbatch", "--parsable", f"--job-name={name}", *sbatch_options,
           f"--export=ALL,{exports}",
           "launch/slurm.sbatch", "--config", "configs/quickstart.yaml", *overrides]
    return cluster.run(cmd, cwd=clone).stdout.strip().split(";")[0]


def steps_done(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if r["type"] == "train"), default=0)


def wait_for_step(cluster, job, run_dir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if steps_done(run_dir) >= step:
            return
        state = cluster.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, log_of(run_dir, job))
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def requeued(cluster, job, run_dir, timeout=300):
    """Wait until the requeued job is PENDING (its steps have ended); returns the last step
    done. It starts again by itself after SlurmCluster.CRED_EXPIRE_S."""
    deadline = time.time() + timeout
    while (state := cluster.job_state(job)) != "PENDING":
        assert state in ("RUNNING", "COMPLETING"), (f"job {job} was not requeued: {state}",
                                                     log_of(run_dir, job))
        if time.time() > deadline:
            raise TimeoutError(f"job {job} was not requeued (state {state})")
        time.sleep(0.5)
    return steps_done(run_dir)


def assert_no_work_lost(run_dir, last_step):
    """The stop wrote a checkpoint at the last step done (at the check after the signal: with
    run.log_every_steps=6, within 6 steps of it; nothing after it was lost)."""
    saved = checkpoints(run_dir)
    assert saved and saved[-1] == last_step >= 6, (saved, last_step, log_of(run_dir))
    assert "checkpointing at the next check" in (run_dir / "train.log").read_text()
    return last_step


def log_of(run_dir, job=None):
    """The ends of the run's train.log and of the job's SLURM output (logs/<name>-<job>.out)."""
    path = run_dir / "train.log"
    text = path.read_text()[-3000:] if path.exists() else "(no train.log)"
    if job is not None:
        for out in (run_dir.parent.parent / "logs").glob(f"*-{job}.out"):
            text += f"\n--- {out.name}:\n" + out.read_text()[-3000:]
    return text


def checkpoints(run_dir):
    return sorted(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step_*.pt"))


def signal_overrides(data, out, **extra):
    """DataLoader workers running (forked from each rank's fork server), a constant learning
    rate (the same losses whatever train.epochs says) and a stop check every 6 steps: after a
    check a rank needs 5 more batches than its workers hold ready (2 x prefetch 2), so a worker
    killed by a signal to the whole step fails the rank before it saves."""
    return base_overrides(data, out, **{"data.workers": 2, "schedule.name": "step",
                                        "schedule.warmup_epochs": 0, "run.log_every_steps": 6,
                                        **extra})


@pytest.fixture(scope="module")
def reference(cluster, clone, signal_data):
    """The uninterrupted run: 2 nodes, 1 epoch; its losses, every 6 steps."""
    out = clone / "runs" / "two_nodes"
    job = submit(cluster, clone, signal_overrides(signal_data, out, **{"train.epochs": 1}), "two")
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert state == "COMPLETED", log_of(out, job)
    return out, step_losses(out)


def test_two_nodes_train_from_a_fresh_clone_in_the_readme_order(reference):
    out, losses = reference
    assert "2 process(es)" in (out / "train.log").read_text()      # one rank on each node
    assert sorted(losses) == list(range(6, 151, 6))     # 1,200 images / global batch 8


def test_deepspeed_engine_over_two_nodes(cluster, clone, data):
    """The DeepSpeed engine under srun + torchrun (what replaces `deepspeed --hostfile`)."""
    out = clone / "runs" / "deepspeed"
    job = submit(cluster, clone, base_overrides(data, out, **{"train.epochs": 1,
                                                               "engine.name": "deepspeed"}), "ds")
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert state == "COMPLETED", (clone / "logs" / f"ds-{job}.out").read_text()[-3000:]
    assert "deepspeed engine, 2 process(es)" in (out / "train.log").read_text()
    assert (out / "checkpoints" / "step_00000006" / "weights.pt").is_file()


STOP_PATHS = {  # sbatch options, the command that stops the job (None: it stops itself), then
    # what the job does: requeue (and resume), end, or cancel (a checkpoint is not promised)
    # a real time limit: USR1 to the batch shell 30 s before it (SLURM sends it up to 60 s
    # early), the script's --signal=B:USR1@180 with a limit a test can wait for
    # (`scancel --batch --signal=USR1` by hand is this very path: SLURM sends it here)
    "time_limit": (["--time=2", "--signal=B:USR1@30"], None, "requeue"),
    # without --batch SLURM signals every process of the job's steps, workers included
    "usr1_steps": ([], lambda job: ["scancel", "--signal=USR1", job], "requeue"),
    "scontrol": ([], lambda job: ["scontrol", "requeue", job], "requeue"),
    # PreemptMode=REQUEUE: a job of a higher-priority partition needs 2 of the 3 nodes to
    # itself, so at least one of the 2-node job's
    "preemption": ([], lambda job: ["sbatch", "--partition=urgent", "--nodes=2", "--exclusive",
                                    "--output=/dev/null", "--wrap", "sleep 5"], "requeue"),
    "batch_term": ([], lambda job: ["scancel", "--batch", "--signal=TERM", job], "end"),
    # SIGTERM to the script, srun and the ranks: srun turns it into SIGKILL for its tasks
    "scancel": ([], lambda job: ["scancel", job], "cancel"),
}
# each path with the torch backend's workers under proctrack/cgroup; one with DALI, and one
# under proctrack/linuxproc
STOP_CASES = [*STOP_PATHS, "usr1_steps-dali", "usr1_steps-linuxproc"]


@pytest.mark.parametrize("case", STOP_CASES)
def test_a_stop_checkpoints_and_requeues_or_ends_as_documented(cluster, clone, signal_data,
                                                                reference, request, case):
    how, _, variant = case.partition("-")
    options, stop, outcome = STOP_PATHS[how]
    if variant == "linuxproc":
        cluster = request.getfixturevalue("linuxproc_cluster")
    out = clone / "runs" / f"stop_{case}"
    extra = {"data.backend": "dali"} if variant == "dali" else {}
    lead = ["SIGNAL_LEAD_S=30"] if how == "time_limit" else []
    job = submit(cluster, clone, signal_overrides(signal_data, out, **{"train.epochs": 1000,
                                                                        **extra}),
                 f"stop_{case}", options, lead)
    wait_for_step(cluster, job, out, 6)
    if stop is not None:
        cluster.run(stop(job))
    if outcome == "requeue":
        saved = assert_no_work_lost(out, requeued(cluster, job, out, timeout=200))
        wait_for_step(cluster, job, out, saved + 6)
        assert f"resumed from {out}/checkpoints/step_{saved:08d}" in (out / "train.log").read_text()
        cluster.run(["scancel", job])
        cluster.wait_state(job, {"CANCELLED"})
        last = saved + 6
    else:
        ended = {"end": {"COMPLETED", "FAILED", "CANCELLED"}, "cancel": {"CANCELLED"}}[outcome]
        state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "PENDING"})
        assert state in ended, (state, log_of(out, job))
        time.sleep(5)
        assert cluster.job_state(job) == state                      # and not requeued later
        if outcome == "end":
            assert_no_work_lost(out, steps_done(out))
        last = steps_done(out)
    if variant != "dali":   # DALI's images are not the torch backend's: no reference
        got, want = step_losses(out), reference[1]
        # every check up to the resumed run's first (the time limit's may come after the
        # reference's epoch)
        compared = [s for s in range(6, last + 1, 6) if s in want]
        assert compared and all(s in got for s in compared), (sorted(got), last)
        for s in compared:                    # per step, the last attempt's loss
            assert got[s] == pytest.approx(want[s], rel=1e-6), (s, got[s], want[s])


def test_a_stopped_rank_restarts_the_group_and_the_job_completes(cluster, clone, data):
    """kill -STOP one rank of a 2-node job: the watchdog ends the hung group (exit 75),
    torchrun restarts it from the last checkpoint, and the job completes."""
    import os
    import signal
    out = clone / "runs" / "hung"
    job = submit(cluster, clone, base_overrides(data, out, **{
        "train.epochs": 8, "run.checkpoint_every_steps": 2, "train.hang_timeout_s": 10,
        "data.read_timeout_s": 0}), "hung")   # reads never given up on: a 10 s hang timeout
    wait_for_step(cluster, job, out, 5)
    candidates = subprocess.run(["pgrep", "-f", f"run.output_dir={out}"],
                                capture_output=True, text=True).stdout.split()
    victim = next(int(p) for p in candidates if environ_of(int(p)).get("RANK") == "1"
                  and b"distributed.run" not in open(f"/proc/{p}/cmdline", "rb").read())
    os.kill(victim, signal.SIGSTOP)
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    log = (out / "train.log").read_text()
    assert state == "COMPLETED", log_of(out, job)
    assert "HANG: no rank made progress" in log and "Stuck: rank 1" in log, log_of(out, job)
    assert "resumed from" in log and steps_done(out) == 48


def test_reproduce_as_a_job_array_with_an_element_requeued(cluster, clone, data):
    """reproduce.py --slurm: 2 configs x 2 seeds as one array; element 0 is requeued mid-run
    (it checkpoints, and resumes); when the array has ended, the same command writes the whole
    table."""
    configs = write_table_configs(clone / "runs" / "table_configs")
    out = clone / "runs" / "sweep"
    cmd = [sys.executable, "reproduce.py", *map(str, configs), "--seeds", "2", "--out", str(out),
           "--slurm", "--sbatch-args=--nodes=1",
           *sweep_overrides(data, **{"train.epochs": 6, "run.checkpoint_every_steps": 2})]
    env = {"PYTHON": sys.executable, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1"}
    submitted = cluster.run(cmd, cwd=clone, env=env, timeout=120)
    array = submitted.stdout.split("submitted job array ")[1].split(":")[0]
    first = out / "net_a" / "imagenet" / "seed0"       # element 0: the plan's first run
    element = f"{array}_0"
    wait_for_step(cluster, element, first, 3)
    cluster.run(["scontrol", "requeue", element])
    saved = requeued(cluster, element, first, timeout=200)
    deadline = time.time() + 900
    while cluster.run(["squeue", "-h", "-j", array], check=False).stdout.strip():
        assert time.time() < deadline, cluster.run(["squeue", "-j", array]).stdout
        time.sleep(1)
    assert f"resumed from {first}/checkpoints/step_{saved:08d}" in (first / "train.log").read_text()
    again = cluster.run(cmd, cwd=clone, env=env, timeout=120)
    assert "4 of 4 runs finished" in again.stdout, again.stdout + again.stderr
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2
    md = (out / "results.md").read_text()
    assert "n=2) | 40.00 |" in md and "n=2) | 30.00 |" in md


def test_an_elastic_job_loses_a_node_and_finishes_on_the_other_two(cluster, clone, data):
    """sbatch --nodes=3 --no-kill with ELASTIC_MIN_NODES=2: one node's torchrun agent and its
    rank SIGKILLed at once (the node gone; not the one hosting the rendezvous store). The
    others re-form at 2 processes, keep the micro-batch, accumulate 3 instead of 2, and finish:
    the job COMPLETED, every step done once in the record, one membership change 3 -> 2."""
    import os
    import signal
    out = clone / "runs" / "elastic"
    job = submit(cluster, clone, base_overrides(data, out, **{
        "train.batch_size": 12, "train.grad_accum": 2, "train.epochs": 12, "optim.lr": 0.01,
        "run.checkpoint_every_steps": 2}), "elastic", sbatch_options=["--nodes=3", "--no-kill"],
        env=["ELASTIC_MIN_NODES=2", "LAST_CALL_S=1"])
    wait_for_step(cluster, job, out, 3)
    agents = [int(p) for p in subprocess.run(["pgrep", "-f", f"launch/torchrun.py .*{out}"],
                                             capture_output=True, text=True).stdout.split()
              if open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[1] == b"launch/torchrun.py"]
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    victim = next(a for a in agents if f"pid={a}," not in listening)   # not the store's host
    ranks = subprocess.run(["pgrep", "-P", str(victim)], capture_output=True,
                           text=True).stdout.split()
    for pid in [*map(int, ranks), victim]:
        os.kill(pid, signal.SIGKILL)
    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    assert len(agents) == 3 and state == "COMPLETED", log_of(out, job)
    rows = read_metrics(out)
    changes = [r for r in rows if r["type"] == "membership"]
    assert [(r["old_world"], r["new_world"], r["micro_batch"], r["accumulation"])
            for r in changes] == [(3, 2, 2, 3)], log_of(out, job)
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 49))


def environ_of(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(v.decode(errors="replace").split("=", 1) for v in f.read().split(b"\0")
                    if b"=" in v)
