"""Training engines: who owns the model wrapper, the optimizer, precision and checkpoints.

An engine is one class registered with ``@register_engine("name")``; the loop only calls the
methods of ``Engine``. An engine of this package is one file named in ``BUILTIN_ENGINES``,
imported when a run first asks for it (``ddp.py``; ``deepspeed_engine.py``, whose import of
DeepSpeed takes seconds, only for the runs that use it).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .config import Config
from .distributed import DistInfo

_engines: dict[str, Callable[..., "Engine"]] = {}
BUILTIN_ENGINES = {"ddp": "ddp", "deepspeed": "deepspeed_engine"}   # name -> module of this package


def register_engine(name: str):
    def wrap(cls):
        _engines[name] = cls
        return cls

    return wrap


def engine_class(name: str) -> Callable[..., "Engine"]:
    """The engine registered as ``name`` (a built-in one is imported on first use)."""
    if name not in _engines and name in BUILTIN_ENGINES:
        importlib.import_module(f"{__package__}.{BUILTIN_ENGINES[name]}")
    if name not in _engines:
        valid = sorted(set(_engines) | set(BUILTIN_ENGINES))
        raise ValueError(f"unknown engine {name!r}; valid: {', '.join(valid)}")
    return _engines[name]


def build_engine(cfg: Config, model: nn.Module, dist: DistInfo, batching=None) -> "Engine":
    """The engine of ``cfg.engine.name``; ``batching`` (engine/membership.py): this start's
    micro-batch and accumulation, by default what ``cfg.train`` gives at this world size."""
    return engine_class(cfg.engine.name)(cfg, model, dist, batching=batching)


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


class Position:
    """Where this rank is inside ``train_step``, for the hang watchdog (engine/watchdog.py): the
    forward and backward passes begun and ended since the process started. Plain ints, counted
    by the engine around its own calls (no sync; read by the watchdog's thread): DDP's
    reductions (its buffer broadcast at the start of forward, the gradient all-reduce inside
    backward) and DeepSpeed's (backward and step) fall inside them alike."""

    __slots__ = ("forwards", "forwards_done", "backwards", "backwards_done")

    def __init__(self):
        self.forwards = self.forwards_done = self.backwards = self.backwards_done = 0


class Engine:
    """One optimizer step over ``grad_accum`` micro-batches, plus checkpoint I/O.

    An engine owns precision and memory layout: it casts or converts the model it is given and
    evaluates under the same policy it trains with (``eval_forward``)."""

    checkpoint_suffix = ".pt"       # a file; "" for engines that write a directory

    module: nn.Module               # the bare model (weights, EMA source, evaluation)
    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype of fp32 weights; None: full precision
    position: Position              # passes begun and ended (train_step counts them)

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

    # whether a CheckpointWriter may write what ``checkpoint_contents`` gives, while training
    # goes on (run.async_checkpoint); else the loop waits for ``save_checkpoint``
    saves_in_background = False

    def checkpoint_contents(self, client_state: dict) -> dict | None:
        """Take the state: what this rank writes into a checkpoint file (the live tensors, to be
        copied before the next step changes them), None on the ranks that write nothing. Only
        for engines that save in the background; writing it is the writer's."""
        raise NotImplementedError

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        """Take the state and write it now, on every rank; returns once it is complete."""
        raise NotImplementedError

    def load_checkpoint(self, path: str) -> dict:
        raise NotImplementedError
