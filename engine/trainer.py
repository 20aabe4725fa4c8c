"""The training loop shared by every recipe (ImageNet, CIFAR, SVHN) and every engine."""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn

import pipelines
from pipelines.quarantine import BAD_IMAGES
from pipelines.class_names import class_names
import wrn_large
from pipelines import LoaderSpec, build_loader

from . import checkpoint as ckpt
from .config import Config, save_config, to_dict
from .provenance import provenance, write_json
from .distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier,
                          broadcast_object, cleanup, init_distributed, stop_with_parent,
                          sync_buffers)
from .engines import PRECISION_NAMES, Engine, build_engine, set_determinism
from .evaluate import evaluate
from .metrics import MetricsWriter, fmt, plot_curves, summary_table
from .schedule import is_lr_drop, lr_at, scaled_lr
from .state import TrainState, gather_rng_states, seed_process, set_rng_state
from .step_times import StepTimes, stragglers
from .watchdog import COLLECTIVE, Watchdog, rank_store

log = logging.getLogger("wrn_large.train")
# fp16 loss scaling skips a step whose loss is inf/NaN; this many in a row is divergence (a
# lower scale cannot mend an overflowing forward pass)
MAX_SKIPPED_IN_A_ROW = 10
STRAGGLER_WINDOWS, STRAGGLER_REPEAT = 3, 30   # logging intervals: to name a straggler, to name it again


class TrainingDiverged(RuntimeError):
    pass


class RunDirInUse(RuntimeError):
    pass


# written by rank 0 when SIGUSR1 stopped the run, where $WRN_REQUEUE_MARKER says (else in the
# run directory): launch/slurm.sbatch requeues the job when it finds it (`scancel
# --signal=USR1 JOBID` signals the ranks, not the script, and USR1 means "checkpoint and
# requeue" there)
REQUEUE_MARKER = "requeue_requested"


class StopRequested:
    """SIGTERM/SIGUSR1 (SLURM preemption, `scancel --signal`): finish the step, checkpoint, exit."""

    def __init__(self):
        self.flag, self.signals = False, set()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %d: checkpointing after this step, then exiting", signum)
        self.flag = True
        self.signals.add(signum)   # srun may follow a USR1 with a TERM: USR1 still decides


def setup_logging(dist: DistInfo, output_dir: Path) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if dist.is_main:
        handlers.append(logging.FileHandler(output_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", handlers=handlers)


def resolve_auto(cfg: Config, dist: DistInfo) -> None:
    """Fill in the 'auto' switches: on with CUDA, off on the CPU (where they slow training);
    docs/switches.md. (train.amp=auto is resolved by the engine.)"""
    cuda = dist.device.type == "cuda"
    for key in ("channels_last", "compile"):
        if getattr(cfg.train, key) == "auto":
            setattr(cfg.train, key, "on" if cuda else "off")
    cfg.data.channels_last = cfg.train.channels_last == "on"  # the engine decides the weights'
    set_determinism(cfg.train.deterministic)
    if cfg.data.dataset == "imagenet" and cfg.data.root is None and cfg.data.backend != "synthetic":
        from pipelines.default_data import ensure_default_dataset
        if dist.is_main:
            ensure_default_dataset()
        barrier()
        cfg.data.root = ensure_default_dataset()


def micro_batch_size(cfg: Config, dist: DistInfo) -> int:
    per_step = dist.world_size * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                         f"{dist.world_size} processes x train.grad_accum={cfg.train.grad_accum}")
    return cfg.train.batch_size // per_step


def build_loss(cfg: Config, num_classes: int):
    """(loss_fn, batch_transform): timm's Mixup/CutMix with soft targets when enabled."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        mix = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                    num_classes=num_classes)
        return SoftTargetCrossEntropy(), lambda batch: mix(*batch)
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


def build_model(cfg: Config, num_classes: int, dist: DistInfo) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    kwargs = {"num_classes": num_classes, **cfg.model.kwargs}
    try:
        model = wrn_large.create_model(cfg.model.name, pretrained=cfg.model.pretrained,
                                       use_ema=cfg.model.pretrained_ema, **kwargs)
    except TypeError as e:
        raise TypeError(f"{e} (model.kwargs is {cfg.model.kwargs}; to drop it when changing "
                        f"model.name, add model.kwargs={{}})") from e
    return model.to(dist.device)


def reduce_step(loss: torch.Tensor, stop_flag: bool, dist: DistInfo,
                times: tuple[float, float] = (0.0, 0.0)) -> tuple[float, bool, list, list]:
    """In one all-reduce: the mean loss over ranks, whether any rank was asked to stop, and
    every rank's (data wait, forward) seconds (``StepTimes``: rank r fills slots r)."""
    world = dist.world_size
    packed = torch.zeros(2 + 2 * world, dtype=torch.float64)
    packed[1] = float(stop_flag)
    packed[2 + dist.rank], packed[2 + world + dist.rank] = times
    packed = packed.to(loss.device)
    packed[0] = loss.double()
    all_reduce_sum(packed)
    values = packed.tolist()
    return values[0] / world, values[1] > 0, values[2:2 + world], values[2 + world:]


def collective_timeout(hang_timeout_s: float) -> timedelta | None:
    """The process group's timeout: past the watchdog's, which fires first and says which rank
    hung and where; the collective's own timeout stays as a backstop (watchdog off: the
    backends' defaults)."""
    return timedelta(seconds=hang_timeout_s + 300) if hang_timeout_s > 0 else None


class Window:
    """One logging interval's figures: images/s, and the share of wall time spent waiting for
    input (mean over ranks) with every rank's mean data wait and forward per step."""

    def __init__(self, world_size: int):
        self.t0, self.images, self.steps = time.time(), 0, 0
        self.waits, self.forwards = [0.0] * world_size, [0.0] * world_size

    def add(self, images: int, waits: list, forwards: list) -> None:
        self.images, self.steps = self.images + images, self.steps + 1
        self.waits = [a + b for a, b in zip(self.waits, waits)]
        self.forwards = [a + b for a, b in zip(self.forwards, forwards)]

    def close(self) -> dict:
        seconds = max(time.time() - self.t0, 1e-9)
        n = max(self.steps, 1)
        wait = sum(self.waits) / len(self.waits)
        figures = {"images_per_s": self.images / seconds, "seconds": seconds,
                   "data_wait_s": wait, "data_wait": min(wait / seconds, 1.0),
                   "rank_data_wait_s": [round(w / n, 5) for w in self.waits],
                   "rank_forward_s": [round(f / n, 5) for f in self.forwards]}
        self.__init__(len(self.waits))
        return figures


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist = init_distributed(cfg.engine.dist_backend,
                                     need_process_group=cfg.engine.name == "deepspeed",
                                     timeout=collective_timeout(cfg.train.hang_timeout_s))
        self.out = Path(cfg.run.output_dir)
        lock_error = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                self.lock = ckpt.RunDirLock(self.out)
            except RuntimeError as e:
                lock_error = str(e)
        lock_error = broadcast_object(lock_error)  # every rank refuses together
        if lock_error:
            raise RunDirInUse(lock_error)
        setup_logging(self.dist, self.out)
        self.watchdog = Watchdog(cfg.train.hang_timeout_s, self.dist.rank, self.dist.world_size,
                                 self.out, rank_store(self.dist.rank, self.dist.world_size)
                                 if cfg.train.hang_timeout_s > 0 else None)
        self.hosts = all_gather_object(socket.gethostname())
        resolve_auto(cfg, self.dist)
        d, t = self.dist, cfg.train
        self.micro = micro_batch_size(cfg, d)
        spec = dict(batch_size=self.micro, rank=d.rank, world_size=d.world_size, seed=t.seed,
                    device=d.device, listings=self.out / "listings")
        self.train_loader = build_loader(cfg.data, LoaderSpec("train", **spec))
        self.val_loader = build_loader(cfg.data, LoaderSpec("val", **spec))
        self.num_classes = self.train_loader.num_classes
        self.classes, self.class_names = class_names(cfg.data, self.train_loader)
        self.model = build_model(cfg, self.num_classes, d)
        self.step_times = StepTimes(self.model, d.device)
        self.engine: Engine = build_engine(cfg, self.model, d)
        self.ema = None
        if t.ema_decay > 0:
            from timm.utils import ModelEmaV3
            # fp32 even where the engine casts the model to bf16/fp16 (DeepSpeed): tiny
            # updates of a half-precision average round away
            self.ema = ModelEmaV3(self.model, decay=t.ema_decay, dtype=torch.float32)
        self.loss_fn, self.batch_transform = build_loss(cfg, self.num_classes)
        self.steps_per_epoch = len(self.train_loader) // t.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set gives no full step of {t.batch_size} images")
        self.total_steps = t.epochs * self.steps_per_epoch
        self.base_lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_batch, t.batch_size)
        self.state = TrainState()
        self._buffers_synced_at = -1
        self.skipped_in_a_row = 0
        self.metrics = MetricsWriter(self.out, enabled=d.is_main)
        self.data_wait_total = self.time_total = 0.0   # this job's, for the summary
        self.slow_windows: dict[int, int] = {}          # rank -> logging intervals slow in a row
        self.stop = StopRequested()
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: never outlive the agent
            stop_with_parent(signal.SIGTERM)
        self.provenance = {}     # rank 0's: a git call per rank would be start-up for nothing
        if d.is_main:
            self.provenance = provenance(cfg, d.world_size, d.device,
                                         PRECISION_NAMES[self.engine.amp_dtype])
            save_config(cfg, self.out / "config.yaml", self.provenance)
            write_json(self.out / "provenance.json", self.provenance)
            log.info("model %s: %.2fM parameters, %d classes; %s engine, %d process(es) on %s; "
                     "global batch %d (%d x %d accum x %d procs), lr %.4g; data backend %s; "
                     "precision %s, channels_last %s, torch.compile %s",
                     cfg.model.name, wrn_large.count_params(self.model) / 1e6, self.num_classes,
                     cfg.engine.name, d.world_size, d.device, t.batch_size, self.micro,
                     t.grad_accum, d.world_size, self.base_lr,
                     pipelines.resolve_backend(cfg.data.backend),
                     PRECISION_NAMES[self.engine.amp_dtype], t.channels_last, t.compile)

    # ----------------------------------------------------------------- checkpoints
    def quarantines(self) -> dict:
        """The loaders' quarantines (``data.on_bad_image=skip``), by split."""
        loaders = {"train": self.train_loader, "val": self.val_loader}
        return {split: q for split, loader in loaders.items()
                if (q := getattr(loader, "quarantine", None)) is not None}

    def share_quarantines(self) -> dict:
        """Every rank's bad images, known to all from now on; rank 0 writes bad_images.txt."""
        quarantines = self.quarantines()
        for states in all_gather_object({s: q.state() for s, q in quarantines.items()}):
            for split, state in states.items():
                quarantines[split].merge(state)
        if self.dist.is_main and any(len(q) for q in quarantines.values()):
            lines = [line for q in quarantines.values() for line in q.listing()]
            ckpt.write_text_atomic(self.out / BAD_IMAGES, "\n".join(lines) + "\n")
        return {split: q.state() for split, q in quarantines.items()}

    def client_state(self) -> dict:
        return {**self.state.as_dict(), "rng": gather_rng_states(),
                "quarantine": self.share_quarantines(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "config": to_dict(self.cfg), "num_classes": self.num_classes,
                "classes": self.classes, "class_names": self.class_names}

    def sync_buffers(self) -> None:
        """Equal BatchNorm statistics on every rank (``train.dist_bn``), once per step: the
        model that is evaluated is the model that is saved."""
        if self._buffers_synced_at == self.state.step:
            return
        sync_buffers(self.model, self.cfg.train.dist_bn)
        if self.ema is not None:
            sync_buffers(self.ema.module, self.cfg.train.dist_bn)
        self._buffers_synced_at = self.state.step

    def save(self) -> Path:
        path = ckpt.checkpoint_path(self.out, self.state.step, self.engine.checkpoint_suffix)
        if path.exists():  # already saved at this step (e.g. epoch end == every-N-steps)
            return path
        self.watchdog.progress(phase="checkpoint")
        self.sync_buffers()
        if not all(torch.isfinite(t).all() for t in self.model.state_dict().values()
                   if t.is_floating_point()):
            # the last step produced inf/NaN weights: never let them replace a good checkpoint
            raise TrainingDiverged(self.divergence_message("finite, but the weights are not"))
        self.engine.save_checkpoint(str(path), self.client_state())
        if self.dist.is_main:
            ckpt.prune(self.out, self.cfg.run.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        barrier()
        return path

    def resume(self) -> None:
        choice = self.cfg.run.resume
        if choice == "none":
            return
        candidates = ckpt.list_checkpoints(self.out) if choice == "auto" else [Path(choice)]
        if choice != "auto" and not candidates[0].exists():
            raise FileNotFoundError(f"run.resume={choice}: no such checkpoint")
        for path in candidates:
            if not ckpt.is_complete(path):
                log.warning("skipping incomplete checkpoint %s", path)
                continue
            try:
                ckpt.verify(path)
                client = self.engine.load_checkpoint(str(path))
            except ckpt.CheckpointError as e:
                if choice != "auto":
                    raise
                log.warning("%s; falling back to the previous checkpoint", e)
                continue
            self.restore(client, path)
            return
        if candidates:
            log.warning("no valid checkpoint in %s: starting from scratch", ckpt.checkpoint_dir(self.out))

    def restore(self, client: dict, path: Path) -> None:
        for key in ("step", "epoch", "epoch_loss_sum", "epoch_loss_count", "history"):
            setattr(self.state, key, client[key])
        if self.ema is not None and client.get("ema") is not None:
            self.ema.module.load_state_dict(client["ema"])
        for split, q in self.quarantines().items():
            q.merge((client.get("quarantine") or {}).get(split, {}))
        rngs = client.get("rng") or []
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            log.warning("checkpoint was written by %d processes, this job has %d: RNG streams "
                        "are re-seeded, so the continuation is not bitwise identical",
                        len(rngs), self.dist.world_size)
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)

    # ----------------------------------------------------------------------- loop
    def fit(self) -> dict:
        seed_process(self.cfg.train.seed, self.dist.rank)
        # started here, stopped in the finally below: no watchdog outlives the run (a Trainer
        # that failed to build, in a process that goes on, must not exit it 15 minutes later)
        self.watchdog.start()
        t0, status = time.time(), "finished"
        try:
            self.watchdog.progress(phase="checkpoint")
            self.resume()
            self.watchdog.progress(phase="start")
            t0 = time.time()
            while self.state.epoch < self.cfg.train.epochs:
                status = self.train_epoch()
                if status != "epoch_done":
                    break
                self.end_epoch()
            else:
                status = "finished"
        finally:
            self.watchdog.stop()
            self.metrics.close()
        summary = self.summary(time.time() - t0, status)
        cleanup()
        return summary

    def micro_batches(self, iterator):
        for _ in range(self.cfg.train.grad_accum):
            self.watchdog.progress(phase="data")
            with self.step_times.waiting_for_data():
                batch = next(iterator)
            self.watchdog.progress(phase="compute")
            yield self.batch_transform(batch) if self.batch_transform else batch

    def ticking(self, batches, phase: str):
        """``batches``, telling the watchdog of each one (evaluation is progress too)."""
        for batch in batches:
            self.watchdog.progress(phase=phase)
            yield batch

    def train_epoch(self) -> str:
        cfg, st, spe = self.cfg, self.state, self.steps_per_epoch
        done = st.step - st.epoch * spe
        self.train_loader.set_epoch(st.epoch, done * cfg.train.grad_accum)
        iterator = iter(self.train_loader)
        self.model.train()
        bar = self.progress_bar(done)
        window = Window(self.dist.world_size)
        for _ in range(done, spe):
            lr = lr_at(st.step, self.base_lr, spe, cfg.train.epochs, cfg.schedule)
            self.engine.set_lr(lr)
            if cfg.optim.fresh_at_lr_drops and is_lr_drop(st.step, spe, cfg.schedule):
                self.engine.clear_optimizer_state()
                log.info("lr drop to %g at step %d: fresh optimizer state", lr, st.step)
            loss = self.engine.train_step(self.micro_batches(iterator), self.loss_fn)
            self.watchdog.progress(phase=COLLECTIVE)
            loss_value, stop, waits, forwards = reduce_step(loss, self.stop.flag, self.dist,
                                                            self.step_times.take())
            st.step += 1
            self.watchdog.progress(step=st.step)
            window.add(cfg.train.batch_size, waits, forwards)
            if math.isfinite(loss_value):
                self.skipped_in_a_row = 0
                st.epoch_loss_sum += loss_value
                st.epoch_loss_count += 1
            else:
                self.skip_or_diverge(loss_value)
                loss_value = None   # null in metrics.jsonl, left out of the epoch's mean
            if self.ema is not None:
                self.ema.update(self.model, step=st.step)
            if st.step % cfg.run.log_every_steps == 0 or st.step % spe == 0:
                figures = window.close()
                self.data_wait_total += figures["data_wait_s"]
                self.time_total += figures["seconds"]
                skipped = {"skipped": True} if self.engine.step_was_skipped() else {}
                per_rank = ({"rank_data_wait_s": figures["rank_data_wait_s"],
                             "rank_forward_s": figures["rank_forward_s"]}
                            if self.dist.world_size > 1 else {})
                self.metrics.write("train", st.step, epoch=st.epoch, loss=loss_value, lr=lr,
                                   images_per_s=figures["images_per_s"],
                                   data_wait=figures["data_wait"], **per_rank, **skipped)
                self.name_stragglers(figures)
                if bar is not None:
                    bar.set_postfix(loss=fmt(loss_value, 4), lr=f"{lr:.4g}",
                                    img_s=f"{figures['images_per_s']:.0f}",
                                    data=f"{100 * figures['data_wait']:.0f}%", refresh=False)
            if bar is not None:
                bar.update(1)
            every = cfg.run.checkpoint_every_steps
            if stop or (cfg.run.max_steps and st.step >= cfg.run.max_steps):
                if bar is not None:
                    bar.close()
                self.save()
                if stop and signal.SIGUSR1 in self.stop.signals and self.dist.is_main:
                    marker = os.environ.get("WRN_REQUEUE_MARKER") or self.out / REQUEUE_MARKER
                    Path(marker).write_text(f"SIGUSR1 at step {st.step}\n")
                return "preempted" if stop else "max_steps"
            if every and st.step % every == 0 and st.step % spe:
                self.save()
        if bar is not None:
            bar.close()
        return "epoch_done"

    def name_stragglers(self, figures: dict) -> None:
        """Log, on rank 0, each rank whose forward + data wait per step is
        ``train.straggler_factor`` times the other ranks' median in STRAGGLER_WINDOWS logging
        intervals in a row (a warm-up or a passing hiccup is not a straggler), and again every
        STRAGGLER_REPEAT intervals while it stays so."""
        if not self.dist.is_main:
            return
        slow = stragglers(figures["rank_forward_s"], figures["rank_data_wait_s"],
                          self.cfg.train.straggler_factor)
        self.slow_windows = {rank: self.slow_windows.get(rank, 0) + 1 for rank, _, _ in slow}
        for rank, times, why in slow:
            count = self.slow_windows[rank]
            if count < STRAGGLER_WINDOWS or (count - STRAGGLER_WINDOWS) % STRAGGLER_REPEAT:
                continue
            log.warning("straggler: rank %d on %s is %.1fx the other ranks' median (forward %.3f s + "
                        "data wait %.3f s per step) for %d logging intervals, mostly %s; every "
                        "step waits for it", rank, self.hosts[rank], times,
                        figures["rank_forward_s"][rank], figures["rank_data_wait_s"][rank],
                        count, why)

    def skip_or_diverge(self, loss_value: float) -> None:
        """A non-finite loss: a step fp16 loss scaling skipped (weights untouched, as timm and
        torchvision's references let it pass), or divergence."""
        if not self.engine.step_was_skipped():
            raise TrainingDiverged(self.divergence_message(loss_value))
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise TrainingDiverged(self.divergence_message(
                f"{loss_value} for {self.skipped_in_a_row} steps in a row (each skipped by fp16 "
                f"loss scaling)"))
        log.warning("step %d: loss %s, step skipped by fp16 loss scaling (weights unchanged)",
                    self.state.step, loss_value)

    def divergence_message(self, value: float) -> str:
        newest = next((p for p in ckpt.list_checkpoints(self.out) if ckpt.is_complete(p)), None)
        where = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written yet"
        return (f"training loss is {value} at step {self.state.step} (epoch "
                f"{self.state.epoch}); stopped without saving, so {where}. Lower optim.lr, "
                f"check the data, or use train.amp=off / optim.clip_grad_norm=1.0.")

    def progress_bar(self, done: int):
        if not (self.dist.is_main and self.cfg.run.progress):
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=done, unit="step", dynamic_ncols=True,
                    desc=f"epoch {self.state.epoch + 1}/{self.cfg.train.epochs}", file=sys.stdout)

    def end_epoch(self) -> None:
        st, cfg = self.state, self.cfg
        record = {"epoch": st.epoch + 1, "train_loss": st.epoch_loss_sum / max(st.epoch_loss_count, 1),
                  "lr": lr_at(st.step - 1, self.base_lr, self.steps_per_epoch, cfg.train.epochs,
                              cfg.schedule)}
        last = st.epoch + 1 == cfg.train.epochs
        if last or (st.epoch + 1) % cfg.run.eval_every_epochs == 0:
            self.watchdog.progress(phase="evaluation")   # its BatchNorm sync included
            self.sync_buffers()
            record.update(self.run_eval())
        st.history.append(record)
        st.epoch += 1
        st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0
        self.metrics.write("epoch", st.step, **record)
        if self.dist.is_main:
            log.info("epoch %d/%d: train loss %.4f, %s", record["epoch"], cfg.train.epochs,
                     record["train_loss"], ", ".join(f"{k} {fmt(v)}" for k, v in record.items()
                                                     if k in ("top1", "top5", "top1_ema")))
            plot_curves(st.history, self.out / "training_curves.png",
                        f"{cfg.model.name} on {cfg.data.dataset}")
        self.save()

    def run_eval(self) -> dict:
        forward = self.engine.eval_forward
        result = evaluate(self.model, self.ticking(self.val_loader, "evaluation"),
                          self.dist.device, forward)
        bad = self.share_quarantines().get("val")
        if bad:
            result["val_skipped"] = len(bad)
            if self.dist.is_main:
                log.warning("evaluated over %d images: %d bad validation image(s) left out (%s)",
                            result["val_samples"], len(bad), BAD_IMAGES)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.ticking(self.val_loader, "evaluation"),
                           self.dist.device, forward)
            result.update({f"{k}_ema": v for k, v in ema.items() if k in ("top1", "top5", "val_loss")})
        return result

    def summary(self, seconds: float, status: str) -> dict:
        history = self.state.history
        last = history[-1] if history else {}
        best = max((h["top1"] for h in history if "top1" in h), default=None)
        result = {"status": status, "steps": self.state.step, "epochs": self.state.epoch,
                  "final_top1": last.get("top1"), "final_top5": last.get("top5"),
                  "best_top1": best, "train_loss": last.get("train_loss"),
                  "seconds": seconds, "output_dir": str(self.out)}
        if self.dist.is_main:
            rows = [("model", self.cfg.model.name), ("data", f"{self.cfg.data.dataset} ({self.cfg.data.root})"),
                    ("status", status), ("epochs done", f"{self.state.epoch}/{self.cfg.train.epochs}"),
                    ("optimizer steps", str(self.state.step)),
                    ("final train loss", fmt(last.get("train_loss"), 4)),
                    ("final top-1 / top-5 (%)", f"{fmt(last.get('top1'))} / {fmt(last.get('top5'))}"),
                    ("best top-1 (%)", fmt(best)), ("wall time (s)", fmt(seconds, 1)),
                    ("waiting for input (% of train time)",
                     fmt(100 * self.data_wait_total / self.time_total if self.time_total else None, 1)),
                    ("outputs", f"{self.out}/ (metrics.jsonl, tensorboard/, training_curves.png, "
                                "checkpoints/)")]
            print(summary_table(rows), flush=True)
            if status == "finished":   # reproduce.py's mark of a finished run
                write_json(self.out / "result.json", {**result, **self.provenance,
                                                      "final": last})
        return result


def train(cfg: Config) -> dict:
    return Trainer(cfg).fit()
