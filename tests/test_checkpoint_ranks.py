"""Which checkpoint a run resumes from, decided on two real gloo ranks (engine/hooks/checkpoint):
a failure on some ranks only ends every rank together, never ranks on different weights or a
rank left waiting in a collective."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp


class Engine:
    checkpoint_suffix = ".pt"

    def __init__(self, rank: int, failing_rank: int):
        self.rank, self.failing_rank = rank, failing_rank

    def load_checkpoint(self, path: str) -> dict:
        from engine import checkpoint as ckpt
        if self.rank == self.failing_rank:
            raise ckpt.CheckpointError(f"{path}: cannot read it here")
        return {"loaded": True}


class Trainer:
    hooks: list = []

    def __init__(self):
        self.loaded = None

    def phase(self, name: str) -> None:
        pass

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def _rank(rank: int, init: str, out: str, case: str) -> None:
    import torch.distributed as dist

    from engine.hooks import checkpoint as hook_module
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    result = {}
    try:
        Path(out, "step_1.pt").mkdir(exist_ok=True)
        hook_module.ckpt.list_checkpoints = lambda out: [Path(out, "step_1.pt")]
        if case == "one rank cannot read":
            hook_module.rank0_problem = lambda path, cache: (False, None)   # complete and verified
            failing_rank = 1
        else:   # rank 0's check of the file fails with an error that is no CheckpointError
            def broken_check(path, cache):
                raise ValueError(f"{path}: malformed manifest line")
            hook_module.rank0_problem = broken_check
            failing_rank = -1
        hook = hook_module.CheckpointHook(out, Engine(rank, failing_rank), resume="auto",
                                          is_main=rank == 0)
        hook.trainer = Trainer()
        try:
            hook.resume()
            result["loaded"] = hook.trainer.loaded
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def resume_on_two_ranks(tmp_path, case: str) -> list[dict]:
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path), case), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(120)
def test_a_checkpoint_one_rank_cannot_read_ends_every_rank(tmp_path):
    results = resume_on_two_ranks(tmp_path, "one rank cannot read")
    for r in results:   # rank 0 had loaded it: a fallback would leave it on other weights
        assert "loaded" not in r, results
        assert r["error"].startswith("CheckpointError") and "rank(s) 1" in r["error"], results


@pytest.mark.timeout(120)
def test_an_error_on_rank_0_while_choosing_reaches_every_rank(tmp_path):
    results = resume_on_two_ranks(tmp_path, "rank 0's check fails")
    for r in results:
        assert r.get("error", "").startswith("ValueError") and "malformed" in r["error"], results
