"""What CUDA turns on by default (bf16, channels_last, torch.compile, cudnn flags), forced on the
CPU, through training, evaluation, checkpoint and resume for both engines (docs/switches.md).

A CUDA machine resolves train.amp/channels_last/compile=auto to bf16/on/on; these tests set
the same values explicitly, so every path the first GPU run takes has run here first."""
import os

import pytest
import torch
import torch.nn as nn

from engine.checkpoint import checkpoint_dir, list_checkpoints, load_file
from engine.config import load_config
from engine.distributed import DistInfo
from engine.engines import Engine
from engine.build import resolve
from trainer_utils import base_overrides, epochs, make_folder, run_training

CUDA_DEFAULTS = {"train.amp": "bf16", "train.channels_last": "on", "train.ema_decay": 0.9}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


def train_then_resume(data, out, **settings):
    """Epoch 1 (evaluation + checkpoint), then the same command with 2 epochs resumes."""
    first = run_training(base_overrides(data, out, **{**settings, "train.epochs": 1}))
    second = run_training(base_overrides(data, out, **settings))
    assert "resumed from" in second.stdout and "step_00000006" in second.stdout, second.stdout
    history = epochs(out)
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert h["val_samples"] == 21 and h["top1"] > 50, h     # 3 classes: chance is 33%
        assert "top1_ema" in h
    return first, second


@pytest.fixture
def restore_determinism():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def start_training(cfg):
    from engine.build import build_trainer
    from engine.distributed import cleanup
    trainer = build_trainer(cfg)
    trainer.hooks.call_each("after_train")      # lets go of the run directory
    cleanup()


def start_evaluation(cfg):
    from engine.run_eval import run_evaluation
    run_evaluation(cfg)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("command", [start_training, start_evaluation])
def test_deterministic_switch_sets_what_it_promises(restore_determinism, deterministic, command,
                                                    tmp_path):
    """What training and --eval-only set up at start-up, both."""
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    torch.use_deterministic_algorithms(not deterministic)     # the opposite, to be changed
    torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = not deterministic
    cfg = load_config("configs/quickstart.yaml", [
        f"train.deterministic={deterministic}", "data.backend=synthetic",
        "data.synthetic_samples=64", "data.image_size=16", "data.num_classes=3",
        "model.name=wrn_cifar", "model.kwargs={depth: 10, widen_factor: 1}",
        "train.batch_size=8", "train.hang_timeout_s=0", f"run.output_dir={tmp_path / 'run'}"])
    command(cfg)
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is (not deterministic)   # the autotuner otherwise
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic
    if deterministic:
        assert torch.is_deterministic_algorithms_warn_only_enabled()


def test_auto_switches_follow_the_device():
    cfg = load_config("configs/quickstart.yaml", ["data.backend=synthetic"])
    cpu = resolve(cfg, DistInfo(device=torch.device("cpu")))
    assert (cpu.train.channels_last, cpu.train.compile, cpu.data.channels_last) == ("off", "off", False)
    cuda = resolve(cfg, DistInfo(device=torch.device("cuda", 0)))   # no CUDA call is made
    assert (cuda.train.channels_last, cuda.train.compile, cuda.data.channels_last) == ("on", "on", True)
    assert (cfg.train.channels_last, cfg.train.compile) == ("auto", "auto")   # a copy is resolved


class _Eval(Engine):
    def __init__(self, amp_dtype):
        self.device, self.amp_dtype = torch.device("cpu"), amp_dtype


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_eval_forward_matches_the_weights_precision(half):
    """DeepSpeed casts the module to bf16/fp16 and the loader gives fp32 images; the fp32 EMA
    beside it runs under autocast."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    images = torch.randn(2, 3, 8, 8)
    net.eval()(images)
    engine = _Eval(half)
    fp32_logits = engine.eval_forward(net, images)
    assert fp32_logits.dtype == half                       # autocast on fp32 weights
    cast = engine.eval_forward(net.to(half), images)       # half weights, fp32 input
    assert cast.dtype == half
    torch.testing.assert_close(cast.float(), fp32_logits.float(), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_ddp_with_every_cuda_default(data, tmp_path):
    """bf16 autocast, channels_last weights and inputs, torch.compile, deterministic kernels."""
    out = tmp_path / "ddp"
    first, _ = train_then_resume(data, out, **CUDA_DEFAULTS, **{"train.compile": "on",
                                                                "train.deterministic": True})
    assert "precision bf16, channels_last on, torch.compile on" in first.stdout
    state = load_file(list_checkpoints(checkpoint_dir(out))[0])
    conv = next(v for k, v in state["model"].items() if v.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert state["model"][next(iter(state["model"]))].dtype == torch.float32   # autocast: fp32 weights


@pytest.mark.slow
@pytest.mark.parametrize("stage, compile", [(0, "off"), (1, "on"), (2, "off")])
def test_deepspeed_with_every_cuda_default(data, tmp_path, stage, compile):
    """ZeRO 0/1/2 with bf16 (DeepSpeed casts the module), channels_last on (inputs only: its
    parameters stay contiguous) and, for ZeRO 1 (the default JSON), torch.compile."""
    out = tmp_path / f"zero{stage}"
    first, _ = train_then_resume(data, out, **CUDA_DEFAULTS, **{
        "engine.name": "deepspeed", "engine.zero_stage": stage, "train.compile": compile})
    if compile == "on":
        assert "compiled with torch.compile" in first.stdout
    ckpt = list_checkpoints(checkpoint_dir(out))[0]
    weights = torch.load(ckpt / "weights.pt", weights_only=True)["model"]
    module = torch.load(ckpt / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    params = [k for k, v in weights.items() if v.ndim > 1]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert module[params[0]].dtype == torch.bfloat16
    for k in params:
        # the fp32 master weights, of which the module holds the bf16 rounding
        torch.testing.assert_close(weights[k].to(torch.bfloat16), module[k], rtol=0, atol=0)
    assert sum(int((weights[k] != weights[k].to(torch.bfloat16).float()).sum()) for k in params) \
        > 0.9 * sum(weights[k].numel() for k in params)


@pytest.mark.slow
def test_fp16_resumes_from_a_bf16_checkpoint(data, tmp_path):
    out = tmp_path / "switch"
    run_training(base_overrides(data, out, **{"train.amp": "bf16", "train.epochs": 1}))
    proc = run_training(base_overrides(data, out, **{"train.amp": "fp16"}))
    assert "saved without fp16 loss scaling: starting the fp16 GradScaler afresh" in proc.stdout
    assert "resumed from" in proc.stdout
    state = load_file(list_checkpoints(checkpoint_dir(out))[0])
    assert state["step"] == 12 and state["scaler"]["scale"] > 0   # fp16 now saves its scale


@pytest.mark.slow
def test_deepspeed_refuses_a_checkpoint_of_another_precision(data, tmp_path):
    """DeepSpeed cannot load a bf16 checkpoint into an fp32 engine: a clear error, not a silent
    fall-back past every checkpoint of the run to step 0."""
    out = tmp_path / "ds"
    run_training(base_overrides(data, out, **{"engine.name": "deepspeed", "train.amp": "bf16",
                                              "train.epochs": 1, "run.max_steps": 1}))
    proc = run_training(base_overrides(data, out, **{"engine.name": "deepspeed", "train.amp": "off"}),
                        check=False)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "resumes only with the same precision and ZeRO stage" in proc.stderr
    assert "'precision': 'bf16'" in proc.stderr and "weights.pt" in proc.stderr
    assert "starting from scratch" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("json_file, amp, half", [
    ("launch/deepspeed/zero1_fp16.json", "auto", torch.float16),
    ("launch/deepspeed/zero2_bf16.json", "auto", torch.bfloat16),
    ("launch/deepspeed/zero1_fp16.json", "fp16", torch.float16)])
def test_deepspeed_casts_batchnorm_statistics_with_the_parameters(json_file, amp, half):
    """DeepSpeed casts buffers only when data_types.buffer_dtype is set. Cast by DeepSpeed's own
    code as our JSON asks, a WRN trains a step in NCHW without compile (torch's batch norm needs
    running statistics of the weights' dtype); with the buffers left in fp32 it fails."""
    from deepspeed.runtime.config import DtypeEnum
    from deepspeed.runtime.engine import DeepSpeedEngine
    import wrn_large
    from engine.deepspeed_engine import deepspeed_json
    cfg = load_config("configs/quickstart.yaml", [
        "engine.name=deepspeed", f"engine.deepspeed_config={json_file}", f"train.amp={amp}",
        "data.backend=synthetic", "train.batch_size=4"])
    ds = deepspeed_json(cfg, DistInfo())
    assert DtypeEnum(ds["data_types"]["buffer_dtype"]).value == half

    def one_step(buffer_dtype):
        torch.manual_seed(0)
        model = wrn_large.create_model("wrn_cifar", depth=10, widen_factor=1, num_classes=3)
        as_deepspeed = type("Cast", (), {"module": model})()   # the method reads self.module
        DeepSpeedEngine._cast_module_mixed_precision(as_deepspeed, half, buffer_dtype, False)
        model(torch.randn(2, 3, 32, 32, dtype=half)).float().sum().backward()
        return model

    model = one_step(DtypeEnum(ds["data_types"]["buffer_dtype"]).value)
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {half}
    with pytest.raises(RuntimeError, match="type"):
        one_step(None)                                       # what fp16 got before


def test_cuda_rng_state_is_the_ranks_own_device():
    """A checkpoint saved with 8 GPUs visible per process resumes where 4 are: only the rank's
    own device's state is saved (one entry) and restored on the rank's device; an older
    checkpoint's list of 8 gives the entry of this device, or none, never an IndexError."""
    from engine.state import cuda_device, cuda_state_to_restore
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    restore = cuda_state_to_restore(states[:1], 5)          # this format: the rank's own
    assert restore[0] == 5 and restore[1] is states[0]
    restore = cuda_state_to_restore(states, 3)              # older: one per visible device
    assert restore[0] == 3 and restore[1] is states[3]
    assert cuda_state_to_restore(states[:4], 5) is None     # saved where device 5 was not seen
    assert cuda_state_to_restore([], 0) is None             # saved without CUDA
    assert cuda_state_to_restore(states[:1], None) is None  # restored without CUDA
    assert cuda_device() == (torch.cuda.current_device() if torch.cuda.is_available() else None)


def test_rng_state_restores_torch_numpy_and_python_exactly():
    """Draws after a restore repeat those after the save, for every generator the checkpoint
    holds, numpy's cached Gaussian included; a checkpoint with CUDA states restores on a
    machine without CUDA too."""
    import random

    import numpy as np
    from engine.state import rng_state, set_rng_state

    def draws():
        return (torch.rand(3).tolist(), torch.randn(2).tolist(),
                np.random.standard_normal(3).tolist(), np.random.randint(1 << 30),
                random.random(), random.getrandbits(64))

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()           # an odd draw: numpy now holds a cached Gaussian
    saved = rng_state()
    assert len(saved["cuda"]) == (1 if torch.cuda.is_available() else 0)
    expected = draws()
    assert draws() != expected            # the streams move on
    cuda = saved["cuda"] if torch.cuda.is_available() else [torch.zeros(16, dtype=torch.uint8)] * 8
    set_rng_state({**saved, "cuda": cuda})
    assert draws() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_of_more_devices_than_visible_restores():
    from engine.state import rng_state, set_rng_state
    saved = rng_state()
    assert len(saved["cuda"]) == 1
    torch.cuda.manual_seed(123)
    expected = torch.cuda.get_rng_state()
    many = [torch.cuda.get_rng_state() for _ in range(torch.cuda.device_count() + 7)]
    torch.cuda.manual_seed(7)
    set_rng_state({**saved, "cuda": many})                  # set_rng_state_all raised IndexError
    assert torch.equal(torch.cuda.get_rng_state(), expected)
