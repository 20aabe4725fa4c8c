"""The trainer's CUDA defaults on a real GPU (`pytest -m gpu`; skipped without CUDA). The same
paths are forced on the CPU in test_cuda_defaults_on_cpu.py; what only CUDA has is here."""
import json
import math
import shutil

import pytest
import torch

from engine.checkpoint import checkpoint_dir, list_checkpoints
from trainer_utils import (base_overrides, epochs, make_folder, nan_loss_at, read_metrics,
                           run_training, step_losses, train_in_process)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.mark.slow
@pytest.mark.parametrize("engine, layout", [    # layout: DeepSpeed's (precision, ZeRO stage)
    ({"engine.name": "ddp"}, None),                            # auto: bf16, channels_last, compile
    ({"engine.name": "deepspeed"}, ("bf16", 1)),               # auto: bf16 ZeRO 1, compile
    ({"engine.name": "deepspeed", "engine.deepspeed_config": "launch/deepspeed/zero1_fp16.json"},
     ("fp16", 1)),
    ({"engine.name": "deepspeed", "engine.deepspeed_config": "launch/deepspeed/zero2_bf16.json"},
     ("bf16", 2)),
    # torch's fused NCHW batch-norm backward takes its dtype from the weight: it failed on
    # fp32 running statistics beside fp16 weights before buffer_dtype was set for fp16
    ({"engine.name": "deepspeed", "engine.deepspeed_config": "launch/deepspeed/zero1_fp16.json",
      "train.channels_last": "off", "train.compile": "off"}, ("fp16", 1)),
], ids=["ddp-auto", "deepspeed-zero1-auto-bf16", "deepspeed-zero1-fp16", "deepspeed-zero2-bf16",
        "deepspeed-zero1-fp16-nchw-eager"])
def test_auto_defaults_train_evaluate_and_resume_on_cuda(data, tmp_path, engine, layout):
    out = tmp_path / "run"
    settings = {**engine, "data.backend": "dali", "train.ema_decay": 0.9}
    run_training(base_overrides(data, out, **settings, **{"train.epochs": 1}))
    proc = run_training(base_overrides(data, out, **settings))
    assert "resumed from" in proc.stdout
    history = epochs(out)
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["val_samples"] == 21
    assert "top1_ema" in history[-1]
    if layout is not None:
        newest = list_checkpoints(checkpoint_dir(out))[0]
        weights = torch.load(newest / "weights.pt", weights_only=True)["model"]
        assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
        saved = json.loads((newest / "layout.json").read_text())
        assert (saved["precision"], saved["zero_stage"]) == layout


def test_deepspeed_fp16_nan_step_is_skipped_not_divergence(data, tmp_path):
    """DeepSpeed's own fp16 loss scaler skips the step (its ``skipped_steps``); the run goes on."""
    out = tmp_path / "ds_fp16"
    summary = train_in_process(base_overrides(data, out, **{
        "engine.name": "deepspeed", "engine.deepspeed_config": "launch/deepspeed/zero1_fp16.json",
        "data.backend": "dali", "run.checkpoint_every_steps": 1, "train.compile": "off"}),
        nan_loss_at({3})).summary
    assert summary["status"] == "finished"
    records = {m["step"]: m for m in read_metrics(out) if m["type"] == "train"}
    assert records[3]["loss"] is None and records[3]["skipped"] == 1
    before, after = (torch.load(out / "checkpoints" / f"step_{s:08d}" / "weights.pt",
                                weights_only=True)["model"] for s in (2, 3))
    params = [k for k, v in before.items() if v.ndim > 1]
    assert all(torch.equal(before[k], after[k]) for k in params)
    assert all(h["train_loss"] > 0 for h in epochs(out))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from pipelines.default_data import generate
    return generate(tmp_path_factory.mktemp("demo"))


# 2600 demo images at batch 64: 40 steps an epoch, 200 steps in all, resumed from step 120
LONG_RUN = {"train.epochs": 5, "run.eval_every_epochs": 5, "run.keep_checkpoints": 100,
            "run.log_every_steps": 1, "run.progress": False}


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [True, False])
def test_a_few_hundred_steps_with_compile_resume_the_same_losses(demo_data, tmp_path,
                                                                  deterministic):
    """The quickstart recipe on CUDA as a GPU user runs it: bf16 autocast, channels_last,
    torch.compile and DALI mixed decoding (all `auto`). With ``train.deterministic=true`` a
    resumed run repeats the losses bitwise: cuDNN's deterministic algorithms, the compiled
    kernels (the same on both runs) and the loader's (seed, epoch, index) crops. Without it,
    cuDNN's autotuner may pick other algorithms in the resumed run: the first resumed loss
    agrees to bf16 rounding (1%), the last epoch's mean loss to 10%."""
    settings = {"data.root": str(demo_data), "train.deterministic": deterministic, **LONG_RUN}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = run_training([f"run.output_dir={full}", *(f"{k}={v}" for k, v in settings.items())])
    assert "on cuda" in proc.stdout and "data backend dali" in proc.stdout
    assert "precision bf16, channels_last on, torch.compile on" in proc.stdout, proc.stdout[-2000:]
    reference = step_losses(full)
    assert sorted(reference) == list(range(1, 201))
    assert all(map(math.isfinite, reference.values()))
    history = epochs(full)
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], history
    assert history[-1]["top1"] > 40, history        # 10 classes: chance is 10%
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000120.pt", resumed / "checkpoints")
    run_training([f"run.output_dir={resumed}", *(f"{k}={v}" for k, v in settings.items())])
    again = step_losses(resumed)
    assert sorted(again) == list(range(121, 201))
    if deterministic:
        assert all(again[s] == reference[s] for s in again), \
            [(s, again[s], reference[s]) for s in again if again[s] != reference[s]][:5]
    else:
        assert again[121] == pytest.approx(reference[121], rel=1e-2)
        assert epochs(resumed)[-1]["train_loss"] == pytest.approx(history[-1]["train_loss"],
                                                                  rel=0.1)


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
           *base_overrides(data, out, **{"train.epochs": 1, "engine.dist_backend": "nccl",
                                         "train.compile": "off"})]   # compile: the slow tests
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 process(es) on cuda" in proc.stdout
    assert epochs(out)[-1]["val_samples"] == 21


@pytest.mark.parametrize("backend", ["synthetic", "dali"])
def test_no_device_sync_within_a_step_on_cuda(tmp_path, data, backend):
    """torch's own sync detector (``set_sync_debug_mode("error")``) on from the first hook's
    before_step to the last hook's after_step: a synchronising call of ours in a step (an
    .item(), a bool of a CUDA tensor, a pageable copy) raises. bf16, channels_last, the EMA,
    step times (CUDA events), the progress bar; the synthetic loader makes its batch on the GPU,
    DALI decodes there ("mixed") and hands over the labels."""
    from engine.hooks import Hook
    from test_loop import tiny_config

    class Strict(Hook):
        def __init__(self, on):
            self.on = on

        def before_step(self):
            if self.on:
                torch.cuda.set_sync_debug_mode("error")

        def after_step(self):
            if not self.on:
                torch.cuda.set_sync_debug_mode(0)

    def strict(trainer):
        trainer.hooks.__init__([Strict(True), *trainer.hooks, Strict(False)], trainer)

    folder = {"data.backend": "dali", "data.root": str(data), "data.image_size": 32,
              "data.val_resize": 36} if backend == "dali" else {}
    try:
        run = train_in_process(tiny_config(tmp_path, **{"train.compile": "off", **folder}), strict)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert run.summary["status"] == "finished" and run.summary["steps"] == (
        12 if backend == "dali" else 24)
