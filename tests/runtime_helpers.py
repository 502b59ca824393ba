"""Helpers shared by the runtime tests."""
from __future__ import annotations

import numpy as np


def random_weight(shape, density: float, seed: int = 0, centroids: int = 31):
    """A codebook and symbols (0 = pruned, s >= 1 -> codebook[s - 1]) of a random pruned weight."""
    rng = np.random.default_rng(seed)
    codebook = np.sort(rng.standard_normal(centroids)).astype(np.float32)
    symbols = rng.integers(1, centroids + 1, size=shape).astype(np.uint8)
    symbols[rng.random(shape) >= density] = 0
    return codebook, symbols
