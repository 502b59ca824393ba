"""Helpers shared by the runtime tests."""
from __future__ import annotations

from typing import Optional

import numpy as np

from dcrt.runtime import numba_kernels


def random_weight(shape, density: float, seed: int = 0, centroids: int = 31):
    """A codebook and symbols (0 = pruned, s >= 1 -> codebook[s - 1]) of a random pruned weight."""
    rng = np.random.default_rng(seed)
    codebook = np.sort(rng.standard_normal(centroids)).astype(np.float32)
    symbols = rng.integers(1, centroids + 1, size=shape).astype(np.uint8)
    symbols[rng.random(shape) >= density] = 0
    return codebook, symbols


def no_numba(monkeypatch, value: Optional[str] = "1") -> None:
    """Set ``DCRT_NO_NUMBA`` (None: unset it) for the codecs and the runtime, which reads it once
    (``numba_kernels.reset``); conftest re-reads it after every test."""
    if value is None:
        monkeypatch.delenv("DCRT_NO_NUMBA", raising=False)
    else:
        monkeypatch.setenv("DCRT_NO_NUMBA", value)
    numba_kernels.reset()
