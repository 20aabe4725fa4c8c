"""BatchNorm statistics averaged over ranks (engine/distributed.sync_buffers) in real gloo
processes: fp16 buffers (DeepSpeed fp16 casts them) whose sum overflows fp16 still average to
the float64 mean rounded to fp16."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

VARIANCES = ([40_000.0, 61_000.0, 1.5], [40_064.0, 60_000.0, 2.5])   # rank 0, rank 1


def _rank(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from engine.distributed import sync_buffers
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bn = torch.nn.BatchNorm1d(3).half()
        bn.running_var.copy_(torch.tensor(VARIANCES[rank]))
        bn.running_mean.fill_(rank)
        sync_buffers(bn, "reduce")
        if rank == 0:
            torch.save({"var": bn.running_var.clone(), "mean": bn.running_mean.clone(),
                        "count": bn.num_batches_tracked.clone()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_fp16_running_var_whose_sum_overflows_fp16_averages_exactly(tmp_path):
    out = tmp_path / "synced.pt"
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    synced = torch.load(out)
    expected = torch.tensor(VARIANCES).half().double().mean(0).half()  # of what the ranks hold
    assert torch.isfinite(synced["var"]).all(), synced["var"]
    assert synced["var"].dtype == torch.float16
    assert torch.equal(synced["var"], expected), (synced["var"], expected)
    assert torch.equal(synced["mean"], torch.full((3,), 0.5, dtype=torch.float16))
    assert synced["count"].item() == 0   # integer buffers are left alone
