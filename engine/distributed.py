"""Process-group set-up for torchrun (single/multi node, SLURM via srun+torchrun) and plain
``python`` (one process, no process group)."""
from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attempt_prefix() -> str:
    """The prefix of this torchrun attempt's keys in the rendezvous store.

    Where the workers share the agents' store (torch's default), it outlives a restart of the
    group: without a per-attempt prefix the new ranks can read the dead ranks' addresses and fail
    with "Gloo connectFullMesh failed ... Connection refused". The prefix is the restart count,
    which every agent of a fixed-size job counts alike. Elastic jobs (launch/torchrun.py) do not
    share it: rank 0 serves a fresh store every attempt, and there the restart count would
    split the group, as an agent that joined later counts from 0 (gloo waited forever for
    addresses under another prefix; the watchdog's ranks would not see each other)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return "wrn_large"
    return f"wrn_large/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store, with keys private to this torchrun attempt (``attempt_prefix``)."""
    from torch.distributed.rendezvous import _create_c10d_store

    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank,
                               world_size, timedelta(minutes=10))
    return dist.PrefixStore(attempt_prefix(), store)


def stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux
    ``PR_SET_PDEATHSIG``). Under torchrun the parent is the elastic agent, and its workers run
    in sessions of their own: if the agent is SIGKILLed (OOM killer, a node agent's crash) they
    would go on training unsupervised, holding the run directory's lock. SIGTERM makes them
    checkpoint at the next check and exit (``engine.hooks.stop``), like a preemption."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        return
    if os.getppid() != parent:  # the parent died before prctl: the signal will not come
        os.kill(os.getpid(), sig)


NCCL_WATCHDOG_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",   # a timed-out collective ends the process
    "TORCH_NCCL_ENABLE_MONITORING": "1",      # ... and a wedged NCCL watchdog thread too
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",   # the flight recorder: the last collectives
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",        # dumped where TORCH_NCCL_DEBUG_INFO_TEMP_FILE says
}


def init_distributed(backend: str = "auto", need_process_group: bool = False,
                     timeout: timedelta | None = None) -> DistInfo:
    """Join the job torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT). Without torchrun: one process, and a process group of one only when the
    engine needs one (DeepSpeed). ``timeout``: the collectives' (None: the backend's default);
    with NCCL, PyTorch's own error handling and flight recorder are switched on unless the
    environment already sets them."""
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl":
        for key, value in NCCL_WATCHDOG_ENV.items():
            os.environ.setdefault(key, value)
        if timeout is not None:  # NCCL's heartbeat monitor: past the collectives' own timeout
            os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC",
                                  str(int(timeout.total_seconds()) + 60))
    timeouts = {"timeout": timeout} if timeout is not None else {}
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        pass
    elif "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=_attempt_store(rank, world_size), rank=rank,
                                world_size=world_size,
                                device_id=device if backend == "nccl" else None, **timeouts)
    elif need_process_group:  # a job of one, described as torchrun would (DeepSpeed reads it)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        dist.init_process_group(backend, **timeouts)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return DistInfo(device=device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def sync_buffers(module: torch.nn.Module, mode: str) -> None:
    """Make the floating-point buffers (BatchNorm running statistics) equal on every rank, so
    the model each rank evaluates is the one rank 0 saves. Each rank updates them from its own
    batches (DDP broadcasts rank 0's only at the next forward, DeepSpeed never): ``reduce``
    takes the mean over ranks (timm's ``distribute_bn`` default), ``broadcast`` rank 0's.

    The mean is summed in one float32 tensor whatever the buffers' dtype: under fp16 (DeepSpeed
    casts the buffers) a sum in place overflows to inf once a running_var passes 65504 / ranks
    (about 1,000 at 64 ranks), and the run would stop as diverged."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]  # not num_batches_tracked
    if not buffers:
        return
    if mode == "broadcast":
        for buffer in buffers:
            dist.broadcast(buffer.data, src=0)
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for buffer, mean in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.data.copy_(mean.view_as(buffer))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class BufferSync:
    """``sync_buffers`` of ``modules`` (the model, its EMA) at most once per optimizer step: the
    model each rank evaluates is the model rank 0 saves (``train.dist_bn``)."""

    def __init__(self, modules: list[torch.nn.Module], mode: str):
        self.modules, self.mode, self.done_at = modules, mode, None

    def sync(self, step: int) -> None:
        if self.done_at == step:
            return
        for module in self.modules:
            sync_buffers(module, self.mode)
        self.done_at = step
