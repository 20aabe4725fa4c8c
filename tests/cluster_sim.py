"""A simulated cluster on one machine: N torchrun agents (one per "node"), M ranks each, on ONE
c10d rendezvous at 127.0.0.1. The hosts are one, so a rank tells its node by ``GROUP_RANK``
(the rendezvous numbers the agents 0..N-1 in the order they join; agent 0 hosts the store).

Each agent is started here in its own session and stopped by its PID (``signal_agent``,
``stop``; its workers are in their own sessions too, so ``stop`` also ends any rank still
running, by PID, from /proc). An agent's output goes to ``LOGS/agent-K.log``, not to a pipe
that 16 ranks could fill::

    from cluster_sim import Cluster
    from trainer_utils import base_overrides
    with Cluster(nodes=4, ranks_per_node=4, overrides=base_overrides(data, out),
                 logs=tmp / "logs") as cluster:
        codes = cluster.wait(timeout=300)    # one exit code per agent
        assert codes == [0] * 4, cluster.tail()

Trainings are ``train_imagenet.py --config configs/quickstart.yaml OVERRIDES`` as in
``trainer_utils.run_command``; ``script=`` runs another script. ``max_restarts`` and
``nnodes`` ("2:4" for an elastic job) are torchrun's, ``rdzv_conf`` adds to its
``--rdzv-conf``; ``launcher`` runs another torchrun front end (launch/torchrun.py);
``add_agent`` starts one more agent on the same rendezvous (a node that joins).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer_utils import REPO, free_port


class Cluster:
    def __init__(self, nodes: int, ranks_per_node: int, overrides: list[str], logs: Path,
                 max_restarts: int = 0, nnodes: str | None = None, env: dict | None = None,
                 script: Path | None = None, config: str = "configs/quickstart.yaml",
                 agent_args: list[str] = (), rdzv_conf: str = "",
                 launcher: list[str] | None = None, store_host_last: bool = False):
        self.nodes, self.ranks_per_node, self.overrides = nodes, ranks_per_node, overrides
        self.logs = Path(logs)
        self.max_restarts, self.nnodes = max_restarts, nnodes or str(nodes)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
        self.script, self.config = script or REPO / "train_imagenet.py", config
        self.agent_args, self.rdzv_conf = list(agent_args), rdzv_conf
        self.store_host_last = store_host_last
        self.launcher = launcher or [sys.executable, "-m", "torch.distributed.run"]
        self.port = free_port()
        self.rdzv_id = f"sim-{os.getpid()}-{self.port}"
        self.agents: list[subprocess.Popen] = []

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def command(self, node: int) -> list[str]:
        conf = f"is_host={int(node == 0)}" + (f",{self.rdzv_conf}" if self.rdzv_conf else "")
        return [*self.launcher, f"--nnodes={self.nnodes}",
                f"--nproc-per-node={self.ranks_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{self.port}", f"--rdzv-id={self.rdzv_id}",
                # one store host, chosen here: every agent would otherwise race to bind it
                f"--rdzv-conf={conf}", f"--max-restarts={self.max_restarts}",
                *self.agent_args, str(self.script), "--config", self.config, *self.overrides]

    def start(self) -> "Cluster":
        """Agent 0 (the store's host) first, so the others connect at once; or, with
        ``store_host_last``, after the others, which wait for it and join the first round of an
        elastic job together (it closes ``last_call_timeout`` after MIN nodes are in)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        order = [*range(1, self.nodes), 0] if self.store_host_last else range(self.nodes)
        self.agents = [None] * self.nodes
        for node in order:
            self.agents[node] = self.launch(node)
            if node == order[0] == 0 or (self.store_host_last and node == order[-2]):
                time.sleep(0.5)
        return self

    def launch(self, node: int) -> subprocess.Popen:
        log = open(self.log_path(node), "w")
        agent = subprocess.Popen(self.command(node), cwd=REPO, env=self.env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return agent

    def add_agent(self) -> int:
        """Start agent K (the next number; agent 0 hosts the store) and return K."""
        self.agents.append(self.launch(len(self.agents)))
        return len(self.agents) - 1

    def lose_node(self, node: int) -> None:
        """Node ``node`` is gone: its agent and its ranks SIGKILLed at once, as a node that
        crashes or is fenced takes them all (the peers see their connections closed)."""
        agent = self.agents[node].pid
        # its ranks first: a rank that outlived its agent by a moment would be told to stop
        # (PR_SET_PDEATHSIG) and could checkpoint, which a crashed node never does
        victims = [*self.rank_pids(node=node), agent]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_path(self, node: int) -> Path:
        return self.logs / f"agent-{node}.log"

    def log(self, node: int) -> str:
        return self.log_path(node).read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- agent {k}\n{self.log(k)[-chars:]}" for k in range(len(self.agents)))

    def wait(self, timeout: float) -> list[int]:
        """Every agent's exit code (TimeoutError naming the live ones after ``timeout`` s)."""
        deadline = time.time() + timeout
        for node, agent in enumerate(self.agents):
            try:
                agent.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"agent {node} (pid {agent.pid}) still running after "
                                   f"{timeout:g} s\n{self.tail()}") from None
        return [a.returncode for a in self.agents]

    def signal_agent(self, node: int, sig: int = signal.SIGTERM) -> None:
        os.kill(self.agents[node].pid, sig)

    def rank_pids(self, zombies: bool = False, node: int | None = None) -> list[int]:
        """PIDs of this cluster's live ranks (worker processes of its agents, or of agent
        ``node``'s alone); with ``zombies``, also those whose main thread has exited (state Z)
        while another thread has not: a thread in uninterruptible sleep (D: a read on a hung
        mount) holds the process there."""
        agents = {a.pid for a in self.agents} if node is None else {self.agents[node].pid}
        found = []
        for proc in Path("/proc").iterdir():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if (zombies or fields[0] != "Z") and int(fields[1]) in agents:
                found.append(int(proc.name))
        return found

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to every live agent (it forwards it to its ranks), SIGKILL to what is left
        after ``grace`` seconds, agents and ranks, each by PID."""
        live = [a for a in self.agents if a.poll() is None]
        ranks = self.rank_pids()
        for agent in live:
            agent.terminate()
        deadline = time.time() + grace
        for agent in live:
            try:
                agent.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        for pid in ranks:   # a rank whose agent died first (or that ignored the signal)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
