"""Cluster fault tolerance, tested for real on 127.0.0.1 (gloo, CPU): simulated multi-node,
a SIGKILLed worker under torchrun --max-restarts, SIGTERM preemption, and two jobs on one run
directory. Slow: deselect with -m 'not slow'; CI runs them."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from engine.checkpoint import checkpoint_dir, list_checkpoints
from trainer_utils import (REPO, base_overrides, epochs, free_port, make_folder, read_metrics,
                           run_training, step_losses)

pytestmark = pytest.mark.slow
STEPS = 18  # 3 epochs x 6 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted: one node, 2 processes, 3 epochs."""
    out = tmp_path_factory.mktemp("reference")
    run_training(base_overrides(data, out, **{"train.epochs": 3}), nproc=2)
    return step_losses(out)


def torchrun(args, overrides, env_extra=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(REPO / "train_imagenet.py"),
           "--config", "configs/quickstart.yaml", *overrides]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, start_new_session=True, **popen)
    _started.append(proc)
    return proc


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """A failed test must not leave a torchrun job behind."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.terminate()  # torchrun forwards SIGTERM to its workers and reaps them
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


def wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and max(step_losses(out), default=0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_two_simulated_nodes_match_one_node(data, reference, tmp_path):
    out = tmp_path / "two_nodes"
    port = free_port()
    overrides = base_overrides(data, out, **{"train.epochs": 3})
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]
    nodes = [torchrun(common + [f"--node-rank={r}"], overrides) for r in (0, 1)]
    assert_nodes_match_one_node(nodes, out, reference)


def assert_nodes_match_one_node(nodes, out, reference):
    """Every simulated node ends well, and the run's losses are the 1-node run's."""
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), logs[0][-3000:] + logs[1][-3000:]
    got = step_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s] == pytest.approx(reference[s], rel=1e-6), s


def test_sigkilled_worker_restarts_and_resumes_exactly(data, reference, tmp_path):
    out = tmp_path / "killed"
    args = ["--nproc-per-node=2", "--max-restarts=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=killed"]
    proc = torchrun(args, base_overrides(data, out, **{"train.epochs": 3,
                                                       "run.checkpoint_every_steps": 4}))
    wait_for_step(out, 9, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    victim = int(workers.stdout.split()[-1])
    os.kill(victim, signal.SIGKILL)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from" in log and "step_00000008.pt" in log
    got = step_losses(out)  # per step, the last attempt's loss
    assert max(got) == STEPS and len(epochs(out)) == 3
    # the restart resumed at the step-8 checkpoint: metrics.jsonl kept the steps up to it and
    # holds the replayed ones once (the killed start's records after step 8 dropped)
    assert re.search(r"resumed from \S*step_00000008\.pt", log), log[-4000:]
    logged_steps = [m["step"] for m in read_metrics(out) if m["type"] == "train"]
    assert logged_steps == list(range(1, STEPS + 1))
    for s in range(9, STEPS + 1):
        assert got[s] == reference[s], (s, got[s], reference[s])


def test_sigterm_checkpoints_then_next_start_resumes(data, reference, tmp_path):
    out = tmp_path / "preempted"
    overrides = base_overrides(data, out, **{"train.epochs": 3})
    proc = torchrun(["--nproc-per-node=2", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"], overrides)
    wait_for_step(out, 4, proc)
    proc.send_signal(signal.SIGTERM)       # what SLURM sends to torchrun on preemption
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    stopped = [p for p in list_checkpoints(checkpoint_dir(out))]
    assert stopped, log[-3000:]
    saved_step = int(stopped[0].name[5:13])
    assert 4 <= saved_step < STEPS
    run_training(overrides, nproc=2)
    got = step_losses(out)
    assert max(got) == STEPS
    for s in range(saved_step + 1, STEPS + 1):
        assert got[s] == reference[s], s


def test_second_job_on_the_same_run_directory_refuses(data, tmp_path):
    out = tmp_path / "shared"
    first = torchrun(["--nproc-per-node=1", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}"],
                     base_overrides(data, out, **{"train.epochs": 1000}))
    wait_for_step(out, 1, first)
    second = run_training(base_overrides(data, out), check=False)
    assert second.returncode == 4
    assert "in use by another training job" in second.stderr
    assert first.poll() is None            # the first job is unharmed


def test_workers_never_outlive_a_sigkilled_agent(data, reference, tmp_path):
    """SIGKILL the torchrun agent (the OOM killer, a crashed node agent): its workers, in
    sessions of their own, get SIGTERM from the kernel (parent-death signal), checkpoint after
    the current step and exit within seconds; the same command then resumes."""
    out = tmp_path / "orphans"
    overrides = base_overrides(data, out, **{"train.epochs": 3})
    with open(tmp_path / "torchrun.log", "w") as log:  # a file: a pipe would wait for orphans
        proc = torchrun(["--nproc-per-node=2", "--master_addr=127.0.0.1",
                         f"--master_port={free_port()}"], overrides, stdout=log, stderr=log)
    wait_for_step(out, 4, proc)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    while time.time() < killed_at + 20 and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.05)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")]
    for w in alive:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive, "workers outlived their agent by 20 s"
    saved = list_checkpoints(checkpoint_dir(out))
    assert saved, "the workers stopped without a checkpoint"
    saved_step = int(saved[0].name[5:13])
    assert 4 <= saved_step < STEPS, saved_step          # stopped early, after the current step
    proc = run_training(overrides, nproc=2)             # not refused: the lock died with them
    assert "resumed from" in proc.stdout
    got = step_losses(out)
    assert max(got) == STEPS
    for s in range(saved_step + 1, STEPS + 1):
        assert got[s] == reference[s], s


def test_multinode_script_with_two_simulated_nodes(data, reference, tmp_path):
    """launch/multinode.sh run twice on 127.0.0.1, as on two nodes (c10d assigns the ranks)."""
    out = tmp_path / "multinode"
    # NPROC_PER_NODE unset: the script asks $PYTHON for the GPU count (0 here: one process)
    env = {k: v for k, v in os.environ.items() if k != "NPROC_PER_NODE"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = ["bash", "launch/multinode.sh", "2", f"127.0.0.1:{free_port()}",
            "--config", "configs/quickstart.yaml", *base_overrides(data, out, **{"train.epochs": 3})]
    nodes = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    assert_nodes_match_one_node(nodes, out, reference)


def rank_of(pid: int) -> int:
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK="))[5:])


def log_time(line: str) -> float:
    """The wall time of a log line (``%(asctime)s``)."""
    import datetime
    stamp = line[line.index("20"):][:23]
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_stopped_rank_is_named_its_stacks_written_and_the_job_restarts(data, reference,
                                                                          tmp_path):
    """kill -STOP one rank mid-epoch: the other rank's watchdog names it within
    hang_timeout_s + 30 s, writes its stacks and exits 75; torchrun restarts the group, which
    resumes from the last checkpoint and repeats the uninterrupted run's losses."""
    from engine.watchdog import HANG_EXIT_CODE
    out = tmp_path / "hung"
    timeout = 10
    args = ["--nproc-per-node=2", "--max-restarts=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=hung"]
    proc = torchrun(args, base_overrides(data, out, **{
        "train.epochs": 3, "run.checkpoint_every_steps": 4, "train.hang_timeout_s": timeout,
        "data.read_timeout_s": 0}))
    wait_for_step(out, 9, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    victim = next(int(p) for p in workers.stdout.split() if rank_of(int(p)) == 1)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.time()
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-4000:]
    hang = next(line for line in log.splitlines() if "HANG: no rank made progress" in line)
    assert "Stuck: rank 1 (" in hang and "stopped, frozen or gone" in hang, hang
    assert log_time(hang) - stopped_at < timeout + 30
    stacks = list(out.glob("hang_*_rank0.txt"))
    assert re.search(rf"exitcode\s*:\s*{HANG_EXIT_CODE}\b", log), log[-4000:]
    assert len(stacks) == 1 and "most recent call first" in stacks[0].read_text()
    assert "in train_epoch" in stacks[0].read_text()   # the main thread, where it waits
    assert "killing rank 1" in log          # stopped: it would ignore torchrun's SIGTERM for 30 s
    assert "resumed from" in log and "step_00000008.pt" in log
    got = step_losses(out)
    assert max(got) == STEPS
    for s in range(9, STEPS + 1):
        assert got[s] == reference[s], (s, got[s], reference[s])


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2,
                    reason="needs taskset and 2 cores")
def test_a_rank_throttled_from_outside_is_named_and_only_it(data, tmp_path):
    """Rank 1 shares core 0 with six busy loops (taskset), rank 0 has core 1: the log names
    rank 1 as a straggler, never rank 0, and metrics.jsonl keeps every rank's figures."""
    out = tmp_path / "straggler"
    proc = torchrun(["--nproc-per-node=2", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"],
                    base_overrides(data, out, **{"train.epochs": 8, "run.log_every_steps": 3,
                                                 "run.eval_every_epochs": 8}))
    wait_for_step(out, 1, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in map(int, workers.stdout.split()):
        subprocess.run(["taskset", "-a", "-p", "-c", "1" if rank_of(pid) == 0 else "0", str(pid)],
                       check=True, capture_output=True)
    # rank 1 gets a seventh of core 0: far slower than rank 0 even where other work shares
    # core 1 with it (another test running beside this one)
    busy = [subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
            for _ in range(6)]
    try:
        log = proc.communicate(timeout=300)[0]
    finally:
        for loop in busy:
            loop.kill()
            loop.wait()
    assert proc.returncode == 0, log[-3000:]
    named = re.findall(r"straggler: rank (\d+) on \S+ is ([\d.]+)x", log)
    assert named and {rank for rank, _ in named} == {"1"}, log[-3000:]
    records = [m for m in read_metrics(out) if m["type"] == "train"]
    assert all(len(m["rank_forward_s"]) == len(m["rank_data_wait_s"]) == 2 for m in records)
    assert all(0 <= m["data_wait"] <= 1 for m in records)


def stop_rank(proc, rank: int) -> int:
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    victim = next(int(p) for p in workers.stdout.split() if rank_of(int(p)) == rank)
    os.kill(victim, signal.SIGSTOP)
    return victim


def hang_line(log: str) -> str:
    return next(line for line in log.splitlines() if "HANG: no rank made progress" in line)


def test_a_rank_stopped_during_evaluation_is_found(tmp_path):
    """Rank 1 stopped while both evaluate (1,800 validation images): rank 0's table shows it
    waiting in evaluation, rank 1 named; the restarted job finishes."""
    data = make_folder(tmp_path / "data", val_per_class=600)
    out = tmp_path / "run"
    proc = torchrun(["--nproc-per-node=2", "--max-restarts=1", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=eval-hang"],
                    base_overrides(data, out, **{"train.epochs": 2, "train.hang_timeout_s": 10,
                                                 "data.read_timeout_s": 0}))
    wait_for_step(out, 6, proc)                 # epoch 1's last step: its evaluation follows
    stop_rank(proc, 1)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-4000:]
    line = hang_line(log)
    assert "Stuck: rank 1 (" in line, log[-6000:]
    table = log[log.index(line):].splitlines()[1:3]
    assert "evaluation" in table[1] and table[1].split()[0] == "0", table
    assert len(epochs(out)) == 2 and epochs(out)[-1]["val_samples"] == 1800


def test_a_rank_stopped_while_writing_a_checkpoint_leaves_none_half_written(tmp_path):
    """Rank 0 stopped while it writes a WRN-50-2 checkpoint (~0.8 GB, seconds): rank 1, waiting
    for it, names it; the restarted job resumes from a complete checkpoint (or from scratch),
    and every checkpoint left verifies against its checksum."""
    from engine import checkpoint as ckpt
    data = make_folder(tmp_path / "data", train_per_class=8)   # 3 steps: checkpoints at 2 and 3
    out = tmp_path / "run"
    proc = torchrun(["--nproc-per-node=2", "--max-restarts=1", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=ckpt-hang"],
                    base_overrides(data, out, **{
                        "model.name": "wrn50_2_bottleneck", "model.kwargs": "{}",
                        "train.epochs": 1, "run.checkpoint_every_steps": 2,
                        "train.hang_timeout_s": 10, "data.read_timeout_s": 0}))
    folder, deadline = out / "checkpoints", time.time() + 240
    while not (folder.is_dir() and list(folder.glob(".step_*.tmp*"))):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.005)
    stop_rank(proc, 0)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-4000:]
    assert "Stuck: rank 0 (" in hang_line(log) and "killing rank 0" in log
    saved = ckpt.list_checkpoints(ckpt.checkpoint_dir(out))
    assert saved and all(ckpt.verify(p) is None for p in saved)
    assert max(step_losses(out)) == 3          # the one epoch, completed after the restart


SPIN_IN_FORWARD = '''
import os
if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("SPIN_RANK"):
    import torch

    def spin(module, args):   # a training forward, once the flag file exists: loops forever
        if module.training and type(module).__name__ == "Conv2d" and torch.is_grad_enabled() \\
                and os.path.exists(os.environ["SPIN_FLAG"]):
            while True:
                pass

    torch.nn.modules.module.register_module_forward_pre_hook(spin)
'''


@pytest.mark.timeout(240)
def test_a_rank_in_an_endless_forward_is_named_compute_and_the_flight_recorder_dumped(data,
                                                                                     tmp_path):
    """Rank 1 loops forever inside its model's forward (a sitecustomize in its PYTHONPATH hooks
    every Conv2d once a flag file exists), while rank 0 goes on into backward and waits there in
    the gradient all-reduce: the log names rank 1, in compute (forward). Every rank dumps the
    process group's flight recorder (gloo's, TORCH_FR_BUFFER_SIZE) before it exits 75."""
    inject, out = tmp_path / "inject", tmp_path / "run"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SPIN_IN_FORWARD)
    flag = tmp_path / "spin"
    proc = torchrun(["--nproc-per-node=2", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"],
                    base_overrides(data, out, **{"train.epochs": 3, "train.hang_timeout_s": 10,
                                                 "data.read_timeout_s": 0}),
                    env_extra={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "SPIN_RANK": "1",
                               "SPIN_FLAG": str(flag), "TORCH_FR_BUFFER_SIZE": "200",
                               "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(tmp_path / "fr_rank_")})
    wait_for_step(out, 3, proc)
    flag.touch()
    log = proc.communicate(timeout=200)[0]
    assert proc.returncode != 0
    line = hang_line(log)
    assert "Stuck: rank 1 (" in line and "compute (forward)): the others wait for them" in line, \
        log[-4000:]
    assert re.search(r"exitcode\s*:\s*75\b", log), log[-4000:]
    import pickle
    for rank in (0, 1):
        trace = pickle.loads((tmp_path / f"fr_rank_{rank}").read_bytes())
        assert trace["entries"], rank          # the last collectives, as NCCL's would be


@pytest.mark.timeout(300)
def test_a_rank_stuck_in_a_read_is_named_with_phase_data_and_the_path(tmp_path):
    """2 torchrun agents x 2 ranks on one c10d rendezvous (tests/cluster_sim.py). One file's open
    never returns (FUSE, tests/latency_fs.py; data.read_timeout_s=0, off): the rank that reads
    it stays in data while the others wait for it inside compute. The log names that rank,
    phase data and the file (the loader reads through pipelines.read_guard). Neither that rank
    nor anything can end the blocked open, and a process cannot finish exiting while one of
    its threads waits in it: the test lets the open answer once the hang is reported, as a file
    server that comes back would; torchrun restarts the group and the run finishes."""
    from cluster_sim import Cluster
    from latency_fs import fuse_unavailable, mounted, release
    why = fuse_unavailable()
    if why:
        pytest.skip(why)
    data, out = make_folder(tmp_path / "data"), tmp_path / "run"
    blocked = "train/class_1/005.jpg"
    extra = {"train.epochs": 1, "train.hang_timeout_s": 10, "data.read_timeout_s": 0,
             "train.batch_size": 8, "optim.lr_batch": 8}
    with mounted(data, tmp_path / "mnt", latency=0, block_open=[blocked]) as mnt, \
            Cluster(2, 2, base_overrides(mnt, out, **extra), logs=tmp_path / "logs",
                    max_restarts=1) as cluster:
        deadline = time.time() + 180
        while "HANG: no rank made progress" not in cluster.log(0) + cluster.log(1):
            assert all(a.poll() is None for a in cluster.agents) and time.time() < deadline, \
                cluster.tail()
            time.sleep(0.2)
        time.sleep(1)                       # the table's lines follow the HANG line
        release(mnt)
        codes = cluster.wait(timeout=200)
        log = cluster.log(0) + cluster.log(1)
    assert codes == [0, 0], cluster.tail()
    assert (out / "result.json").exists(), cluster.tail()   # the restarted group finished
    line = hang_line(log)
    rank = re.search(r"Stuck: rank (\d) \(", line)
    assert rank and f", data, reading {mnt}/{blocked} for " in line, log[-4000:]
    assert "s): the others wait for them in a collective" in line, line   # that rank only
    table = log[log.index(line):].splitlines()[1:6]
    rows = {row.split()[0]: row.split()[4] for row in table[1:]}
    assert rows.pop(rank.group(1)) == "data" and set(rows.values()) == {"compute"}, table


@pytest.mark.timeout(240)
def test_a_data_mount_that_stops_answering_is_named_the_file_system(tmp_path):
    """The data mount stops answering (FUSE: every operation blocks) after step 2: every rank
    ends up waiting on its reads (evaluation's, here: the read-ahead holds the small epoch's
    training files already), its read-ahead threads in state D. The report names the file
    system, with each rank's oldest read, and each rank says which of its threads are in state
    D. No process can finish exiting while one of its threads waits on the mount: the test lets
    the mount answer once the hang is reported (a file server that comes back), and the job
    then ends with the ranks' code 75."""
    from latency_fs import fuse_unavailable, mounted, release, stop_answering
    why = fuse_unavailable()
    if why:
        pytest.skip(why)
    data, out, output = make_folder(tmp_path / "data"), tmp_path / "run", tmp_path / "log"
    extra = {"train.epochs": 1, "train.hang_timeout_s": 10, "data.read_timeout_s": 0}
    with mounted(data, tmp_path / "mnt", latency=0, can_hang=True) as mnt, \
            open(output, "w") as sink:
        proc = torchrun(["--nproc-per-node=2", "--master_addr=127.0.0.1",
                         f"--master_port={free_port()}"], base_overrides(mnt, out, **extra),
                        stdout=sink, stderr=sink)
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and max(step_losses(out), default=0) >= 2):
            assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
            time.sleep(0.05)
        stop_answering(mnt)
        while "HANG: no rank made progress" not in output.read_text():
            assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)                    # the other rank's lines follow the reporter's
        release(mnt)
        proc.wait(timeout=60)
    log = output.read_text()
    line = hang_line(log)
    assert "the file system: every rank is stuck reading its input" in line, log[-4000:]
    assert line.count(f"reading {mnt}/") == 2, line
    assert re.search(r"rank \d: thread\(s\) .* in state D \(uninterruptible", log), log[-4000:]
    assert re.search(r"exitcode\s*:\s*75\b", log), log[-4000:]
