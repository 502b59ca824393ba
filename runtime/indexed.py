"""Weights kept as codebook indices, computed with directly (index mode).

Two forms, chosen per tensor by ``dcrt.memory.sparse_layout`` so that ``dcrt size`` and the runtime
agree on the resident bytes:

- :class:`IndexedWeight`: a codebook and one uint8/uint16 index per weight (pruned weights index a
  zero centroid). A product is computed tile by tile: a block of rows is expanded from the codebook,
  multiplied and dropped, so a dense float32 copy of the whole weight never exists.
- :class:`SparseWeight`: CSR over the 2-D view (rows = ``shape[0]``): row pointers, int32 column
  indices and the codebook symbols of the kept weights. A small batch is multiplied entry by entry
  with ``np.bincount``; a large one (a convolution's im2col matrix) by expanded row tiles.

Both support what the operators may do with a weight (see ``runtime/kernels.py``): ``shape``,
``ndim``, ``dtype``, leading-axis indexing, ``reshape(rows, -1)``, ``matmul``, ``matmul_t``,
``take_rows`` and ``dense``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .numba_kernels import LOCK, kernels

TILE_BYTES = 1 << 20        # largest tile expanded from the codebook at once
TILE_FRACTION = 4           # ... and at most a quarter of the weight: never a dense copy of it
SMALL_BATCH = 8             # up to this many rows of x, a sparse product goes entry by entry
COMPILED_BATCH = 32         # up to this many rows of x, the numba kernels beat expanded tiles + BLAS
ENTRY_BLOCK = 4096          # ... in blocks of this many kept weights


def _tile_rows(rows: int, row_elems: int) -> int:
    """Rows per expanded tile: within TILE_BYTES and a 1/TILE_FRACTION share of the weight.

    An element of a tile costs 12 bytes while it is built: numpy turns the uint8/uint16 indices into
    an intp array (8 bytes) before gathering the float32 centroids (4 bytes).
    """
    budget = min(TILE_BYTES, 4 * rows * row_elems // TILE_FRACTION)
    return max(1, budget // max(1, 12 * row_elems))


def _compiled(x: np.ndarray, inner: int):
    """The numba kernels when they apply: float32 input with few rows (batch-like products)."""
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if x.dtype != np.float32 or rows > COMPILED_BATCH or x.shape[-1] != inner:
        return None
    return kernels()


def _run(kernel, x: np.ndarray, n: int, *weight) -> np.ndarray:
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty((x2.shape[0], n), np.float32)
    with LOCK:
        kernel(x2, *weight, out)
    return out.reshape(x.shape[:-1] + (n,))


class IndexedWeight:
    """``codebook[indices]`` without expanding it: ``indices`` has the weight's shape."""

    def __init__(self, codebook: np.ndarray, indices: np.ndarray):
        self.codebook = np.asarray(codebook, dtype=np.float32)
        self.indices = indices

    shape = property(lambda self: self.indices.shape)
    ndim = property(lambda self: self.indices.ndim)
    dtype = property(lambda self: np.dtype(np.float32))
    nbytes = property(lambda self: self.indices.nbytes + self.codebook.nbytes)

    def __getitem__(self, key) -> "IndexedWeight":
        return IndexedWeight(self.codebook, self.indices[key])

    def reshape(self, *shape) -> "IndexedWeight":
        return IndexedWeight(self.codebook, self.indices.reshape(*shape))

    def dense(self) -> np.ndarray:
        return self.codebook[self.indices]

    def take_rows(self, idx: np.ndarray) -> np.ndarray:
        return self.codebook[np.take(self.indices, idx, axis=0)]

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T`` for a 2-D weight ``[N, K]``, one tile of output columns at a time."""
        n, k = self.indices.shape
        compiled = _compiled(x, self.indices.shape[1])
        if compiled is not None:
            return _run(compiled.index_matmul_t, x, n, self.indices, self.codebook)
        out = np.empty(x.shape[:-1] + (n,), dtype=np.result_type(x.dtype, np.float32))
        step = _tile_rows(n, k)
        for a in range(0, n, step):
            out[..., a:a + step] = x @ self.codebook[self.indices[a:a + step]].T
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W`` for a 2-D weight ``[K, N]``, accumulating one tile of the contraction at a time."""
        k, n = self.indices.shape
        compiled = _compiled(x, k)
        if compiled is not None:
            return _run(compiled.index_matmul, x, n, self.indices, self.codebook)
        out = np.zeros(x.shape[:-1] + (n,), dtype=np.result_type(x.dtype, np.float32))
        step = _tile_rows(k, n)
        for a in range(0, k, step):
            out += x[..., a:a + step] @ self.codebook[self.indices[a:a + step]]
        return out


class SparseWeight:
    """A pruned weight in CSR form over ``shape[0]`` rows: ``value = codebook[symbol - 1]``.

    ``row_ptr`` [rows + 1] int64, ``cols`` int32 (column in the flattened trailing axes) and
    ``symbols`` (uint8/uint16, >= 1) of the kept weights; a view over rows ``[r0, r1)`` and a
    reshape of the trailing axes keep these arrays and only change how they are read.
    """

    def __init__(self, codebook: np.ndarray, row_ptr: np.ndarray, cols: np.ndarray, symbols: np.ndarray,
                 shape: Tuple[int, ...]):
        self.codebook = np.concatenate([np.zeros(1, np.float32), np.asarray(codebook, np.float32)])
        self.row_ptr, self.cols, self.symbols = row_ptr, cols, symbols
        self.shape = tuple(int(d) for d in shape)

    ndim = property(lambda self: len(self.shape))
    dtype = property(lambda self: np.dtype(np.float32))
    nbytes = property(lambda self: self.row_ptr.nbytes + self.cols.nbytes + self.symbols.nbytes
                      + self.codebook.nbytes)

    @classmethod
    def from_csc(cls, codebook, col_ptr, rows_idx, symbols, shape) -> "SparseWeight":
        """Build from the file's CSC (column pointers, row indices, symbols) over the 2-D view."""
        rows = int(shape[0])
        col_of = np.repeat(np.arange(len(col_ptr) - 1, dtype=np.int32), np.diff(col_ptr))
        order = np.argsort(rows_idx, kind="stable")     # CSC is column-major: regroup by row
        row_ptr = np.zeros(rows + 1, np.int64)
        np.cumsum(np.bincount(rows_idx, minlength=rows), out=row_ptr[1:])
        return cls(codebook, row_ptr, col_of[order], np.asarray(symbols)[order], shape)

    def _view(self, row_ptr, shape) -> "SparseWeight":
        view = SparseWeight.__new__(SparseWeight)
        view.codebook, view.cols, view.symbols = self.codebook, self.cols, self.symbols
        view.row_ptr, view.shape = row_ptr, tuple(shape)
        return view

    def __getitem__(self, key) -> "SparseWeight":
        if isinstance(key, (int, np.integer)):
            return self._row_matrix(int(key) % self.shape[0])
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise IndexError("sparse weights support contiguous row slices only")
        return self._view(self.row_ptr[start:stop + 1], (stop - start,) + self.shape[1:])

    def _row_matrix(self, r: int) -> "SparseWeight":
        """Row ``r`` of a weight with 3+ axes (one direction of an LSTM's ``W``) as its own CSR."""
        if self.ndim < 3:
            raise IndexError("integer indexing of a sparse weight needs 3 or more axes")
        inner = self.shape[1:]
        width = int(np.prod(inner[1:], dtype=np.int64))
        lo, hi = int(self.row_ptr[r]), int(self.row_ptr[r + 1])
        new_rows, new_cols = np.divmod(self.cols[lo:hi], width)   # columns ascend, so rows do too
        row_ptr = np.zeros(inner[0] + 1, np.int64)
        np.cumsum(np.bincount(new_rows, minlength=inner[0]), out=row_ptr[1:])
        return SparseWeight(self.codebook[1:], row_ptr, new_cols.astype(np.int32),
                            self.symbols[lo:hi], inner)

    def reshape(self, *shape) -> "SparseWeight":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        total = int(np.prod(self.shape[1:], dtype=np.int64))
        if shape[0] != self.shape[0] or (len(shape) == 2 and shape[1] not in (-1, total)):
            raise ValueError(f"a sparse weight reshapes only its trailing axes, not {self.shape} -> {shape}")
        return self._view(self.row_ptr, (self.shape[0], total))

    def _entry_blocks(self):
        """``(rows, cols, values)`` of the kept weights, ENTRY_BLOCK entries at a time (bounded temporaries)."""
        lo, hi = int(self.row_ptr[0]), int(self.row_ptr[-1])
        for a in range(lo, hi, ENTRY_BLOCK):
            b = min(hi, a + ENTRY_BLOCK)
            rows = np.searchsorted(self.row_ptr, np.arange(a, b), side="right") - 1
            yield rows, self.cols[a:b], self.codebook[self.symbols[a:b]]

    def _tile(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` expanded to dense float32 (a small temporary)."""
        width = int(np.prod(self.shape[1:], dtype=np.int64))
        tile = np.zeros((b - a, width), np.float32)
        lo, hi = int(self.row_ptr[a]), int(self.row_ptr[b])
        rows = np.repeat(np.arange(b - a), np.diff(self.row_ptr[a:b + 1]))
        tile[rows, self.cols[lo:hi]] = self.codebook[self.symbols[lo:hi]]
        return tile

    def dense(self) -> np.ndarray:
        return self._tile(0, self.shape[0]).reshape(self.shape)

    def take_rows(self, idx: np.ndarray) -> np.ndarray:
        flat = np.asarray(idx).ravel()
        out = np.stack([self._tile(int(i), int(i) + 1)[0] for i in flat]) if flat.size else \
            np.zeros((0,) + self.shape[1:], np.float32)
        return out.reshape(np.shape(idx) + self.shape[1:])

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T`` for a 2-D weight ``[N, K]``."""
        n = self.shape[0]
        compiled = _compiled(x, self.shape[1])
        if compiled is not None:
            return _run(compiled.csr_matmul_t, x, n, self.row_ptr, self.cols, self.symbols, self.codebook)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= SMALL_BATCH:
            out = np.zeros((x2.shape[0], n))
            for rows, cols, vals in self._entry_blocks():
                for i, xi in enumerate(x2):
                    out[i] += np.bincount(rows, weights=xi[cols] * vals, minlength=n)
        else:
            out = np.empty((x2.shape[0], n), np.float32)
            step = _tile_rows(n, self.shape[1])
            for a in range(0, n, step):
                b = min(n, a + step)
                out[:, a:b] = x2 @ self._tile(a, b).T
        return out.astype(np.result_type(x.dtype, np.float32), copy=False).reshape(lead + (n,))

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W`` for a 2-D weight ``[K, N]``."""
        k, n = self.shape
        compiled = _compiled(x, k)
        if compiled is not None:
            return _run(compiled.csr_matmul, x, n, self.row_ptr, self.cols, self.symbols, self.codebook)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= SMALL_BATCH:
            out = np.zeros((x2.shape[0], n))
            for rows, cols, vals in self._entry_blocks():
                for i, xi in enumerate(x2):
                    out[i] += np.bincount(cols, weights=xi[rows] * vals, minlength=n)
        else:
            out = np.zeros((x2.shape[0], n), np.float32)
            step = _tile_rows(k, n)
            for a in range(0, k, step):
                b = min(k, a + step)
                out += x2[:, a:b] @ self._tile(a, b)
        return out.astype(np.result_type(x.dtype, np.float32), copy=False).reshape(lead + (n,))
