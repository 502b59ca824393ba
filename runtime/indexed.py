"""Weights kept as codebook indices, computed with directly (index mode).

The forms, chosen per tensor by ``dcrt.memory.sparse_layout`` so that ``dcrt size`` and the runtime
agree on the resident bytes:

- :class:`IndexedWeight`: a codebook and one uint8/uint16 index per weight (pruned weights index a
  zero centroid).
- :class:`SparseWeight`: CSR over the 2-D view (rows = ``shape[0]``): row pointers, column
  positions (uint16, or int32 past 65536 columns: ``dcrt.memory.position_dtype``) and the codebook
  symbols of the kept weights.
- :class:`ByInput`: a :class:`SparseWeight` of the transpose, for a weight that only
  ``Gemm(transB=1)`` reads (``dcrt.memory.by_input``): its batch-1 product skips zero activations.
- :class:`PerDirection`: a :class:`SparseWeight` per direction of a recurrent ``W`` or ``R``
  (``dcrt.memory.per_direction``), which the operators take one direction at a time; for an ``R``
  whose rows take a product table, a :class:`TableRows` per direction (``dcrt.memory.SLOTS``).
- :class:`TableRows`: the kept weights by rows as slots of a product table of every
  ``centroid * activation`` (also the second grouping of a :class:`ByInput` weight).

How a product is computed:

- few rows of ``x`` (up to :data:`COMPILED_BATCH` for CSR; for dense indices, which touch every
  weight, :data:`INDEX_BATCH` for ``x @ W.T`` and one for ``x @ W``): with numba, a compiled kernel
  reads the indices and the codebook directly (float32 accumulation; see
  ``runtime/_numba_index.py``); its numpy twin is the tile path below (dense indices) or
  ``np.bincount`` over blocks of kept weights (CSR).
- many rows (an im2col matrix, a large batch): tile by tile. A block of rows of W is expanded from
  the codebook into a small float32 buffer (numba ``expand``/``csr_expand``, or numpy ``take``),
  multiplied with BLAS, and reused for the next tile. A tile holds at most :data:`TILE_BYTES` and a
  quarter of the weight, or :data:`TILE_FLOOR` bytes when that is more: a dense float32 copy of a
  weight larger than 64 KB never exists, and a smaller one only for the duration of one product.

Both support what the operators may do with a weight (see ``runtime/kernels.py``): ``shape``,
``ndim``, ``dtype``, leading-axis indexing, ``reshape(rows, -1)``, ``matmul``, ``matmul_t``,
``lmatmul`` (``W @ x``, used by convolutions), ``take_rows``, ``dense``; and for the convolution
kernels ``tile_rows``/``expand_rows`` (one tile, without the full expansion ``dense`` would make).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from dcrt import sparse
from dcrt.errors import FormatError
from dcrt.memory import PRODUCT_TABLE_ENTRIES, position_dtype, table_stride

from . import numba_kernels
from .kernels import finish, product_t, wrap_indices
from .numba_kernels import kernels, launch

TILE_BYTES = 4 << 20        # largest tile expanded from the codebook at once (float32 bytes)
TILE_FRACTION = 4           # ... and at most a quarter of the weight: never a dense copy of it,
TILE_FLOOR = 64 << 10       # ... or this many bytes when that is more (see _tile_rows)
SMALL_BATCH = 8             # numpy twin of a sparse product: up to this many rows, entry by entry
COMPILED_BATCH = 64         # up to this many rows of x, the CSR kernels beat expanded tiles + BLAS (one
#                             core, 10 % kept, 64 rows: 784x300 by input 109 against 183 us, 512x64 by rows 34
#                             against 39; at 128 rows 512x64 by rows 74 against 58)
INDEX_BATCH = 16            # ... and the dense-index dot products (one 16-lane register of rows of x:
#                             1000x512, 8 rows 0.33 ms against 0.55 by tiles + BLAS; at 32 rows, two
#                             registers, tiles + BLAS win, 0.94 against 1.46); the dense-index scatter
#                             (x @ W) takes one row only: at 2 rows tiles + BLAS beat it (1000x2048: 1.6
#                             vs 1.9 ms; at 4 rows 2.2x)
FEW_COLUMNS = 4             # ``W @ x`` of up to this many columns by the dot products (see lmatmul)
ENTRY_BLOCK = 16384         # ... in blocks of this many kept weights
TAKE_BLOCK = 1 << 16        # numpy expansion: at most this many indices turned into intp at a time
#: dtype of a CSR form's pointers: offsets of kept weights, and a stored tensor has at most 2^31 - 1
#: elements (``dcrt.format.reader``), so 4 bytes always do (one per input column of a Gemm weight
#: kept by input: VGG-style FC6, 25,088 of them).
POINTER = np.dtype(np.int32)


def _tile_rows(rows: int, row_elems: int) -> int:
    """Rows per expanded tile: within TILE_BYTES and a 1/TILE_FRACTION share of the weight, or within
    TILE_FLOOR. A small layer's weight (at most 64 KB of float32: 16 of the 20 convs of ResNet-18 at
    width 8, 31 of MobileNetV2's 52) is then one tile, expanded once per call instead of in four
    tiles each paying a launch and a BLAS call (ResNet-18 width 8 at 32 px, index mode: 0.78 -> 0.59
    ms; MobileNetV2 12.3 -> 11.0 ms); the convolution runners then take it as an array for the call
    (``kernels._as_array``).

    An element costs 4 bytes when numba expands the tile. With numpy alone ``take`` also turns the
    indices into intp (8 bytes) as it builds the tile, 1/16 of them a call (``_take_step``; at least
    16 K indices, 128 KB, so a small tile's intp can outweigh it): 5 bytes. Until session 17 numpy
    counted 12 (all of a tile's indices as intp at once), and the 2.4 times as many tiles cost more
    than that memory was worth (without numba, one core, index mode: the LSTM classifier 2.45 ->
    1.85 ms, ResNet-18 107-110 -> 85-90 ms).
    """
    return max(1, _tile_budget(rows, row_elems) // max(1, (4 if kernels() is not None else 5) * row_elems))


def _tile_budget(rows: int, row_elems: int) -> int:
    """The float32 bytes a product may expand of a weight ``[rows, row_elems]`` at once: at most
    TILE_BYTES and a 1/TILE_FRACTION share of it, or TILE_FLOOR when that is more."""
    return min(TILE_BYTES, max(4 * rows * row_elems // TILE_FRACTION, TILE_FLOOR))


def _take_step(elements: int) -> int:
    """Indices numpy's ``take`` turns into intp (8 bytes each) at once when it expands a tile of
    ``elements``: 1/16 of them (1/8 of the tile's float32 bytes), at least 16,384 (128 KB of intp,
    so that a small tile is not cut into calls that cost more than they copy: without numba, the
    LSTM classifier, whose recurrent weight's tiles of ~5,400 indices went 1,024 at a time, 4.9 ->
    2.8 ms; ResNet-18 128 -> 121 ms), at most TAKE_BLOCK."""
    return min(TAKE_BLOCK, max(1 << 14, elements // 16))


def _rows(x: np.ndarray) -> int:
    return x.shape[0] if x.ndim == 2 else math.prod(x.shape[:-1])


_NO_BIAS = np.zeros(0, np.float32)


ProductRunner = Callable[[np.ndarray, Any, Optional[np.ndarray]], np.ndarray]


def _launcher(kern, name: str, rows: int, n: int, work_per_row: int,
              clamp: Optional[Tuple[float, float]]) -> ProductRunner:
    """``run(x2, w, bias)``: ``out [rows, n]`` from kernel ``name(x2, *w.arrays, bias, lo, hi, clamp,
    out)`` for a C-contiguous float32 ``x2 [rows, K]``, the epilogue in the form the kernels take
    (bias empty for none, bounds as Python floats so every call has one signature). Written for
    batch 1, where the Python around a small layer's kernel is a third of its time."""
    lo, hi = (-np.inf, np.inf) if clamp is None else (float(clamp[0]), float(clamp[1]))
    clamped, work = clamp is not None, rows * work_per_row
    if work < numba_kernels.PARALLEL_WORK:    # the serial kernel, called without launch()'s choice: ~0.17 us less
        serial = getattr(kern, name)

        def run(x2: np.ndarray, w: Any, bias: Optional[np.ndarray]) -> np.ndarray:
            out = np.empty((rows, n), np.float32)
            serial(x2, *w.arrays, _NO_BIAS if bias is None else bias, lo, hi, clamped, out)
            return out
        return run

    def run_either(x2: np.ndarray, w: Any, bias: Optional[np.ndarray]) -> np.ndarray:
        out = np.empty((rows, n), np.float32)
        launch(kern, name, work, x2, *w.arrays, _NO_BIAS if bias is None else bias, lo, hi, clamped, out)
        return out
    return run_either


def _compiled_product(kern, name: str, x: np.ndarray, n: int, work_per_row: int, weight: Any,
                      bias: Optional[np.ndarray], clamp: Optional[Tuple[float, float]]) -> np.ndarray:
    """``out [..., n]`` from kernel ``name`` over the rows of ``x`` (see :func:`_launcher`): a 2-D
    ``x`` is used as it is and the result not reshaped."""
    x2 = x if x.ndim == 2 and x.flags.c_contiguous else np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = _launcher(kern, name, x2.shape[0], n, work_per_row, clamp)(x2, weight, bias)
    return out if x.ndim == 2 else out.reshape(x.shape[:-1] + (n,))


def _runner(kern, name: str, x: np.ndarray, n: int, work_per_row: int,
            clamp: Optional[Tuple[float, float]]) -> Optional[ProductRunner]:
    """What ``product_runner`` returns: a launcher for a 2-D float32 ``x`` (made C-contiguous when it
    is not), or None without numba or for another ``x``. ``work_per_row`` (which only picks the
    serial or parallel kernel) is this weight's; a later weight of the same shape differs at most in
    its kept count."""
    if kern is None or x.ndim != 2 or x.dtype != np.float32:
        return None
    launch_ = _launcher(kern, name, x.shape[0], n, work_per_row, clamp)

    def run(x: np.ndarray, w: Any, bias: Optional[np.ndarray]) -> np.ndarray:
        return launch_(x if x.flags.c_contiguous else np.ascontiguousarray(x), w, bias)
    return run


def _tiled_lmatmul(weight, x: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    """``W @ x`` (``x`` ``[K, P]`` or ``[B, K, P]``) by expanded tiles of W.

    Tiles of rows give each output row once but make BLAS read (pack) all of ``x`` for every tile;
    tiles of columns read each row of ``x`` once but add the partial products up. The cheaper one
    (floats moved, roughly) is taken: columns for a weight that is wider than tall (a projection),
    rows otherwise.
    """
    m, k = weight.shape
    p = x.shape[-1]
    if out is None:
        out = np.empty(x.shape[:-2] + (m, p), np.result_type(x.dtype, np.float32))
    step = weight.tile_rows()
    tiles = -(-m // step)
    if tiles > 1 and hasattr(weight, "expand_cols"):
        kstep = weight.tile_cols()
        ktiles = -(-k // kstep)
        if k * p + 2 * (ktiles - 1) * m * p < tiles * k * p:
            buf = np.empty((m, min(kstep, k)), np.float32)
            for a in range(0, k, kstep):
                b = min(k, a + kstep)
                part = np.matmul(weight.expand_cols(a, b, buf[:, :b - a]), x[..., a:b, :],
                                 out=out if a == 0 else None)
                if a:
                    out += part
            return out
    buf = np.empty((min(step, m), k), np.float32)
    for a in range(0, m, step):
        b = min(m, a + step)
        np.matmul(weight.expand_rows(a, b, buf[:b - a]), x, out=out[..., a:b, :])
    return out


def _lmatmul_by_rows(weight, x: np.ndarray, out: Optional[np.ndarray], compiled: bool) -> np.ndarray:
    """``W @ x`` as ``(x.T @ W.T).T`` through ``weight.matmul_t``'s compiled kernels, the few columns of
    a 2-D float32 ``x`` as rows; otherwise (numba off, a batch of ``x``, another dtype) by tiles."""
    if not (compiled and x.ndim == 2 and x.dtype == np.float32 and kernels() is not None):
        return _tiled_lmatmul(weight, x, out)
    y = weight.matmul_t(np.ascontiguousarray(x.T))
    if out is None:
        return np.ascontiguousarray(y.T)
    out[...] = y.T
    return out


def _tiled_matmul_t(weight, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` by expanded tiles of W's rows (output columns)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    out = np.empty((x2.shape[0], n), np.result_type(x.dtype, np.float32))
    step = weight.tile_rows()
    buf = np.empty((min(step, n), k), np.float32)
    for a in range(0, n, step):
        b = min(n, a + step)
        product_t(x2, weight.expand_rows(a, b, buf[:b - a]), out=out[:, a:b])
    return out.reshape(x.shape[:-1] + (n,))


def _tiled_matmul(weight, x: np.ndarray) -> np.ndarray:
    """``x @ W`` by expanded tiles of W's rows (the contraction), accumulated."""
    k, n = weight.shape
    x2 = x.reshape(-1, k)
    out = np.zeros((x2.shape[0], n), np.result_type(x.dtype, np.float32))
    step = weight.tile_rows()
    buf = np.empty((min(step, k), n), np.float32)
    for a in range(0, k, step):
        b = min(k, a + step)
        out += x2[:, a:b] @ weight.expand_rows(a, b, buf[:b - a])
    return out.reshape(x.shape[:-1] + (n,))


class IndexedWeight:
    """``codebook[indices]`` without expanding it: ``indices`` has the weight's shape."""

    fused_epilogue = True       # matmul/matmul_t take bias= and clamp= (see kernels.matmul_t)

    def __init__(self, codebook: np.ndarray, indices: np.ndarray):
        # the codebook an own (writable) copy, as SparseWeight's: a read-only view of the file would be
        # another type to numba, i.e. a second compiled specialisation of each kernel to load (~0.5 MB).
        # The indices are as decoded: a --coder none file's are a read-only view of the memory map
        # (resident file pages, counted by Session.resident_bytes()["now"] as held)
        self.codebook = np.array(codebook, dtype=np.float32)
        self.indices = indices
        self.arrays = (indices, self.codebook)     # what the compiled kernels read (an attribute: ~0.1 us)

    shape = property(lambda self: self.indices.shape)
    ndim = property(lambda self: self.indices.ndim)
    dtype = property(lambda self: np.dtype(np.float32))
    nbytes = property(lambda self: self.indices.nbytes + self.codebook.nbytes)

    def __getitem__(self, key) -> "IndexedWeight":
        return self._view(self.indices[key])

    def reshape(self, *shape) -> "IndexedWeight":
        return self._view(self.indices.reshape(*shape))

    def _view(self, indices: np.ndarray) -> "IndexedWeight":
        """A weight of ``indices`` sharing this one's codebook (an LSTM's ``w[0]`` each call: copying
        the codebook made it 0.8 us)."""
        view = IndexedWeight.__new__(IndexedWeight)
        view.codebook, view.indices, view.arrays = self.codebook, indices, (indices, self.codebook)
        return view

    def dense(self) -> np.ndarray:
        return self.codebook[self.indices]

    def take_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as float32, as ``kernels.take_rows``. With numba one pass wraps, checks and
        expands them (an LSTM classifier's 16-token lookup: 6.2 -> 2.8 us)."""
        k, idx, indices = kernels(), np.asarray(idx), self.indices
        rows, tail = indices.shape[0], indices.shape[1:]
        if k is None or not indices.flags.c_contiguous:
            return self.codebook[np.take(indices, wrap_indices(idx, rows), axis=0)]
        flat = idx.astype(np.int64, copy=False).reshape(-1)
        out = np.empty((flat.size, math.prod(tail)), np.float32)
        bad = k.take_index_rows(indices if len(tail) == 1 else indices.reshape(rows, out.shape[1]), self.codebook, flat,
                                out)
        if bad >= 0:
            wrap_indices(flat[bad:bad + 1], rows)     # raises the IndexError every path raises
        return out.reshape(idx.shape + tail)

    # -- tiles ---------------------------------------------------------------------------------
    def tile_rows(self) -> int:
        """Rows of the 2-D view expanded at once by the tiled products."""
        rows = self.indices.shape[0]
        return _tile_rows(rows, self.indices.size // max(1, rows))

    def expand_rows(self, a: int, b: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``[a, b)`` of the 2-D view as float32 (into ``out`` when given): one tile."""
        idx = self.indices[a:b].reshape(b - a, -1)
        if out is None:
            out = np.empty(idx.shape, np.float32)
        k = kernels()
        if k is not None and idx.flags.c_contiguous:
            launch(k, "expand", idx.size, idx, self.codebook, out)
            return out
        flat_idx, flat_out = idx.reshape(-1), out.reshape(-1)
        step = _take_step(flat_idx.size)
        # mode="wrap": no bounds check per index (a third faster: 65,536 uint8 in 64 -> 43 us); the
        # indices were checked against the codebook when decoded (``TensorRecord.index_form``)
        for s in range(0, flat_idx.size, step):
            np.take(self.codebook, flat_idx[s:s + step], out=flat_out[s:s + step], mode="wrap")
        return out

    def tile_cols(self) -> int:
        """Columns of a 2-D weight expanded at once (the same budget as :meth:`tile_rows`)."""
        rows, cols = self.indices.shape
        return max(1, _tile_rows(rows, cols) * cols // rows)

    def expand_cols(self, a: int, b: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Columns ``[a, b)`` of a 2-D weight as float32 (into ``out`` when given): one tile."""
        idx = self.indices[:, a:b]
        if out is None:
            out = np.empty(idx.shape, np.float32)
        k = kernels()
        if k is not None:
            launch(k, "expand", idx.size, idx, self.codebook, out)
            return out
        step = max(1, _take_step(idx.size) // max(1, b - a))
        for r in range(0, idx.shape[0], step):     # mode="wrap": as in expand_rows
            np.take(self.codebook, idx[r:r + step], out=out[r:r + step], mode="wrap")
        return out

    # -- products ------------------------------------------------------------------------------
    def matmul_t(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
                 clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W.T`` for a 2-D weight ``[N, K]``; ``+ bias`` (float32 ``[N]``) and ``clamp`` fused."""
        n, k = self.indices.shape
        if _rows(x) <= INDEX_BATCH and x.dtype == np.float32 and self.indices.flags.c_contiguous:
            kern = kernels()
            if kern is not None:
                return _compiled_product(kern, "index_matmul_t", x, n, n * k, self, bias, clamp)
        return finish(_tiled_matmul_t(self, x), bias, clamp)

    def matmul(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
               clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W`` for a 2-D weight ``[K, N]``; ``+ bias`` (float32 ``[N]``) and ``clamp`` fused."""
        k, n = self.indices.shape
        if _rows(x) == 1 and x.dtype == np.float32 and self.indices.flags.c_contiguous:
            kern = kernels()
            if kern is not None:
                return _compiled_product(kern, "index_matmul", x, n, n * k, self, bias, clamp)
        return finish(_tiled_matmul(self, x), bias, clamp)

    def product_runner(self, x: np.ndarray, transposed: bool,
                       clamp: Optional[Tuple[float, float]]) -> Optional[ProductRunner]:
        """:meth:`matmul_t` (``transposed``) or :meth:`matmul` prepared for inputs shaped as ``x`` where
        they call a compiled kernel (see ``kernels.product_runner``), else None."""
        if self.indices.ndim != 2 or x.shape[0] > (INDEX_BATCH if transposed else 1) \
                or not self.indices.flags.c_contiguous:
            return None
        n = self.indices.shape[0 if transposed else 1]
        name = "index_matmul_t" if transposed else "index_matmul"
        return _runner(kernels(), name, x, n, self.indices.size, clamp)

    def lmatmul(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``W @ x`` for a 2-D weight ``[M, K]`` and ``x`` ``[K, P]`` or ``[B, K, P]`` (into ``out``).

        With numba, few columns (a convolution on a map of 1-4 positions) take :meth:`matmul_t`'s
        compiled dot products: 1-2 columns always; 3-4 when the weight is at most four floor-sized
        tiles (256 KB as float32), whose launches and BLAS calls then cost more than the dot
        products' extra reads (64x576, 4 columns: 27 -> 22 us; 256x2304: 267 against 280).
        """
        p, small = x.shape[-1], 4 * self.indices.size <= 4 * TILE_FLOOR   # float32 bytes: four tiles at most
        if p <= 2 or (p <= FEW_COLUMNS and small):
            return _lmatmul_by_rows(self, x, out, self.indices.flags.c_contiguous)
        return _tiled_lmatmul(self, x, out)


class SparseWeight:
    """A pruned weight in CSR form over ``shape[0]`` rows: ``value = codebook[symbol - 1]``.

    ``row_ptr`` [rows + 1] (int32: :data:`POINTER`), ``cols`` uint16/int32 (column in the flattened
    trailing axes) and ``symbols`` (uint8/uint16, >= 1) of the kept weights; a view over rows
    ``[r0, r1)`` and a reshape of the trailing axes keep these arrays and only change how they are read.
    """

    fused_epilogue = True       # matmul/matmul_t take bias= and clamp= (see kernels.matmul_t)

    def __init__(self, codebook: np.ndarray, row_ptr: np.ndarray, cols: np.ndarray, symbols: np.ndarray,
                 shape: Tuple[int, ...]):
        self.codebook = np.concatenate([np.zeros(1, np.float32), np.asarray(codebook, np.float32)])
        self.row_ptr, self.cols, self.symbols = row_ptr, cols, symbols
        self.shape = tuple(int(d) for d in shape)
        self.arrays = (row_ptr, cols, symbols, self.codebook)     # what the compiled kernels read

    ndim = property(lambda self: len(self.shape))
    dtype = property(lambda self: np.dtype(np.float32))
    nbytes = property(lambda self: self.row_ptr.nbytes + self.cols.nbytes + self.symbols.nbytes
                      + self.codebook.nbytes + sliced_bytes(self))

    def entries(self, a: int, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """The columns and symbols of the kept weights ``[a, b)`` (views)."""
        return self.cols[a:b], self.symbols[a:b]

    def sliced(self) -> "SlicedRows":
        """The same kept weights as :class:`SlicedRows` (for checks; the kernels take
        :meth:`held_slices`)."""
        return SlicedRows(self.row_ptr, self.entries, self.shape, self.codebook, self.symbols.dtype)

    def held_slices(self, split: int = 0) -> Any:
        """The LSTM and GRU kernels' batch-1 form of a held weight: see :func:`_held_slices`."""
        return _held_slices(self, split)

    @classmethod
    def from_entries(cls, codebook, symbols, relative, counts, shape) -> "SparseWeight":
        """Build from the file's CSC entries (symbols, relative indices, column counts: see
        :mod:`dcrt.sparse`) over the 2-D view.

        With numba, ``entries_to_csr`` places the kept weights straight into the final arrays (no
        temporary as long as the entries); its numpy twin decodes the CSC (``sparse.decode_csc``)
        and regroups it by row with a stable argsort (a larger peak while opening).
        Raises FormatError when a relative index runs past the rows.
        """
        rows, width = sparse.matrix_shape(shape)
        k = kernels()
        if k is not None:
            symbols = np.asarray(symbols)
            kept = int(np.count_nonzero(symbols))
            row_ptr = np.zeros(rows + 1, POINTER)
            cols, syms = np.empty(kept, position_dtype(width)), np.empty(kept, symbols.dtype)
            if not k.entries_to_csr(symbols, np.asarray(relative), np.asarray(counts), row_ptr, cols, syms):
                raise FormatError(f"sparse relative indices run past the matrix's {rows} rows")
            return cls(codebook, row_ptr, cols, syms, shape)
        col_ptr, rows_idx, syms = sparse.decode_csc(symbols, relative, counts, rows)
        row_ptr = np.zeros(rows + 1, POINTER)
        np.cumsum(np.bincount(rows_idx, minlength=rows), out=row_ptr[1:])
        col_of = np.repeat(np.arange(len(col_ptr) - 1, dtype=position_dtype(width)),
                           np.diff(col_ptr).astype(np.intp, copy=False))
        order = np.argsort(rows_idx, kind="stable")
        return cls(codebook, row_ptr, col_of[order], syms[order], shape)

    @classmethod
    def from_indices(cls, codebook: np.ndarray, indices: np.ndarray) -> "SparseWeight":
        """Build from dense codebook indices whose last codebook entry is the pruned weights' zero
        centroid (a pruned QUANTIZED tensor: ``dcrt.memory.pruned``): the other indices are kept, as
        symbols one higher. Rows are gathered TAKE_BLOCK elements at a time (bounded temporaries)."""
        rows, width = sparse.matrix_shape(indices.shape)
        flat, zero = indices.reshape(rows, width), len(codebook) - 1
        step = max(1, TAKE_BLOCK // max(1, width))
        row_ptr = np.zeros(rows + 1, POINTER)
        cols, syms = [], []
        for a in range(0, rows, step):
            block = flat[a:a + step]
            r, c = np.nonzero(block != zero)
            np.cumsum(np.bincount(r, minlength=block.shape[0]), out=row_ptr[a + 1:a + 1 + block.shape[0]])
            row_ptr[a + 1:a + 1 + block.shape[0]] += row_ptr[a]
            cols.append(c.astype(position_dtype(width)))
            syms.append((block[r, c] + 1).astype(indices.dtype))
        empty = np.zeros(0, indices.dtype)
        return cls(codebook[:-1], row_ptr, np.concatenate(cols) if cols else empty.astype(position_dtype(width)),
                   np.concatenate(syms) if syms else empty, indices.shape)

    @classmethod
    def transpose_from_entries(cls, codebook, symbols, relative, counts, shape) -> "SparseWeight":
        """The CSR form of the 2-D view's transpose (``[columns, rows]``) from the file's CSC entries,
        which are already grouped by column: only the relative indices are summed into rows (numba
        ``entries_to_csc``; numpy ``sparse.decode_csc``). Raises FormatError as :meth:`from_entries`."""
        rows, width = sparse.matrix_shape(shape)
        k = kernels()
        if k is None:
            col_ptr, rows_idx, syms = sparse.decode_csc(symbols, relative, counts, rows)
            return cls(codebook, col_ptr.astype(POINTER), rows_idx.astype(position_dtype(rows)), syms, (width, rows))
        symbols = np.asarray(symbols)
        kept = int(np.count_nonzero(symbols))
        col_ptr = np.empty(width + 1, POINTER)
        rows_idx, syms = np.empty(kept, position_dtype(rows)), np.empty(kept, symbols.dtype)
        if not k.entries_to_csc(symbols, np.asarray(relative), np.asarray(counts), rows, col_ptr, rows_idx, syms):
            raise FormatError(f"sparse relative indices run past the matrix's {rows} rows")
        return cls(codebook, col_ptr, rows_idx, syms, (width, rows))

    def _view(self, row_ptr, shape) -> "SparseWeight":
        view = SparseWeight.__new__(SparseWeight)
        view.codebook, view.cols, view.symbols = self.codebook, self.cols, self.symbols
        view.row_ptr, view.shape = row_ptr, tuple(shape)
        view.arrays = (row_ptr, self.cols, self.symbols, self.codebook)
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
        width = math.prod(inner[1:])
        lo, hi = int(self.row_ptr[r]), int(self.row_ptr[r + 1])
        new_rows, new_cols = np.divmod(self.cols[lo:hi], width)   # columns ascend, so rows do too
        row_ptr = np.zeros(inner[0] + 1, POINTER)
        np.cumsum(np.bincount(new_rows.astype(np.intp, copy=False), minlength=inner[0]), out=row_ptr[1:])
        return SparseWeight(self.codebook[1:], row_ptr, new_cols.astype(position_dtype(width)),
                            self.symbols[lo:hi], inner)

    def reshape(self, *shape) -> "SparseWeight":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        total = math.prod(self.shape[1:])
        if shape[0] != self.shape[0] or (len(shape) == 2 and shape[1] not in (-1, total)):
            raise ValueError(f"a sparse weight reshapes only its trailing axes, not {self.shape} -> {shape}")
        return self._view(self.row_ptr, (self.shape[0], total))

    @property
    def nnz(self) -> int:
        """Kept weights in this view."""
        nnz = self.__dict__.get("_nnz")
        if nnz is None:
            nnz = self._nnz = int(self.row_ptr[-1] - self.row_ptr[0])
        return nnz

    def _row_blocks(self):
        """``(r0, r1, a, b)``: rows ``[r0, r1)`` and their kept weights ``[a, b)``, whole rows of about
        ENTRY_BLOCK kept weights at a time (bounded temporaries; a longer row is a block of its own).
        One search per block, not one per kept weight (without numba, index mode, one core:
        LeNet-300-100 0.39 -> 0.17 ms, VGG-16 FC6-8 97 -> 26 ms, as fast as dense mode)."""
        ptr, rows, r0 = self.row_ptr, self.shape[0], 0
        while r0 < rows:
            a = int(ptr[r0])
            r1 = min(rows, max(r0 + 1, int(np.searchsorted(ptr, a + ENTRY_BLOCK, side="right")) - 1))
            yield r0, r1, a, int(ptr[r1])
            r0 = r1

    # -- tiles ---------------------------------------------------------------------------------
    def tile_rows(self) -> int:
        """Rows of the 2-D view expanded at once by the tiled products."""
        return _tile_rows(self.shape[0], math.prod(self.shape[1:]))

    def expand_rows(self, a: int, b: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``[a, b)`` expanded to dense float32 (into ``out`` when given): one tile."""
        width = math.prod(self.shape[1:])
        if out is None:
            out = np.empty((b - a, width), np.float32)
        k = kernels()
        if k is not None:
            launch(k, "csr_expand", (b - a) * width, self.row_ptr[a:b + 1], self.cols, self.symbols,
                   self.codebook, out)
            return out
        out[...] = 0
        lo, hi = int(self.row_ptr[a]), int(self.row_ptr[b])
        rows = np.repeat(np.arange(b - a), np.diff(self.row_ptr[a:b + 1]).astype(np.intp, copy=False))
        out[rows, self.cols[lo:hi]] = self.codebook[self.symbols[lo:hi]]
        return out

    def dense(self) -> np.ndarray:
        return self.expand_rows(0, self.shape[0]).reshape(self.shape)

    def take_rows(self, idx: np.ndarray) -> np.ndarray:
        flat = wrap_indices(idx, self.shape[0]).ravel()
        out = np.stack([self.expand_rows(int(i), int(i) + 1)[0] for i in flat]) if flat.size else \
            np.zeros((0,) + self.shape[1:], np.float32)
        return out.reshape(np.shape(idx) + self.shape[1:])

    # -- products ------------------------------------------------------------------------------
    def matmul_t(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
                 clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W.T`` for a 2-D weight ``[N, K]``; ``+ bias`` (float32 ``[N]``) and ``clamp`` fused."""
        n = self.shape[0]
        rows = _rows(x)
        if rows <= COMPILED_BATCH and x.dtype == np.float32:
            kern = kernels()
            if kern is not None:
                return _compiled_product(kern, "csr_matmul_t", x, n, self.nnz, self, bias, clamp)
        if rows > SMALL_BATCH:
            return finish(_tiled_matmul_t(self, x), bias, clamp)
        # each output's sum over its row's kept weights: np.add.reduceat over the rows that have some
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        out = np.zeros((x2.shape[0], n), np.result_type(x.dtype, np.float32))
        for r0, r1, a, b in self._row_blocks():
            if a < b:
                products = x2[:, self.cols[a:b]] * self.codebook[self.symbols[a:b]]
                starts, ends = self.row_ptr[r0:r1], self.row_ptr[r0 + 1:r1 + 1]
                some = ends > starts
                out[:, r0:r1][:, some] = np.add.reduceat(products, starts[some] - a, axis=1)
        return finish(out.reshape(lead + (n,)), bias, clamp)

    def matmul(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
               clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W`` for a 2-D weight ``[K, N]``; ``+ bias`` (float32 ``[N]``) and ``clamp`` fused."""
        k, n = self.shape
        rows = _rows(x)
        if rows <= COMPILED_BATCH and x.dtype == np.float32:
            kern = kernels()
            if kern is not None:
                return _compiled_product(kern, "csr_matmul", x, n, self.nnz, self, bias, clamp)
        if rows > SMALL_BATCH:
            return finish(_tiled_matmul(self, x), bias, clamp)
        # each input's activation times its row's kept weights, added into their columns (bincount)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        out = np.zeros((x2.shape[0], n))
        for r0, r1, a, b in self._row_blocks():
            if a < b:
                counts = np.diff(self.row_ptr[r0:r1 + 1]).astype(np.intp, copy=False)
                cols, vals = self.cols[a:b], self.codebook[self.symbols[a:b]]
                for i, xi in enumerate(x2):
                    out[i] += np.bincount(cols, weights=np.repeat(xi[r0:r1], counts) * vals, minlength=n)
        out = out.astype(np.result_type(x.dtype, np.float32), copy=False).reshape(lead + (n,))
        return finish(out, bias, clamp)

    def product_runner(self, x: np.ndarray, transposed: bool,
                       clamp: Optional[Tuple[float, float]]) -> Optional[ProductRunner]:
        """As ``IndexedWeight.product_runner``, for the CSR kernels."""
        if x.shape[0] > COMPILED_BATCH or self.ndim != 2:
            return None
        n = self.shape[0 if transposed else 1]
        return _runner(kernels(), "csr_matmul_t" if transposed else "csr_matmul", x, n, self.nnz, clamp)

    def lmatmul(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``W @ x`` for a 2-D weight ``[M, K]`` and ``x`` ``[K, P]`` or ``[B, K, P]`` (into ``out``).

        With numba, up to 4 columns take :meth:`matmul_t`'s compiled dot products, which read only
        the kept weights (one core, 30 % kept, 4 columns: 64x576 25 -> 15 us, 256x2304 244 -> 178,
        1280x320 168 -> 120; at 16 columns the tiles win unless 10 % or fewer are kept).
        """
        if x.shape[-1] <= FEW_COLUMNS:
            return _lmatmul_by_rows(self, x, out, True)
        return _tiled_lmatmul(self, x, out)


def hold(value: Any) -> Any:
    """Mark ``value`` as held across runs (a session's index-mode weights): the recurrent matrices in
    it (:class:`PerDirection`) then build their batch-1 slices at the first run that asks for them
    (:func:`_held_slices`). Stream mode's weights, built for one node, are not held: building the
    slices (0.3-1 ms) would cost more than one run saves. Returns ``value``."""
    for m in getattr(value, "matrices", ()):
        if isinstance(m, (SparseWeight, TableRows)):
            m._held = True
    return value


def _held_slices(weight: Any, split: int = 0) -> Any:
    """A held ``weight``'s :class:`SlicedRows`, built at the first request and kept beside its own
    form (counted in its ``nbytes``); with ``split``, those of its rows ``[0, split)`` and ``[split,
    rows)``, a pair (the GRU's R with the reset before it, whose last rows multiply ``r * h``). None
    for a weight not held, and for one whose slots' centroids, which the kernel holds as float32 for
    a call, would be more than a batch-1 product may build for one (:func:`call_bound`: an expanded
    tile, or a product table, ``PRODUCT_TABLE_ENTRIES`` floats, 256 KB, which the table-slot kernels
    build every step: the default plan's 60 %-pruned 512x128 R needs 128 KB). Every run of a held
    weight so takes the same kernel, and gives the same results to the bit."""
    key = f"_sliced{split or ''}"
    rows = weight.__dict__.get(key)
    if rows is None and weight.__dict__.get("_held"):
        rows = (weight[:split].sliced(), weight[split:].sliced()) if split else weight.sliced()
        if 4 * sum(part.symbols.size for part in (rows if split else (rows,))) > call_bound(*weight.shape):
            rows = False        # never built again
        weight.__dict__[key] = rows
    return rows or None


def sliced_bytes(weight: Any) -> int:
    """Bytes of the slices a held ``weight`` has built (:func:`_held_slices`; 0 for none)."""
    return sum(sum(part.nbytes for part in (rows if isinstance(rows, tuple) else (rows,)))
               for key, rows in weight.__dict__.items() if key.startswith("_sliced") and rows)


def step_product(weight: Any) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """``h -> h @ weight.T`` at batch 1 for the steps of one recurrent call without numba (the
    kernels' numpy twin), or None (``kernels.matmul_t`` then, each step). A pruned weight (CSR or
    table slots) has its kept weights looked up as float32 once for the call, as the compiled sliced
    kernels do, and a step is one gather, multiply and ``np.add.reduceat``; dense indices are
    expanded once and a step is one BLAS product. Only within the bound of :func:`_held_slices`'
    temporary (the LSTM classifier's R, 90 % pruned, without numba: 67 -> ~20 us a step)."""
    rows, width = weight.shape if getattr(weight, "ndim", 0) == 2 else (0, 0)
    if isinstance(weight, IndexedWeight) and rows and 4 * weight.indices.size <= call_bound(rows, width):
        dense_t = np.ascontiguousarray(weight.codebook[weight.indices].T, np.float32)
        return lambda h: h @ dense_t
    if not (isinstance(weight, (SparseWeight, TableRows)) and rows):
        return None
    a, b = int(weight.row_ptr[0]), int(weight.row_ptr[-1])
    if 4 * (b - a) > call_bound(rows, width):
        return None
    cols, symbols = weight.entries(a, b)
    some = np.flatnonzero(np.diff(weight.row_ptr))      # reduceat would give an empty row a value
    kept, starts = weight.codebook[symbols], weight.row_ptr[some] - a
    cols = cols.astype(np.intp)        # (numpy's gather would convert them each step)

    def product(h: np.ndarray) -> np.ndarray:
        out = np.zeros((1, rows), np.result_type(h.dtype, np.float32))
        if some.size:
            out[0, some] = np.add.reduceat(h.reshape(-1).take(cols) * kept, starts)
        return out.reshape(h.shape[:-1] + (rows,))
    return product


def call_bound(rows: int, width: int) -> int:
    """The float32 bytes a recurrent call may hold of its weight (at batch 1 its slices' centroids, for
    a batch the weight expanded for the register tiles): an expanded tile's, or a product table's
    (``PRODUCT_TABLE_ENTRIES`` floats) when that is more."""
    return max(_tile_budget(rows, width), 4 * PRODUCT_TABLE_ENTRIES)


class SlicedRows:
    """The kept weights of a 2-D CSR or table-slot weight in slices of ``ROWS`` rows and blocks of
    ``BLOCK`` columns (a blocked sliced ELLPACK): slot ``e`` of a slice's block holds one kept weight
    of that block for each of the slice's rows side by side (``cols``: the column within the block,
    ``symbols``; ``[slots * ROWS]``), so that one vector step serves 16 rows, where a CSR row is a
    chain of scalar multiply-adds (at 90 % pruning, 512 rows of ~13 in the LSTM classifier's R). A
    block's activations and a zero fill two 16-lane registers, from which 16 activations are one
    permute (``_simd.sliced_dot``; a gather from memory cost twice the whole product on the machine
    measured). ``slot_ptr`` [slices * blocks + 1]: the slots of slice ``s``'s block ``b`` at ``s *
    blocks + b``; ``order`` [slices * ROWS]: the weight row of each lane, then ``rows, rows + 1, ...``
    for the lanes past the rows (where a kernel's sums have room for them). A row with fewer kept
    weights in a block than its slice's longest is padded with symbol 0 (the zero centroid) at column
    ``BLOCK``, the zero after the block's activations. Rows are sorted by their counts in the blocks, so that
    alike rows share slices: that R's 6,554 kept weights take 339 slots of 32 (465 in the rows' own
    order, 391 sorted block by block only)."""

    #: Rows of a slice: two 16-lane registers, whose two chains of multiply-adds overlap (with one,
    #: each multiply-add waited for the one before: 16-row slices, 692 slots of that R, 0.71-0.72 us
    #: a product against 0.66-0.68 for its 391 slots of 32 rows, one process)
    ROWS = 32
    #: Columns of a block; with the zero the padding reads, a block's table is 32 floats.
    BLOCK = 31

    #: Kept weights laid out at a time while building: the default plan's LSTM R (26,000) peaks at 0.30 MB
    #: with its 68 KB of slices, where all at once took 2.2 MB (4.7 ms, once)
    BUILD_ENTRIES = 2048

    def __init__(self, row_ptr: np.ndarray, entries: Callable[[int, int], Tuple[np.ndarray, np.ndarray]],
                 shape: Tuple[int, int], codebook: np.ndarray, symbols: Any):
        """From a CSR's ``row_ptr`` and ``entries(a, b)``: the columns and symbols of its kept weights
        ``[a, b)`` (views, or temporaries as small as the range)."""
        lanes, block, (rows, width) = self.ROWS, self.BLOCK, shape
        blocks, slices = -(-width // block), -(-rows // lanes)
        nnz = int(row_ptr[-1] - row_ptr[0])
        step = max(1, self.BUILD_ENTRIES * rows // max(1, nnz))
        counts = np.zeros((rows, blocks), np.intp)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            cols = entries(int(row_ptr[r0]), int(row_ptr[r1]))[0]
            local = np.repeat(np.arange(r1 - r0), np.diff(row_ptr[r0:r1 + 1]).astype(np.intp))
            group = local * blocks + cols // block
            counts[r0:r1] = np.bincount(group, minlength=(r1 - r0) * blocks).reshape(-1, blocks)
        # by the row's most kept in a block (what a slot count is), then by its counts block by block
        by_counts = np.lexsort(tuple(counts.T[::-1]) + (counts.max(axis=1, initial=0),))
        self.order = np.concatenate([by_counts, np.arange(rows, slices * lanes)]).astype(POINTER)
        lane = np.empty(rows, np.intp)
        lane[by_counts] = np.arange(rows)
        padded = np.zeros((slices * lanes, blocks), np.intp)
        padded[:rows] = counts[by_counts]
        self.slot_ptr = np.zeros(slices * blocks + 1, POINTER)
        np.cumsum(padded.reshape(slices, lanes, blocks).max(axis=1), out=self.slot_ptr[1:])
        size = int(self.slot_ptr[-1]) * lanes
        self.cols = np.full(size, block, np.uint8)
        self.symbols = np.zeros(size, symbols)
        for r0 in range(0, rows, step):         # each kept weight to its slot, a block of rows at a time
            r1 = min(rows, r0 + step)
            cols, syms = entries(int(row_ptr[r0]), int(row_ptr[r1]))
            group = np.repeat(np.arange(r0, r1), np.diff(row_ptr[r0:r1 + 1]).astype(np.intp)) * blocks + cols // block
            by_group = np.argsort(group, kind="stable")
            group = group[by_group]
            starts = np.cumsum(counts[r0:r1].ravel()) - counts[r0:r1].ravel()
            nth = np.arange(group.size) - starts[group - r0 * blocks]   # its place among its row's in the block
            r, b = group // blocks, group % blocks
            at = (self.slot_ptr[lane[r] // lanes * blocks + b] + nth) * lanes + lane[r] % lanes
            self.cols[at] = cols[by_group] - b * block
            self.symbols[at] = syms[by_group]
        self.codebook, self.shape = codebook, shape
        self.arrays = (self.slot_ptr, self.cols, self.symbols, self.order, self.codebook)

    nbytes = property(lambda self: sum(a.nbytes for a in self.arrays[:-1]))

    def dense(self) -> np.ndarray:
        """The weight as float32 (for checks)."""
        lanes, at = self.ROWS, np.flatnonzero(self.symbols)
        group = np.searchsorted(self.slot_ptr, at // lanes, side="right") - 1       # slice * blocks + block
        blocks = -(-self.shape[1] // self.BLOCK)
        dense = np.zeros(self.shape, np.float32)
        dense[self.order[group // blocks * lanes + at % lanes], group % blocks * self.BLOCK + self.cols[at]] = \
            self.codebook[self.symbols[at]]
        return dense


class TableRows:
    """A pruned 2-D weight ``[N, K]`` held by rows as a batch-1 product table reads them: ``row_ptr``
    and, per kept weight, its slot ``column * stride + symbol``, where ``x[column] * codebook[symbol]``
    sits in the table (``_numba_index.product_table``; ``stride``: the codebook's entries rounded up
    to a power of two, ``dcrt.memory.table_stride``). uint16: the table has at most
    ``PRODUCT_TABLE_ENTRIES`` entries. Two uses: the rows of a :class:`ByInput` weight
    (``dcrt.memory.BOTH``), and on its own, one per direction, a recurrent ``R``
    (``dcrt.memory.SLOTS``; the LSTM and GRU kernels read it). A slot also names its column and
    symbol (a shift and a mask), so nothing else is kept."""

    fused_epilogue = True

    def __init__(self, rows: SparseWeight):
        width, self.stride = rows.shape[1], table_stride(rows.codebook.size)
        if rows.ndim != 2 or self.stride * width > PRODUCT_TABLE_ENTRIES:
            raise FormatError(f"a {rows.codebook.size}-entry codebook over {width} columns makes a product "
                              f"table over {PRODUCT_TABLE_ENTRIES} entries; the tensor's stats disagree with it")
        self.row_ptr = rows.row_ptr
        self.slots = (rows.cols.astype(np.uint32) * self.stride + rows.symbols).astype(np.uint16)
        self.codebook = rows.codebook       # with the pruned weights' zero first, as SparseWeight's
        self.shape = rows.shape
        self.arrays = (self.row_ptr, self.slots, self.codebook)     # what the compiled kernels read

    ndim = 2
    dtype = property(lambda self: np.dtype(np.float32))
    nbytes = property(lambda self: self.row_ptr.nbytes + self.slots.nbytes + self.codebook.nbytes + sliced_bytes(self))
    nnz = property(lambda self: int(self.row_ptr[-1] - self.row_ptr[0]))

    symbol_dtype = property(lambda self: np.dtype(np.uint8 if self.codebook.size <= 256 else np.uint16))

    def entries(self, a: int, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """The columns and symbols of the kept weights ``[a, b)``, read off their slots (a shift and a
        mask: the stride is a power of two; temporaries as small as the range)."""
        slots = self.slots[a:b]
        return slots >> (self.stride.bit_length() - 1), slots & (self.stride - 1)

    def sliced(self) -> "SlicedRows":
        """The same kept weights as :class:`SlicedRows`, their columns and symbols read off the slots a
        block of rows at a time (for checks; the kernels take :meth:`held_slices`)."""
        return SlicedRows(self.row_ptr, self.entries, self.shape, self.codebook, self.symbol_dtype)

    def held_slices(self, split: int = 0) -> Any:
        """The LSTM and GRU kernels' batch-1 form of a held weight with AVX-512 (:func:`_held_slices`):
        the default plan's LSTM classifier, 16 steps, ``lstm_slots`` 261 us, the slices 68."""
        return _held_slices(self, split)

    def __getitem__(self, key) -> "TableRows":
        start, stop, step = key.indices(self.shape[0]) if isinstance(key, slice) else (0, 0, 0)
        if step != 1:
            raise IndexError("a weight held as table slots supports contiguous row slices only")
        view = TableRows.__new__(TableRows)
        view.slots, view.codebook, view.stride = self.slots, self.codebook, self.stride
        view.row_ptr, view.shape = self.row_ptr[start:stop + 1], (stop - start, self.shape[1])
        view.arrays = (view.row_ptr, self.slots, self.codebook)
        return view

    def sparse(self) -> SparseWeight:
        """The same weight as CSR (columns and symbols taken from the slots: temporaries)."""
        lo, hi = int(self.row_ptr[0]), int(self.row_ptr[-1])
        cols, symbols = self.entries(lo, hi)
        return SparseWeight(self.codebook[1:], self.row_ptr - lo, cols.astype(position_dtype(self.shape[1])),
                            symbols.astype(self.symbol_dtype), self.shape)

    def dense(self) -> np.ndarray:
        return self.sparse().dense()

    def product(self, x: np.ndarray) -> np.ndarray:
        """numpy twin of the compiled table products: ``x @ W.T`` for ``x`` ``[B, K]``, a table of every
        ``x[b, column] * codebook[symbol]`` per row of ``x``, whose slots are summed by rows of W."""
        out = np.zeros((x.shape[0], self.shape[0]), np.result_type(x.dtype, np.float32))
        some = np.flatnonzero(np.diff(self.row_ptr))     # reduceat would give an empty row a value
        if some.size:
            lo = self.row_ptr[0]
            slots, starts = self.slots[lo:self.row_ptr[-1]], self.row_ptr[some] - lo
            book = np.zeros(self.stride, out.dtype)
            book[:self.codebook.size] = self.codebook
            for b in range(x.shape[0]):
                out[b, some] = np.add.reduceat((x[b][:, None] * book).ravel()[slots], starts)
        return out

    # -- tiles (the numpy twin at more than one row) --------------------------------------------
    def tile_rows(self) -> int:
        return _tile_rows(self.shape[0], self.shape[1])

    def expand_rows(self, a: int, b: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``[a, b)`` as float32 (into ``out`` when given): one tile."""
        width = self.shape[1]
        out = np.empty((b - a, width), np.float32) if out is None else out
        tile = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)
        tile[...] = 0
        ptr = self.row_ptr[a:b + 1]
        cols, symbols = self.entries(ptr[0], ptr[-1])
        # each kept weight's flat position: its row's start plus its column (a shift: 512x128, 133 -> 72 us)
        flat = np.repeat(np.arange(0, (b - a) * width, width, dtype=POINTER), np.diff(ptr))
        flat += cols
        tile.reshape(-1)[flat] = self.codebook[symbols]
        if tile is not out:
            out[...] = tile
        return out

    def matmul_t(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
                 clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W.T``; ``+ bias`` and ``clamp`` fused: with numba ``slot_matmul_t``; else one row by
        :meth:`product`, more by expanded tiles and BLAS (numpy's tables cost more: the LSTM
        classifier at batch 8 without numba, 2.6 ms by tiles, 10.9 by tables of 8 rows)."""
        kern = kernels()
        if kern is not None and x.dtype == np.float32:      # one thread: there is no parallel form
            return _compiled_product(kern, "slot_matmul_t", x, self.shape[0], 0, self, bias, clamp)
        if _rows(x) == 1:
            return finish(self.product(x.reshape(1, -1)).reshape(x.shape[:-1] + (self.shape[0],)), bias, clamp)
        return finish(_tiled_matmul_t(self, x), bias, clamp)

    def matmul(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
               clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W`` (by the CSR form: a recurrent weight is not read so)."""
        return self.sparse().matmul(x, bias, clamp)


class ByInput:
    """A sparse 2-D weight ``W`` ``[N, K]`` held as the CSR form of ``W.T`` (its kept weights grouped
    by input), for the weights of ``Gemm(transB=1)`` (``dcrt.memory.by_input``); with ``rows``, also
    by rows, as a product table reads them (:class:`TableRows`, ``dcrt.memory.BOTH``).

    ``x @ W.T`` is then ``x @ inner``: the compiled kernel scatters the kept weights of each
    non-zero activation and skips the zero ones, as the EIE accelerator does. After a ReLU about
    half of the activations are zero; on dense activations it costs more than dot products by rows
    (one core, CPU time: LeNet-300-100's fc1 13.2 us by rows, 14.5 by inputs, 8.2 after a ReLU;
    VGG-16's FC6 3.2, 2.3 and 1.7 ms: the outputs it adds into stay in L1). With numba, a weight
    that also has its ``rows`` computes one row of activations with fewer than a quarter zeros by
    rows, from a product table, in the same compiled call that counts them
    (``_numba_index.csr_matmul_t_dual``; fc1 on the AVX-512 host of session 18: 6.6 us against 10.9
    by input).
    """

    fused_epilogue = True

    def __init__(self, inner: SparseWeight, rows: Optional[TableRows] = None):
        self.inner = inner
        self.shape = inner.shape[::-1]      # attributes: every Gemm call reads them (~0.1 us each)
        self.arrays = inner.arrays
        self.rows = rows
        # what csr_matmul_t_dual reads: the rows for the table, then the CSR of W.T with the codebook
        self.both = None if rows is None else SimpleNamespace(arrays=(rows.row_ptr, rows.slots) + inner.arrays)

    ndim = 2
    dtype = property(lambda self: np.dtype(np.float32))
    # the rows share the inner weight's codebook
    nbytes = property(lambda self: self.inner.nbytes + (0 if self.rows is None else
                                                        self.rows.nbytes - self.rows.codebook.nbytes))
    nnz = property(lambda self: self.inner.nnz)

    def _dual(self, x: np.ndarray) -> bool:
        """Whether ``x @ W.T`` goes through ``csr_matmul_t_dual``: the rows are here, numba is, ``x``
        is one row of float32 and the product small enough for the serial kernel."""
        return (self.rows is not None and _rows(x) == 1 and x.dtype == np.float32 and kernels() is not None
                and self.nnz < numba_kernels.PARALLEL_WORK)

    def matmul_t(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
                 clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W.T``: the inner weight's ``x @ inner`` (scatter by input), or by rows (see above;
        without numba the same choice, in numpy)."""
        if self._dual(x):
            return _compiled_product(kernels(), "csr_matmul_t_dual", x, self.shape[0], self.nnz, self.both,
                                     bias, clamp)
        if self.rows is not None and x.shape == (1, self.shape[1]) and x.dtype == np.float32 \
                and 4 * (x.size - np.count_nonzero(x)) < x.size:        # the kernel's test
            return finish(self.rows.product(x), bias, clamp)
        return self.inner.matmul(x, bias, clamp)

    def matmul(self, x: np.ndarray, bias: Optional[np.ndarray] = None,
               clamp: Optional[Tuple[float, float]] = None) -> np.ndarray:
        """``x @ W``: the inner weight's ``x @ inner.T``."""
        return self.inner.matmul_t(x, bias, clamp)

    def product_runner(self, x: np.ndarray, transposed: bool,
                       clamp: Optional[Tuple[float, float]]) -> Optional[ProductRunner]:
        """As :meth:`SparseWeight.product_runner`, with the product turned around; with ``rows``, one
        that takes ``x @ W.T`` by rows or by input for each ``x`` as :meth:`matmul_t` does."""
        by_input = self.inner.product_runner(x, not transposed, clamp)
        if by_input is None or not transposed or not self._dual(x):
            return by_input
        either = _runner(kernels(), "csr_matmul_t_dual", x, self.shape[0], self.nnz, clamp)

        def run(x: np.ndarray, w: "ByInput", bias: Optional[np.ndarray]) -> np.ndarray:
            return either(x, w.both, bias)
        return run

    def dense(self) -> np.ndarray:
        return np.ascontiguousarray(self.inner.dense().T)


class PerDirection:
    """A pruned recurrent weight ``[directions, gates * hidden, inputs]`` held as one CSR matrix per
    direction (``dcrt.memory.per_direction``): ``w[d]`` is a :class:`SparseWeight` (or for an
    ``R`` as ``dcrt.memory.SLOTS`` says, :class:`TableRows`), taken for free. The matrices share one
    codebook."""

    def __init__(self, matrices: Sequence[Any]):
        self.matrices = tuple(matrices)
        for m in self.matrices[1:]:
            m.codebook = self.matrices[0].codebook
            m.arrays = m.arrays[:-1] + (m.codebook,)
        self.shape = (len(self.matrices),) + self.matrices[0].shape

    ndim = 3
    dtype = property(lambda self: np.dtype(np.float32))
    nbytes = property(lambda self: sum(m.nbytes - m.codebook.nbytes for m in self.matrices)
                      + self.matrices[0].codebook.nbytes)

    @classmethod
    def split(cls, weight: SparseWeight) -> "PerDirection":
        """The matrices of a CSR over the directions (``SparseWeight`` of a 3-D tensor)."""
        return cls([weight[d] for d in range(weight.shape[0])])

    def __getitem__(self, key) -> Any:
        if not isinstance(key, (int, np.integer)):
            raise IndexError("a recurrent weight is taken one direction at a time")
        return self.matrices[key]

    def dense(self) -> np.ndarray:
        return np.stack([m.dense() for m in self.matrices])
