"""numba kernels for index-mode products; import only through ``runtime.numba_kernels.kernels()``."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_COLUMN_BLOCK = 64


@njit(cache=True, parallel=True, nogil=True)
def index_matmul_t(x, indices, codebook, out):  # pragma: no cover - compiled
    """``out[b, n] = sum_k x[b, k] * codebook[indices[n, k]]`` (weight ``[N, K]``)."""
    rows, inner = indices.shape
    for n in prange(rows):
        for b in range(x.shape[0]):
            acc = np.float32(0.0)
            for k in range(inner):
                acc += x[b, k] * codebook[indices[n, k]]
            out[b, n] = acc


@njit(cache=True, parallel=True, nogil=True)
def index_matmul(x, indices, codebook, out):  # pragma: no cover - compiled
    """``out[b, n] = sum_k x[b, k] * codebook[indices[k, n]]`` (weight ``[K, N]``), by column blocks."""
    inner, cols = indices.shape
    blocks = (cols + _COLUMN_BLOCK - 1) // _COLUMN_BLOCK
    for blk in prange(blocks):
        lo = blk * _COLUMN_BLOCK
        hi = min(cols, lo + _COLUMN_BLOCK)
        acc = np.zeros(hi - lo, np.float32)
        for b in range(x.shape[0]):
            acc[:] = 0.0
            for k in range(inner):
                xv = x[b, k]
                if xv != 0.0:
                    for n in range(lo, hi):
                        acc[n - lo] += xv * codebook[indices[k, n]]
            for n in range(lo, hi):
                out[b, n] = acc[n - lo]


@njit(cache=True, parallel=True, nogil=True)
def csr_matmul_t(x, row_ptr, cols, symbols, codebook, out):  # pragma: no cover - compiled
    """``out[b, n] = sum over kept (n, k) of x[b, k] * codebook[symbol]`` (CSR weight ``[N, K]``)."""
    for n in prange(row_ptr.size - 1):
        for b in range(x.shape[0]):
            acc = np.float32(0.0)
            for e in range(row_ptr[n], row_ptr[n + 1]):
                acc += x[b, cols[e]] * codebook[symbols[e]]
            out[b, n] = acc


@njit(cache=True, parallel=True, nogil=True)
def csr_matmul(x, row_ptr, cols, symbols, codebook, out):  # pragma: no cover - compiled
    """``out[b, c] = sum over kept (k, c) of x[b, k] * codebook[symbol]`` (CSR weight ``[K, N]``)."""
    for b in prange(x.shape[0]):
        for c in range(out.shape[1]):
            out[b, c] = 0.0
        for k in range(row_ptr.size - 1):
            xv = x[b, k]
            if xv != 0.0:
                for e in range(row_ptr[k], row_ptr[k + 1]):
                    out[b, cols[e]] += xv * codebook[symbols[e]]
