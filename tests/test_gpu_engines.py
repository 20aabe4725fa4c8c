"""The trainer's CUDA defaults on a real GPU (`pytest -m gpu`; skipped without CUDA). The same
paths are forced on the CPU in test_cuda_defaults_on_cpu.py; what only CUDA has is here."""
import pytest
import torch

from engine.checkpoint import list_checkpoints
from trainer_utils import base_overrides, epochs, make_folder, run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.mark.parametrize("engine", [
    {"engine.name": "ddp"},                                    # auto: bf16, channels_last, compile
    {"engine.name": "deepspeed"},                              # auto: bf16 ZeRO 1, compile
    {"engine.name": "deepspeed", "engine.deepspeed_config": "launch/deepspeed/zero1_fp16.json"},
], ids=["ddp-auto", "deepspeed-auto", "deepspeed-fp16"])
def test_auto_defaults_train_evaluate_and_resume_on_cuda(data, tmp_path, engine):
    out = tmp_path / "run"
    settings = {**engine, "data.backend": "dali", "train.ema_decay": 0.9}
    run_training(base_overrides(data, out, **settings, **{"train.epochs": 1}))
    proc = run_training(base_overrides(data, out, **settings))
    assert "resumed from" in proc.stdout
    history = epochs(out)
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["val_samples"] == 21
    assert "top1_ema" in history[-1]
    if engine["engine.name"] == "deepspeed":
        weights = torch.load(list_checkpoints(out)[0] / "weights.pt", weights_only=True)["model"]
        assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


def test_nccl_backend_through_the_trainers_set_up(data, tmp_path):
    """A one-process torchrun job with engine.dist_backend=nccl: the process group the trainer
    builds on a GPU machine (gloo replaces it on the CPU)."""
    import os
    import subprocess
    import sys
    from trainer_utils import REPO, free_port
    out = tmp_path / "nccl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(REPO / "train_imagenet.py"), "--config", "configs/quickstart.yaml",
           *base_overrides(data, out, **{"train.epochs": 1, "engine.dist_backend": "nccl"})]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 process(es) on cuda" in proc.stdout
    assert epochs(out)[-1]["val_samples"] == 21
