"""The torchvision baseline: ImageFolder-style JPEG reading with PIL + transforms v2 in a
DataLoader, the loader most users know. Deterministic by construction: the order comes from
``train_shard_indices`` and each sample's random crop/flip from a generator seeded by
(seed, epoch, sample index), so a resumed epoch replays exactly and the global RNG is untouched.

A file that cannot be read or decoded is quarantined and replaced (``data.on_bad_image=skip``)
or stops the run with an error naming it and the command that writes a clean file list
(`python -m pipelines verify`): ``quarantine.BadImagePolicy``, as in the DALI backend."""
from __future__ import annotations

import io
import itertools
import multiprocessing
import sys

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from torchvision.transforms import v2

from .base import (DataConfig, EpochOrder, LoaderSpec, ShardGroups, register_backend,
                   shard_groups)
from .presets import IMAGENET_MEAN, IMAGENET_STD, EvalPreset, eval_preset  # noqa: F401
from .quarantine import BadImage, BadImagePolicy, CorruptImageError, Quarantine  # noqa: F401
from .read_ahead import ReadAhead, read_or_error
from .sources import Samples


def imagenet_transform(cfg: DataConfig, split: str, preset: EvalPreset | None = None):
    """PIL image -> normalised float CHW: RandomResizedCrop (+ flip) for train, the eval
    preset (``presets.eval_preset``) for val; both normalise with the preset's mean/std."""
    preset = preset or eval_preset(cfg)
    if split != "train":
        return preset
    geometry = [v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_area, 1.0),
                                     antialias=True)]
    if cfg.augment:
        geometry.append(v2.RandomHorizontalFlip())
    return v2.Compose([v2.PILToTensor(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(preset.mean, preset.std)])


class BatchReads:
    """The files of the batches one DataLoader worker is going to be asked for, read ahead
    across batch boundaries: the DataLoader hands worker w of W batches w, w+W, w+2W, ... of the
    epoch's order (``schedule``), so while it decodes one batch the next one's files arrive. A
    batch other than the predicted one starts the stream again from it. A failed read is
    returned as its exception, to be raised where that sample is decoded."""

    def __init__(self, read, depth: int, timeout_s: float = 0.0):
        self.reader = ReadAhead(read_or_error(read), depth, timeout_s)
        self.order: list[int] | None = None

    def schedule(self, order: list[int], batch_size: int) -> None:
        self.order, self.batch_size = order, batch_size
        self.position, self.stream, self.next_batch = None, None, None

    def worker_batches(self, first: int, step: int):
        for b in range(first, -(-len(self.order) // self.batch_size), step):
            yield from self.order[b * self.batch_size:(b + 1) * self.batch_size]

    def __call__(self, indices: list[int]) -> list:
        if self.order is None:
            return list(self.reader(indices))
        if self.position is None:
            self.position = {sample: p for p, sample in enumerate(self.order)}
        p = self.position.get(indices[0], -1)
        if p % self.batch_size or self.order[p:p + len(indices)] != list(indices):
            return list(self.reader(indices))        # not a batch of the scheduled epoch
        batch, worker = p // self.batch_size, get_worker_info()
        step = worker.num_workers if worker is not None else 1
        if self.stream is None or batch != self.next_batch:
            self.stream = self.reader(self.worker_batches(batch, step))
        self.next_batch = batch + step
        return list(itertools.islice(self.stream, len(indices)))

    def close(self) -> None:
        """The epoch's stream dropped, its threads ended."""
        self.stream = None
        self.reader.close()


class ImageFiles(Dataset):
    """A source's images by index (``pipelines.sources``). Batches (``__getitems__``, what the
    DataLoader asks of each worker) come through ``BatchReads``: with ``read_ahead`` reads in
    flight, a slow file system's latency hides behind the decoding of the batch before.

    A file that cannot be read or decoded is handled by ``policy`` (``data.on_bad_image``,
    ``quarantine.BadImagePolicy``); a batch carries what its worker quarantined to the loader
    (``collate``), which adds it to the quarantine its caller keeps."""

    def __init__(self, samples: Samples, transform, seed: int, read_ahead: int = 1,
                 quarantine: Quarantine | None = None, drop_bad: bool = False,
                 read_timeout_s: float = 0.0):
        self.samples, self.transform, self.seed = samples, transform, seed
        self.policy = BadImagePolicy(samples, quarantine, seed, drop_bad, read_timeout_s)
        self.reads = BatchReads(self.policy.read_each, read_ahead, read_timeout_s)
        self.epoch = 0

    def close(self) -> None:
        """Ends this process's read-ahead threads (a worker's end with the worker)."""
        self.reads.close()

    def __len__(self) -> int:
        return len(self.samples)

    def schedule(self, order: list[int], batch_size: int) -> None:
        self.reads.schedule(order, batch_size)

    def __getitem__(self, index: int):
        return self.sample(index, self.policy.read_one(index), [])

    def __getitems__(self, indices: list[int]):
        found: list[tuple[int, str]] = []
        samples = [self.sample(i, data, found) for i, data in zip(indices, self.reads(indices))]
        return [s for s in samples if s is not None] + [Found(found)]

    def sample(self, slot: int, data, found: list):
        """(image, label) for ``slot``: its sample, or its substitute; None if dropped."""
        used = self.policy.resolve(slot, self.epoch, slot, data, self.decode, found)
        if used is None:
            return None
        index, _, image = used
        with torch.random.fork_rng(devices=[]):  # per-sample RNG, global stream untouched
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image), self.samples.labels[index]

    @staticmethod
    def decode(index: int, data: bytes) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as f:
                return f.convert("RGB")
        except Exception as e:
            raise BadImage(f"cannot decode ({type(e).__name__}: {e})") from e

    @staticmethod
    def collate(batch: list):
        """(images, labels, what the worker found bad); None for a batch of dropped samples."""
        *samples, found = batch
        if not samples:
            return None if not found.items else (None, None, found.items)
        images, labels = default_collate(samples)
        return images, labels, found.items


class Found:
    """The bad samples a worker met in one batch, carried to the loader beside the batch."""

    def __init__(self, items: list):
        self.items = items


def worker_start(workers: int):
    """How DataLoader workers start: plain fork, except in a launched job (a rank of a
    distributed job, a torchrun worker, a SLURM step), where they are forked from a
    single-threaded fork server started with the stop signals blocked. Two reasons:

    - a rank has native threads (gloo's, NCCL's) that create a Python thread state without the
      GIL when they release a tensor; a fork at that moment leaves the child waiting forever on
      the lock they held (CPython gh-112275, fixed in 3.11.10 and 3.12): a worker stuck before
      it ran a line, and its rank waiting for the batch until the hang watchdog ends the job;
    - on every Python, a plain-fork worker runs torch's own SIGTERM handler, which ends the
      worker for a SIGTERM from its parent and dies of anyone else's: SLURM's to every process
      of the step (below) killed the workers before their rank could save.

    Each epoch's workers receive the data set pickled, as it is at that epoch (a long listing as
    the path of a shared copy: ``shared_listing``), and import the main script as spawned
    processes do (ours guard their ``__main__``).

    Workers leave stopping to their rank. SLURM with ``proctrack/cgroup`` sends a step's signal
    to every process of the step, workers and fork server included; a worker or server killed
    by it fails the rank's next batch before the rank reaches the check where it would save.
    So the fork server starts here with SIGTERM and SIGUSR1 (the trainer's stop signals)
    blocked: the mask survives fork and exec, so the server, the resource tracker it starts
    and every worker forked from it keep those signals pending, never delivered, except a
    SIGTERM from the rank itself (``terminate()``, from DataLoader's shutdown or
    multiprocessing's exit, which then joins the worker), which ends the worker
    (``_obey_rank``). A worker still ends with its rank: the server dies with it
    (``_die_with_rank``), and DataLoader's watchdog in each worker sees its parent gone."""
    if workers == 0 or sys.platform != "linux" or not launched():
        return None
    import os
    import signal
    import threading
    from multiprocessing import forkserver, resource_tracker
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # the server imports torch once, not each worker
    # a signal that comes meanwhile stays pending for this thread, delivered when unblocked
    stop = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        # the server's start starts the tracker first, whose start unblocks SIGTERM (CPython
        # blocks SIGINT and SIGTERM around it, then unblocks them): start it, block again
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        if threading.current_thread() is threading.main_thread():
            os.environ[_FORK_SERVER_OF] = str(os.getpid())    # read by _die_with_rank
        server = forkserver._forkserver
        if server._forkserver_pid not in (None, _own_fork_server["pid"]):
            # this process's fork server, started by someone else (a library, an earlier
            # DataLoader with multiprocessing_context="forkserver") without the stop signals
            # blocked: its workers would die of a step's SIGTERM. Ours replaces it
            server._stop()
        forkserver.ensure_running()   # each a no-op while its process lives
        _own_fork_server["pid"] = server._forkserver_pid
    finally:
        os.environ.pop(_FORK_SERVER_OF, None)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context


_FORK_SERVER_OF = "WRN_FORK_SERVER_OF"
_own_fork_server = {"pid": None}      # the fork server worker_start started in this process


def launched() -> bool:
    """Whether a launcher's stop signal may reach this process's workers too: a rank of a
    distributed job, a torchrun worker, a SLURM step (with ``proctrack/cgroup`` a step's
    signal reaches every process of the step)."""
    import os
    return (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_ID" in os.environ


def _die_with_rank() -> None:
    """In the fork server that worker_start starts (it imports this module first): die with
    the rank's main thread. The server ends when every holder of the rank's end of its pipe
    has closed it, and each worker holds a copy, while a worker's DataLoader watchdog watches
    the server: a rank killed alone (OOM, SIGKILL) would leave both behind for good, deaf to
    SIGTERM, which torchrun sends to the dead rank's process group before a restart."""
    import os
    rank = os.environ.pop(_FORK_SERVER_OF, None)
    if rank is None or sys.platform != "linux":
        return
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(rank):    # the rank died before prctl
        os._exit(0)
    os.register_at_fork(after_in_child=lambda: _obey_rank(int(rank)))


def _obey_rank(rank: int) -> None:
    """In a worker forked from that server (SIGTERM blocked): a thread takes each SIGTERM and
    ends the worker when the rank sent it (what torch's own worker handler does for its
    parent's); SLURM's, torchrun's or anyone else's is dropped."""
    import os
    import signal
    import threading

    def take() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == rank:
                os._exit(0)

    threading.Thread(target=take, name="sigterm-from-rank", daemon=True).start()


_die_with_rank()


class IndexedLoader(EpochOrder):
    """A Loader (pipelines.base) over any map-style dataset of (image, label) pairs."""

    def __init__(self, dataset, spec: LoaderSpec, num_classes: int, workers: int,
                 channels_last: bool, groups: ShardGroups | None = None):
        """``spec.quarantine`` receives what the dataset's workers quarantined; ``groups``:
        the training order's shard groups (``data.shuffle=shards``)."""
        self.dataset, self.spec, self.num_classes = dataset, spec, num_classes
        self.workers, self.channels_last = workers, channels_last
        self.dataset_size, self.groups = len(dataset), groups
        self.planned_reads = getattr(getattr(dataset, "samples", None), "plan", None)
        self.set_epoch(0)

    def __iter__(self):
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = self.epoch
        order = self.remaining_order().tolist()
        if hasattr(self.dataset, "schedule"):
            self.dataset.schedule(order, self.spec.batch_size)
        loader = DataLoader(self.dataset, batch_size=self.spec.batch_size, sampler=order,
                            num_workers=self.workers, pin_memory=self.spec.device.type == "cuda",
                            generator=torch.Generator(), persistent_workers=False,
                            collate_fn=getattr(self.dataset, "collate", None),
                            multiprocessing_context=worker_start(self.workers))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self._iteration = iteration = object()
        batches = iter(loader)
        try:
            for batch in batches:
                if batch is None:
                    continue
                images, labels, *found = batch
                for index, reason in (found[0] if found else []):
                    self.spec.quarantine.add(index, reason)   # a worker's find, kept by the caller
                if images is None:
                    continue
                images = images.to(self.spec.device, non_blocking=True, memory_format=memory_format)
                yield images, labels.to(self.spec.device, non_blocking=True)
        finally:
            # the workers end now, not when the garbage collector finds a cycle that holds them
            getattr(batches, "_shutdown_workers", lambda: None)()
            if self._iteration is iteration:   # not an older epoch's iterator collected late
                self.close()

    def close(self) -> None:
        """Ends the read-ahead threads this process runs for the loader (``data.workers=0``;
        a worker's end with it). Done at the end of every epoch; again at no cost."""
        if hasattr(self.dataset, "close"):
            self.dataset.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@register_backend("torch")
def torch_loader(cfg: DataConfig, spec: LoaderSpec) -> IndexedLoader:
    if cfg.dataset != "imagenet":
        from .small_datasets import small_dataset_loader
        return small_dataset_loader(cfg, spec)
    samples = spec.open_samples(cfg)
    if spec.quarantine is not None:
        spec.quarantine.bind(samples)
    dataset = ImageFiles(samples, imagenet_transform(cfg, spec.split), spec.seed, cfg.read_ahead,
                         spec.quarantine, drop_bad=spec.split != "train",
                         read_timeout_s=cfg.read_timeout_s)
    groups = shard_groups(cfg, samples) if spec.split == "train" else None
    loader = IndexedLoader(dataset, spec, cfg.num_classes or len(samples.classes), cfg.workers,
                           cfg.channels_last, groups)
    loader.classes = samples.classes
    return loader
