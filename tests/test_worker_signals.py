"""DataLoader workers of a launched run (torchrun, a SLURM step) leave stopping to their rank:
SLURM with proctrack/cgroup sends a step's signal to every process of the step, and a worker
killed by it would fail the rank before it saves (pipelines/torch_backend.worker_start)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from torch.utils.data import DataLoader, Dataset

from pipelines.torch_backend import worker_start


class Pids(Dataset):
    def __len__(self):
        return 60

    def __getitem__(self, i):
        time.sleep(0.05)
        return os.getpid()


def signal_from_elsewhere(pid: int, sig: int) -> None:
    """Sent by another process, as slurmstepd's would be (not the worker's parent)."""
    subprocess.run(["kill", f"-{sig}", str(pid)], check=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_launched_runs_workers_outlive_a_stop_signal_meant_for_the_whole_step(monkeypatch,
                                                                                  sig):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "signals")    # as under torchrun or srun
    loader = DataLoader(Pids(), batch_size=None, num_workers=2,
                        multiprocessing_context=worker_start(2))
    seen = []
    for i, pid in enumerate(loader):   # a worker killed here fails the iteration
        seen.append(int(pid))
        if i == 4:
            for worker in set(seen):
                signal_from_elsewhere(worker, sig)
    assert len(seen) == 60 and len(set(seen)) == 2
