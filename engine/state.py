"""Everything besides model/optimizer that a checkpoint must restore for an exact resume."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .distributed import all_gather_object


@dataclass
class TrainState:
    step: int = 0                   # optimizer steps done
    epoch: int = 0                  # epoch the next step belongs to
    epoch_loss_sum: float = 0.0     # running sums of the current epoch's step losses
    epoch_loss_count: int = 0
    history: list = field(default_factory=list)  # one dict per finished epoch

    def as_dict(self) -> dict:
        return dict(step=self.step, epoch=self.epoch, epoch_loss_sum=self.epoch_loss_sum,
                    epoch_loss_count=self.epoch_loss_count, history=self.history)


def seed_process(seed: int, rank: int, step: int = 0) -> None:
    """Per-rank RNG streams (dropout, mixup); the model itself is initialised before this,
    from the same seed on every rank. ``step``: a rank that joins a run at that step (an
    elastic restart at a larger world size) gets a stream of its own there."""
    s = seed * 1000 + rank + 1
    if step:
        s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            # the rank's own device only: a job resumed with fewer GPUs visible per process
            # (8 per node -> 4) has no device 5 to restore a state into
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate()}


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, so rank 0 can save them all."""
    return all_gather_object(rng_state())


def own_cuda_state(saved: list, device_index: int):
    """The CUDA generator state to restore on this rank's device: the one saved (this format
    saves the rank's own device only), or, from a checkpoint that saved one per visible device,
    the entry of this device if the saving process saw it (None otherwise)."""
    if len(saved) == 1:
        return saved[0]
    return saved[device_index] if device_index < len(saved) else None


def cuda_device() -> int | None:
    """The device whose generator this rank restores: the current one (the rank's own, set at
    start-up); None without CUDA, where no CUDA call may be made (torch would queue it)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def cuda_state_to_restore(saved: list, device_index: int | None) -> tuple[int, torch.Tensor] | None:
    """(device, state) for ``torch.cuda.set_rng_state``, or None: no CUDA here (``device_index``
    None), no state saved, or none for this device in an older checkpoint."""
    if device_index is None or not saved:
        return None
    state = own_cuda_state(saved, device_index)
    return None if state is None else (device_index, state)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = cuda_state_to_restore(state["cuda"], cuda_device())
    if cuda is not None:
        device, generator_state = cuda
        torch.cuda.set_rng_state(generator_state, device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
