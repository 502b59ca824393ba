"""numba kernels for float32 weights (dense mode); import only through ``runtime.numba_kernels.kernels()``.

``gemv_t`` is ``x @ W.T`` for one row of ``x`` (a fully-connected layer at batch 1). When ``W`` is in
cache BLAS is as fast or faster; when it is not (a classifier after a convolutional body, read once
per inference), the order the weight is read in decides: OpenBLAS's GEMV reads four rows of ``W``
side by side, four interleaved streams that the hardware prefetcher follows poorly, while this
kernel reads ``W`` as one sequential stream, row after row (two rows side by side were as slow as
OpenBLAS). One core here, the weight last read before 24 MB of other data: 1000x1280 166-190 ->
109-162 us, 1000x2048 264-335 -> 185-218 us, 1000x512 76-112 -> 47-53 us; in cache 63 against
65-78 us. ``gemv_t_par`` gives each thread a contiguous block of rows: one stream per thread.

Their numpy twin is the BLAS call ``kernels.product_t`` makes otherwise; ``tests/test_kernels.py``
checks that they agree.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import njit

_FAST = {"reassoc", "nsz", "contract"}     # the sum vectorised; NaN and inf kept (no nnan/ninf)
_PARTS = 16     # tasks of the parallel form (a constant: numba.get_num_threads() is not cachable)


@njit(inline="always")
def _rows(w, x, out, n0, n1):  # pragma: no cover - compiled
    for n in range(n0, n1):
        acc = np.float32(0.0)
        for k in range(x.shape[0]):
            acc += w[n, k] * x[k]
        out[n] = acc


@njit(cache=True, nogil=True, fastmath=_FAST)
def gemv_t(w, x, out):  # pragma: no cover - compiled
    """``out[n] = w[n] . x`` for ``w [N, K]``, ``x [K]``, ``out [N]``, all float32, rows in order."""
    _rows(w, x, out, 0, w.shape[0])


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def gemv_t_par(w, x, out):  # pragma: no cover - compiled
    rows = w.shape[0]
    for t in prange(_PARTS):
        _rows(w, x, out, t * rows // _PARTS, (t + 1) * rows // _PARTS)
