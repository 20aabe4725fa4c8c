"""A throwaway SLURM cluster on 127.0.0.1 for the launcher tests: munged, slurmctld and two
slurmd (node1, node2: Debian's build allows several slurmd on one host), every file in a temp
folder, daemons started in the foreground and stopped by PID. ``SlurmCluster.skip_reason()``
says why one cannot start (no binaries, not root).

Process tracking is ``proctrack/cgroup`` by default, as on production clusters (SLURM's
documentation recommends it): a step's signal then reaches every process of the step, torchrun
agents, ranks, DataLoader workers and fork servers alike. ``proctrack="linuxproc"`` selects the
older tracking by process tree."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    NODES = ("node1", "node2", "node3")      # jobs take 2 (the script's default) or 3
    # how long a requeued job is held before it may start again (SLURM's default: 120 s). The
    # hold is what lets the nodes revoke the previous run's credential: releasing a requeued
    # job early (scontrol update StartTime=now) can fail it with "Job credential revoked".
    # sched_interval=2 (SchedulerParameters): a requeued job whose hold has ended starts at the
    # next pass of the main scheduler; by default that pass comes every 60 s
    CRED_EXPIRE_S = 10
    # a job of partition "urgent" preempts those of "debug" (PreemptMode=REQUEUE): they get
    # SIGTERM, then SIGKILL after GraceTime
    GRACE_TIME_S = 60

    # ProctrackType and TaskPlugin of each tracking; cgroup also needs cgroup.conf beside
    # slurm.conf (cgroup v1 with nothing constrained: tracking, not limits)
    TRACKING: ClassVar[dict[str, tuple[str, str]]] = {
        "cgroup": ("proctrack/cgroup", "task/affinity,task/cgroup"),
        "linuxproc": ("proctrack/linuxproc", "task/none")}

    def __init__(self, root: Path, proctrack: str = "cgroup"):
        self.root, self.proctrack = root, proctrack
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @staticmethod
    def skip_reason() -> str | None:
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if missing:
            return f"SLURM/munge not installed ({', '.join(missing)}: apt-get install slurm-wlm munge)"
        if os.geteuid() != 0:
            return "the throwaway SLURM cluster runs its daemons as root"
        return None

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("state", "munge", *(f"spool_{n}" for n in self.NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.sock"
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}",
                     f"--socket={sock}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                     f"--log-file={r / 'munge' / 'munged.log'}",
                     f"--seed-file={r / 'munge' / 'munge.seed'}"], "munged")
        self._wait(lambda: sock.exists(), "munged socket")
        ctld, slurmd, *node_ports = _free_ports(2 + len(self.NODES))
        host = socket.gethostname()
        proctrack, task = self.TRACKING[self.proctrack]
        if self.proctrack == "cgroup":
            (r / "cgroup.conf").write_text(
                "CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\n"
                "ConstrainSwapSpace=no\nConstrainDevices=no\n")
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={p} CPUs={os.cpu_count()} "
            f"RealMemory=4000 State=UNKNOWN" for n, p in zip(self.NODES, node_ports))
        self.conf.write_text(f"""ClusterName=wrntest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire={self.CRED_EXPIRE_S}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r}/spool_%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r}/slurmd_%n.pid
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r}/slurmd_%n.log
ProctrackType={proctrack}
TaskPlugin={task}
# job ids of this cluster alone: two clusters on one host never share a cgroup (job_<id>)
FirstJobId={random.randrange(1000, 900000)}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=sched_interval=2
{nodes}
PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE PriorityTier=1 PreemptMode=REQUEUE GraceTime={self.GRACE_TIME_S}
PartitionName=urgent Nodes={','.join(self.NODES)} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
""")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        time.sleep(1)
        for n in self.NODES:
            self._spawn(["slurmd", "-D", "-N", n, "-f", str(self.conf)], f"slurmd_{n}")
        self._wait(self._nodes_idle, "every node idle in sinfo", timeout=60)
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log,
                                           start_new_session=True))

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-o", "%t %D"], check=False).stdout.split()
        return out[:2] == ["idle", str(len(self.NODES))]

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}: see {self.root}")
            time.sleep(0.2)
        raise TimeoutError(f"{what}: not ready after {timeout} s (logs in {self.root})")

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, check=check, timeout=kw.pop("timeout", 60), **kw)

    def job_state(self, job_id: str) -> str:
        out = self.run(["scontrol", "show", "job", job_id], check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_state(self, job_id: str, states: set[str], timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} never reached {states} (now {self.job_state(job_id)})")

    def stop(self) -> None:
        """Cancel every job and let its steps end (a slurmstepd outlives a stopped slurmd and
        would keep a job's processes), then stop the daemons by PID."""
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True,
                       timeout=30)
        deadline = time.time() + 90
        while time.time() < deadline:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if not jobs:
                break
            time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
