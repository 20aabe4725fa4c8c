"""Per-sample random numbers that depend only on (seed, epoch, sample index).

Augmentation parameters come from here rather than from a stateful RNG (a worker's, DALI's or
the global torch one), so a sample gets the same crop and flip whichever rank reads it, however
many processes there are, and after a mid-epoch resume that skipped the batches before it.
Counter-based: splitmix64 of a key built from the three numbers; vectorised in numpy.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices, count: int) -> np.ndarray:
    """``(len(indices), count)`` float64 numbers in [0, 1), a fixed function of
    (seed, epoch, index, column)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFF) * np.uint64(1_000_003)
                          + np.uint64(epoch & 0xFFFFFFFF))
        idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
        column = np.arange(count, dtype=np.uint64).reshape(1, -1)
        x = _splitmix64(_splitmix64(key ^ idx) + column * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
