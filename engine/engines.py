"""Training engines: who owns the model wrapper, the optimizer, precision and checkpoints.

An engine is registered with ``@register_engine("name")``; the trainer only calls the methods of
``Engine``. ``ddp`` lives here, ``deepspeed`` in ``deepspeed_engine.py``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_file, save_file_atomic
from .config import Config
from .distributed import DistInfo, barrier

log = logging.getLogger(__name__)
_engines: dict[str, Callable[..., "Engine"]] = {}


def register_engine(name: str):
    def wrap(cls):
        _engines[name] = cls
        return cls

    return wrap


def build_engine(cfg: Config, model: nn.Module, dist: DistInfo) -> "Engine":
    if cfg.engine.name == "deepspeed" and "deepspeed" not in _engines:
        from . import deepspeed_engine  # noqa: F401  (imported lazily: deepspeed is heavy)
    if cfg.engine.name not in _engines:
        raise ValueError(f"unknown engine {cfg.engine.name!r}; valid: ddp, deepspeed")
    return _engines[cfg.engine.name](cfg, model, dist)


def set_determinism(deterministic: bool) -> None:
    """``train.deterministic``: deterministic kernels where they exist (cuDNN, cuBLAS, torch's
    own; an op without one warns), or, when off, cuDNN's autotuner (``cudnn.benchmark``)."""
    if deterministic:
        # cuBLAS reads it when its first handle is made; set before any matmul (no-op on CPU)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA where supported, full precision on the CPU (16x slower there)."""
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # of amp dtypes


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` (``resolve_amp``'s answer); none for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def param_groups(model: nn.Module, weight_decay: float, skip_bn_and_bias: bool) -> list[dict]:
    if not skip_bn_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(param_groups(model, o.weight_decay, o.no_weight_decay_on_bn),
                           lr=o.lr, momentum=o.momentum, dampening=o.dampening,
                           nesterov=o.nesterov)


def half_dtype(model: nn.Module) -> torch.dtype | None:
    """bf16/fp16 when the module's own weights are (DeepSpeed casts them), else None."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


class Engine:
    """One optimizer step over ``grad_accum`` micro-batches, plus checkpoint I/O.

    An engine owns precision and memory layout: it casts or converts the model it is given and
    evaluates under the same policy it trains with (``eval_forward``)."""

    checkpoint_suffix = ".pt"       # a file; "" for engines that write a directory

    module: nn.Module               # the bare model (weights, EMA source, evaluation)
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype of fp32 weights; None: full precision

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def eval_forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``model`` (the trained module or its fp32 EMA) in the training precision:
        half weights get half inputs, fp32 weights run under the engine's autocast."""
        dtype = half_dtype(model)
        if dtype is not None:
            return model(images.to(dtype))
        with self.autocast():
            return model(images)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clear_optimizer_state(self) -> None:
        """Empty the optimizer's per-parameter state (SGD's momentum buffers): from here it
        steps as a freshly built optimizer would. Wrappers (DeepSpeed's) hold the torch
        optimizer that owns the state as ``.optimizer``."""
        optimizer = self.optimizer
        while not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        optimizer.state.clear()

    def train_step(self, micro_batches: Iterable, loss_fn) -> torch.Tensor:
        """Forward/backward every micro-batch and step; returns the mean loss (0-dim, detached)."""
        raise NotImplementedError

    def step_was_skipped(self) -> bool:
        """Whether fp16 loss scaling skipped the last step (inf/NaN gradients: the weights and
        the optimizer state were left as they were, and the loss scale lowered)."""
        return False

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        raise NotImplementedError

    def load_checkpoint(self, path: str) -> dict:
        raise NotImplementedError


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict, path: str) -> None:
    """A checkpoint saved without fp16 has an empty scaler state: an fp16 run resuming from it
    starts its loss scale afresh (what a new fp16 run does) instead of failing."""
    if scaler.is_enabled() and not state:
        log.warning("%s was saved without fp16 loss scaling: starting the fp16 GradScaler afresh "
                    "(scale %g)", path, scaler.get_scale())
        return
    scaler.load_state_dict(state)


@register_engine("ddp")
class DDPEngine(Engine):
    """DistributedDataParallel (NCCL on CUDA, gloo on the CPU); a plain model in one process."""

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo):
        if cfg.train.channels_last == "on":
            model = model.to(memory_format=torch.channels_last)
        self.module = model
        self.accum = cfg.train.grad_accum
        self.clip = cfg.optim.clip_grad_norm
        self.device = dist.device
        self.amp_dtype = resolve_amp(cfg.train.amp, dist.device)
        self.optimizer = build_optimizer(cfg, model)
        self.scaler = torch.amp.GradScaler(dist.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.skipped = False
        self.ddp = None
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids)
        wrapped = self.ddp or model
        self.model = torch.compile(wrapped) if cfg.train.compile == "on" else wrapped
        self.is_main = dist.is_main

    def train_step(self, micro_batches, loss_fn) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        micro_batches = list(micro_batches)
        for i, (images, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced once, on the last micro-batch.
            sync = self.ddp.no_sync() if self.ddp is not None and not last \
                else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss = loss_fn(self.model(images), targets)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach().float()
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # update() lowers the scale exactly when step() found inf/NaN and skipped
        self.skipped = scale is not None and self.scaler.get_scale() < scale
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    def step_was_skipped(self) -> bool:
        return self.skipped

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        if self.is_main:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), **client_state}
            save_file_atomic(state, path, checksum=True)
        barrier()

    def load_checkpoint(self, path: str) -> dict:
        state = load_file(path)
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        load_scaler_state(self.scaler, state.pop("scaler"), path)
        return state
