"""The DeepSpeed engine: ZeRO stages 0-2 with the recipe's own torch SGD.

The JSON config (``engine.deepspeed_config``) sets ZeRO, communication and precision options.
The recipe stays ours: batch sizes, accumulation and clipping are written into the JSON from our
config, so DeepSpeed's defaults (e.g. gradient_clipping=1.0) never change the recipe. Precision:
an explicit ``train.amp`` wins; with ``train.amp=auto`` the JSON's bf16/fp16 section decides,
and without one, auto means bf16 on CUDA and fp32 on the CPU.

DeepSpeed casts the module itself to bf16/fp16 and keeps fp32 master weights in its optimizer:
evaluation feeds the cast module inputs of its dtype (``Engine.eval_forward``), and the
``weights.pt`` of each checkpoint holds the fp32 master weights. Its parameters stay contiguous
(``deepspeed.initialize`` views each one as bytes to broadcast it, and ZeRO 1/2 replace them by
views into a flat buffer): ``train.channels_last=on`` gives channels_last activations only.

Checkpoints are saved synchronously whatever ``run.async_checkpoint`` says
(``saves_in_background`` stays False): DeepSpeed writes its own directory, each rank its
shards, inside its ``save_checkpoint``, and there is no single state dict to copy to the host
and hand to our writer thread (engine/checkpoint_writer.py).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import (COMPLETE_MARKER, CheckpointError, ResumeMismatch, is_remote, name_of,
                         publish_directory, save_file_atomic, write_manifest)
from .config import Config, find_config
from .distributed import DistInfo, barrier
from .membership import Batching, plan_batching
from .engines import (PRECISION_NAMES, Engine, Position, build_optimizer, register_engine,
                      resolve_amp)

log = logging.getLogger(__name__)
LAYOUT_FILE = "layout.json"         # precision and ZeRO stage of a checkpoint directory


def deepspeed_json(cfg: Config, dist: DistInfo, batching: Batching | None = None) -> dict:
    path = find_config(cfg.engine.deepspeed_config)
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    t = cfg.train
    batching = batching or plan_batching(t, dist.world_size)
    ds["train_batch_size"] = t.batch_size
    ds["train_micro_batch_size_per_gpu"] = batching.micro_batch
    ds["gradient_accumulation_steps"] = batching.accumulation
    ds["gradient_clipping"] = cfg.optim.clip_grad_norm
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    if cfg.engine.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.engine.zero_stage
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage > 2:
        raise ValueError(f"{path}: ZeRO stage {stage} is not supported (0-2)")
    amp = json_precision(ds) if t.amp == "auto" and json_precision(ds) else \
        resolve_amp(t.amp, dist.device)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": amp == torch.bfloat16}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": amp == torch.float16}
    if amp in (torch.bfloat16, torch.float16):
        # DeepSpeed casts buffers only when told to: BatchNorm's running statistics must follow
        # the parameters' dtype, or batch norm fails ("Expected running_mean to have type Half")
        ds.setdefault("data_types", {})["buffer_dtype"] = PRECISION_NAMES[amp]
    return ds


def json_precision(ds: dict) -> torch.dtype | None:
    """The precision a DeepSpeed JSON enables, if any (used when train.amp=auto)."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds.get(key, {}).get("enabled"):
            return dtype
    return None


@register_engine("deepspeed")
class DeepSpeedEngine(Engine):
    checkpoint_suffix = ""          # DeepSpeed writes a directory per checkpoint

    def __init__(self, cfg: Config, model: nn.Module, dist: DistInfo, batching=None):
        import deepspeed

        self.module = model
        self.dist = dist
        self.device = dist.device
        self.ds_config = deepspeed_json(cfg, dist, batching)
        self.staging = Path(cfg.run.output_dir) / "checkpoint_staging"   # for S3 checkpoints
        self.amp_dtype = json_precision(self.ds_config)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(cfg, model), config=self.ds_config)
        if cfg.train.compile == "on":
            self.engine.compile()
            log.info("DeepSpeed engine: module compiled with torch.compile")
        self.model = self.engine
        self.skipped_before = 0
        self.position = Position()

    def train_step(self, micro_batches, loss_fn) -> torch.Tensor:
        total, count = torch.zeros((), device=self.dist.device), 0
        self.skipped_before = self.engine.skipped_steps
        at = self.position
        for images, targets in micro_batches:
            if self.amp_dtype is not None:
                images = images.to(self.amp_dtype)
            at.forwards += 1
            loss = loss_fn(self.engine(images).float(), targets)
            at.forwards_done += 1
            at.backwards += 1            # its reductions: in backward, and in step (ZeRO)
            self.engine.backward(loss)   # scales by 1/gradient_accumulation_steps itself
            self.engine.step()           # steps the optimizer on the accumulation boundary
            at.backwards_done += 1
            total += loss.detach().float()
            count += 1
        return total / count

    def step_was_skipped(self) -> bool:
        return self.engine.skipped_steps > self.skipped_before   # fp16 overflow (DeepSpeed's count)

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        """DeepSpeed's directory (every rank writes its shards) plus ``weights.pt`` and the
        layout, under a temp name, then made complete: locally the manifest, COMPLETE and a
        rename; for an S3 ``path`` the staged folder is uploaded, each rank its own files, and
        rank 0 writes one manifest for all, last (``checkpoint.publish_directory``)."""
        remote = is_remote(path)
        final = self.staging / name_of(path) if remote else Path(path)
        tmp = final.with_name(f".{final.name}.tmp")
        if self.dist.is_main and tmp.exists():
            shutil.rmtree(tmp)
        barrier()
        self.engine.save_checkpoint(str(tmp), tag="state", client_state=client_state,
                                    save_latest=False)
        barrier()
        weights = self.fp32_state_dict()   # a collective under ZeRO: every rank takes part
        if self.dist.is_main:
            # plain weights too, readable by wrn_large.create_model(pretrained=...)
            save_file_atomic({"model": weights}, tmp / "weights.pt")
            (tmp / LAYOUT_FILE).write_text(json.dumps(self.layout()) + "\n")
            if not remote:
                write_manifest(tmp)
                (tmp / COMPLETE_MARKER).write_text("ok\n")
                replace_dir(tmp, final)
        barrier()
        if remote:
            publish_directory(tmp, path, self.dist.is_main)
            shutil.rmtree(tmp, ignore_errors=True)

    def fp32_state_dict(self) -> dict:
        """The module's state dict with every parameter taken from the optimizer's fp32 master
        copy (the module holds bf16/fp16 roundings of them); buffers upcast to fp32. BatchNorm
        statistics are kept in the module's dtype by DeepSpeed (``buffer_dtype``): no fp32
        copy of them exists."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters = fp16_optimizer_masters(self.engine.optimizer)
        full = {}
        for name, p in self.module.named_parameters():
            master = safe_get_full_fp32_param(p)   # ZeRO 1/2 and bf16: gathered over ranks
            full[name] = master if master is not None else masters.get(id(p), p)
        return {k: (full.get(k, v).detach().float().cpu() if v.is_floating_point() else v.cpu())
                for k, v in self.module.state_dict().items()}

    def layout(self) -> dict:
        """What a DeepSpeed checkpoint can only be resumed with: its optimizer state is typed
        by the precision and, under ZeRO 1/2, partitioned over the processes that wrote it."""
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        return {"precision": PRECISION_NAMES[self.amp_dtype], "zero_stage": stage,
                **({"world_size": self.dist.world_size} if stage > 0 else {})}

    def check_layout(self, path: Path) -> None:
        """A checkpoint of another precision or ZeRO stage, or of ZeRO 1/2 at another world
        size (an elastic restart), is refused with what to do, not skipped: falling back to
        older ones (of the same layout) would lose work silently."""
        saved_file = path / LAYOUT_FILE
        if not saved_file.is_file():  # written before this file existed: let DeepSpeed try
            return
        saved, now = json.loads(saved_file.read_text()), self.layout()
        if "world_size" in now and "world_size" not in saved:   # written before elastic jobs:
            # one optimizer-state file per rank that saved it (DeepSpeed's zero_pp_rank_R_...)
            saved["world_size"] = len(list(path.glob("*/*zero_pp_rank_*_optim_states.pt"))) \
                or now["world_size"]
        if saved.get("world_size") != now.get("world_size") and \
                {k: saved[k] for k in ("precision", "zero_stage")} == \
                {k: now[k] for k in ("precision", "zero_stage")}:
            raise ResumeMismatch(
                f"{path} was written by DeepSpeed ZeRO-{saved['zero_stage']} on "
                f"{saved['world_size']} processes, this job has {now['world_size']}: ZeRO "
                f"partitions the optimizer state over the processes that wrote it. Resume with "
                f"{saved['world_size']} processes, use engine.name=ddp (whose checkpoints resume "
                f"at any world size) for elastic jobs, or start afresh from its fp32 weights "
                f"with model.pretrained={path / 'weights.pt'} and a new run.output_dir.")
        if saved != now:
            raise ResumeMismatch(
                f"{path} was written by DeepSpeed with {saved}, this run has {now}: DeepSpeed "
                f"resumes only with the same precision and ZeRO stage. Set train.amp / "
                f"engine.zero_stage to match, or start afresh from its fp32 weights with "
                f"model.pretrained={path / 'weights.pt'} and a new run.output_dir.")

    def load_checkpoint(self, path: str) -> dict:
        if not (Path(path) / COMPLETE_MARKER).is_file():
            raise CheckpointError(f"{path} is incomplete (no {COMPLETE_MARKER} marker)")
        self.check_layout(Path(path))
        try:
            loaded, client = self.engine.load_checkpoint(path, tag="state")
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
        if loaded is None:
            raise CheckpointError(f"cannot read checkpoint {path}")
        return client


def replace_dir(new: Path, final: Path) -> None:
    """``new`` (complete) takes the name ``final``; a folder already there (the same step of an
    earlier attempt, e.g. a run resumed from an older checkpoint) is deleted only after."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)


def fp16_optimizer_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(param) -> fp32 master for DeepSpeed's optimizers without ZeRO (bf16 or fp16), which
    have no per-parameter link to it: FP16_UnfusedOptimizer keeps one fp32 tensor per
    parameter (``fp32_groups``), FP16_Optimizer one flat tensor per group (``fp32_groups_flat``)."""
    from torch._utils import _unflatten_dense_tensors

    low = getattr(optimizer, "fp16_groups", [])
    if hasattr(optimizer, "fp32_groups_flat"):
        high = [_unflatten_dense_tensors(flat, group)
                for flat, group in zip(optimizer.fp32_groups_flat, low)]
    else:
        high = getattr(optimizer, "fp32_groups", [])
    return {id(p): master for group, masters in zip(low, high) for p, master in zip(group, masters)}
