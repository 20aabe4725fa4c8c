"""The ``ddp`` engine: DistributedDataParallel over the process group (NCCL on CUDA, gloo on the
CPU), a plain model in a job of one process; torch's autocast and, for fp16, its GradScaler."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_file, save_file_atomic
from .config import Config
from .distributed import DistInfo, barrier
from .engines import Engine, Position, build_optimizer, register_engine, resolve_amp

log = logging.getLogger(__name__)


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

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo, batching=None):
        if cfg.train.channels_last == "on":
            model = model.to(memory_format=torch.channels_last)
        self.module = model
        self.staging = Path(cfg.run.output_dir) / "checkpoint_staging"   # for S3 checkpoints
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
        self.position = Position()

    def train_step(self, micro_batches, loss_fn) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        micro_batches = list(micro_batches)
        at = self.position
        for i, (images, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced once, on the last micro-batch.
            sync = self.ddp.no_sync() if self.ddp is not None and not last \
                else contextlib.nullcontext()
            with sync:
                at.forwards += 1
                with self.autocast():
                    loss = loss_fn(self.model(images), targets)
                at.forwards_done += 1
                at.backwards += 1
                self.scaler.scale(loss / len(micro_batches)).backward()
                at.backwards_done += 1
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

    saves_in_background = True    # one file, written by rank 0 alone

    def checkpoint_contents(self, client_state: dict) -> dict | None:
        """Rank 0's checkpoint (the weights are the same on every rank); None elsewhere."""
        if not self.is_main:
            return None
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), **client_state}

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        contents = self.checkpoint_contents(client_state)
        if contents is not None:
            save_file_atomic(contents, path, checksum=True, staging=self.staging)
        barrier()

    def load_checkpoint(self, path: str) -> dict:
        state = load_file(path)
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        load_scaler_state(self.scaler, state.pop("scaler"), path)
        return state
