"""numba kernels for index-mode products; import only through ``runtime.numba_kernels.kernels()``.

The products and expansions exist twice: ``name`` (one thread, no launch cost: what small products
use) and ``name_par`` (rows spread over numba's threads, for products big enough to pay for a
parallel launch, see ``numba_kernels.launch``). Both run the same inlined per-row helper, so they
agree bit for bit (``csr_matmul_par`` sums per-thread partial results: to float32 rounding).
``entries_to_csr`` builds the CSR form when a sparse weight is loaded (``entries_to_csc`` the CSR form
of its transpose, for ``indexed.ByInput``); the ``*_bins`` kernels are the paper's sums per centroid,
benchmarked against the dot products (``benchmarks/run.py``).

How the products are computed (float32 accumulation):

- one row of ``x`` (batch 1, the case the paper's speed-up is about): one dot product per output;
  over CSR entries with four independent partial sums, over dense indices four rows at a time
  (:func:`index_dot4`: scalar loads, one activation load serving four weights); for a Gemm weight
  also kept as product-table slots, from a table of every ``centroid * activation`` when few
  activations are zero (:func:`csr_matmul_t_dual`);
- several rows: ``x`` is transposed first, so each kept weight is read once and multiplies the
  ``B`` activations it meets as one contiguous (vectorised) run.
- ``x @ W`` from CSR rows of ``W`` ``[K, N]`` (a MatMul weight, or ``ByInput``'s transpose): the
  other way round, each non-zero activation scatters its row's kept weights into the outputs, and
  zero activations (half of them after a ReLU) cost nothing, as in the EIE accelerator.

Offsets are cast to unsigned before indexing: numba then skips its negative-index wraparound check
(about twice as fast here). The numpy twins are the methods of ``runtime/indexed.py`` (with
``DCRT_NO_NUMBA=1``); ``tests/test_indexed.py`` and ``tests/test_kernels.py`` check that they agree.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import njit
from ._simd import LANE_GROUPS, LANES, csr_lanes, index_lanes, index_tile

_U = np.uint64
_COLUMN_BLOCK = 256     # output columns one task of the scatter kernels owns
# Tasks a parallel kernel cuts its rows into (numba hands them out to its threads). A constant, not
# numba.get_num_threads(): reading the thread count makes a kernel uncachable.
_PARTS = 16


@njit(inline="always")
def _split(count, parts, t):  # pragma: no cover - compiled
    """Bounds of part ``t`` of ``parts`` equal parts of ``range(count)``."""
    return t * count // parts, (t + 1) * count // parts


@njit(inline="always")
def _finish(v, bias, n, lo, hi, clamp):  # pragma: no cover - compiled
    """The epilogue of output column ``n``: ``+ bias[n]`` (``bias`` may be empty), then the clamp
    to [lo, hi] (float32 bounds, as numpy's ``np.maximum(y, np.float32(lo))``; NaN stays NaN)."""
    if bias.size:
        v = v + bias[n]
    if clamp:
        lo32 = np.float32(lo)
        hi32 = np.float32(hi)
        v = lo32 if v < lo32 else v
        v = hi32 if v > hi32 else v
    return v


@njit(inline="always")
def _finish_rows(out, bias, lo, hi, clamp, n0, n1):  # pragma: no cover - compiled
    if bias.size or clamp:
        for b in range(out.shape[0]):
            for n in range(n0, n1):
                out[b, n] = _finish(out[b, n], bias, n, lo, hi, clamp)


# -- building the CSR form ------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def entries_to_csr(symbols, relative, counts, row_ptr, cols_out, symbols_out):  # pragma: no cover - compiled
    """The CSR form of a sparse weight straight from the file's CSC entries (fillers included).

    Two passes over the entries, no temporary: the first counts the kept weights of each row into
    ``row_ptr`` (zeros, ``rows + 1`` long), the second places each one's column (``cols_out``,
    uint16 or int32) and symbol; columns stay ascending within each row. Returns False, with the outputs
    unfinished, when a relative index runs past the last row (a damaged file).
    """
    rows = row_ptr.size - 1
    e = 0
    for c in range(counts.size):
        r = -1
        for _ in range(counts[c]):
            r += np.int64(relative[e]) + 1
            if r >= rows:
                return False
            if symbols[e] != 0:
                row_ptr[r + 1] += 1
            e += 1
    for r in range(rows):
        row_ptr[r + 1] += row_ptr[r]
    fill = row_ptr[:-1].copy()
    e = 0
    for c in range(counts.size):
        r = -1
        for _ in range(counts[c]):
            r += np.int64(relative[e]) + 1
            if symbols[e] != 0:
                p = fill[r]
                cols_out[p] = c
                symbols_out[p] = symbols[e]
                fill[r] = p + 1
            e += 1
    return True


@njit(cache=True, nogil=True)
def entries_to_csc(symbols, relative, counts, rows, col_ptr, rows_out, symbols_out):  # pragma: no cover
    """The CSR form of the transpose of a sparse weight with ``rows`` rows, i.e. its kept weights
    grouped by column, which is the file's own order: one pass summing the relative indices into
    rows and dropping the fillers. ``col_ptr`` is ``columns + 1`` long. Returns False when a
    relative index runs past the last row (a damaged file)."""
    e = 0
    p = 0
    col_ptr[0] = 0
    for c in range(counts.size):
        r = -1
        for _ in range(counts[c]):
            r += np.int64(relative[e]) + 1
            if r >= rows:
                return False
            if symbols[e] != 0:
                rows_out[p] = r
                symbols_out[p] = symbols[e]
                p += 1
            e += 1
        col_ptr[c + 1] = p
    return True


# -- expanding tiles ------------------------------------------------------------------------------

@njit(inline="always")
def _expand_rows(indices, codebook, out, r0, r1):  # pragma: no cover - compiled
    for r in range(r0, r1):
        for k in range(indices.shape[1]):
            out[r, k] = codebook[indices[r, k]]


@njit(cache=True, nogil=True)
def expand(indices, codebook, out):  # pragma: no cover - compiled
    """``out[r, k] = codebook[indices[r, k]]``: one tile of an indexed weight, float32."""
    _expand_rows(indices, codebook, out, 0, indices.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def expand_par(indices, codebook, out):  # pragma: no cover - compiled
    parts = _PARTS
    for t in prange(parts):
        r0, r1 = _split(indices.shape[0], parts, t)
        _expand_rows(indices, codebook, out, r0, r1)


@njit(inline="always")
def _csr_expand_rows(row_ptr, cols, symbols, codebook, out, r0, r1):  # pragma: no cover - compiled
    for r in range(r0, r1):
        for k in range(out.shape[1]):
            out[r, k] = 0.0
        for e in range(row_ptr[r], row_ptr[r + 1]):
            out[r, _U(cols[e])] = codebook[symbols[e]]


@njit(cache=True, nogil=True)
def csr_expand(row_ptr, cols, symbols, codebook, out):  # pragma: no cover - compiled
    """Rows of a CSR weight expanded into ``out`` (zeros where pruned)."""
    _csr_expand_rows(row_ptr, cols, symbols, codebook, out, 0, out.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def csr_expand_par(row_ptr, cols, symbols, codebook, out):  # pragma: no cover - compiled
    parts = _PARTS
    for t in prange(parts):
        r0, r1 = _split(out.shape[0], parts, t)
        _csr_expand_rows(row_ptr, cols, symbols, codebook, out, r0, r1)


# -- an embedding lookup ---------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def take_index_rows(indices, codebook, idx, out):  # pragma: no cover - compiled
    """``out[j] = codebook[indices[idx[j]]]`` for the rows of ``indices`` [rows, width] (Gather along
    axis 0), a negative ``idx[j]`` counting from the end. Returns the position in ``idx`` of the first
    index out of range (nothing written from there on), or -1."""
    rows = indices.shape[0]
    for j in range(idx.size):
        r = idx[j]
        if r < 0:
            r += rows
        if r < 0 or r >= rows:
            return j
        src = indices[r]
        dst = out[j]
        for c in range(src.size):
            dst[c] = codebook[src[c]]
    return -1


# -- x @ W.T with W [N, K] as dense indices: one dot product per output -------------------------

@njit(inline="always")
def index_dot4(xv, indices, codebook, n):  # pragma: no cover - compiled
    """The dot products of ``xv`` with rows ``n .. n+3`` of ``codebook[indices]``.

    Compile its callers without reassociation: LLVM would vectorise each sum with gather
    instructions, slower on x86 than these scalar loads (512x128 uint8 indices: 23 -> 15 us here).
    The LSTM kernel (``_numba_rnn``) shares it.
    """
    r0 = indices[n]
    r1 = indices[n + 1]
    r2 = indices[n + 2]
    r3 = indices[n + 3]
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for k in range(indices.shape[1]):
        u = _U(k)
        x = xv[u]
        a0 += x * codebook[r0[u]]
        a1 += x * codebook[r1[u]]
        a2 += x * codebook[r2[u]]
        a3 += x * codebook[r3[u]]
    return a0, a1, a2, a3


# Several rows of x, a row of W expanded once into a float32 buffer (one row), then its dot products
# with every row of x vectorised: the recurrent kernels' rows (``_numba_rnn``). Accumulating the batch
# per weight instead (the batch as the inner loop, of unknown length) was not vectorised: 512x64 8-bit
# indices, 2 rows of x, 112 us, against 27 by tiles + BLAS and 16 this way.
@njit(fastmath={"reassoc", "nsz"}, error_model="numpy")
def row_dots(wrow, x, out, n):  # pragma: no cover - compiled
    """``out[b, n] = wrow . x[b]`` for every row ``b`` of ``x`` (reassociated: vectorised, so the sums
    agree with a dot product to float32 rounding, not bit for bit). The LSTM kernel shares this."""
    for b in range(x.shape[0]):
        xb = x[b]
        a = np.float32(0.0)
        for k in range(wrow.size):
            a += wrow[k] * xb[k]
        out[b, n] = a


@njit(inline="always")
def _index_dot(x, xt, indices, codebook, bias, lo, hi, clamp, out, n0, n1):  # pragma: no cover - compiled
    if x.shape[0] == 1:
        inner, xv = indices.shape[1], x[0]
        n = n0
        while n + 3 < n1:
            a0, a1, a2, a3 = index_dot4(xv, indices, codebook, n)
            out[0, n] = _finish(a0, bias, n, lo, hi, clamp)
            out[0, n + 1] = _finish(a1, bias, n + 1, lo, hi, clamp)
            out[0, n + 2] = _finish(a2, bias, n + 2, lo, hi, clamp)
            out[0, n + 3] = _finish(a3, bias, n + 3, lo, hi, clamp)
            n += 4
        for n in range(n, n1):
            row = indices[n]
            acc = np.float32(0.0)
            for k in range(inner):
                acc += xv[k] * codebook[row[k]]
            out[0, n] = _finish(acc, bias, n, lo, hi, clamp)
        return
    # the rows of x side by side in 16 lanes, each weight's centroid read once for all of them
    # (index_lane_sums; each row of W expanded and dotted with every row of x took 2-3x as long at 4-16
    # rows, 512x64: 8 rows 50 -> 18 us), the sums then moved into out as _csr_dot does
    width = xt.shape[1]
    sums = np.empty((n1 - n0) * width, np.float32)
    index_lane_sums(xt, indices, codebook, n0, n1, sums)
    _lanes_out(sums, width, out, n0, n1)
    _finish_rows(out, bias, lo, hi, clamp, n0, n1)


@njit(cache=True, nogil=True)
def index_matmul_t(x, indices, codebook, bias, lo, hi, clamp, out):  # pragma: no cover - compiled
    """``out[b, n] = sum_k x[b, k] * codebook[indices[n, k]]`` (weight ``[N, K]``), then the epilogue:
    ``+ bias[n]`` (``bias`` may be empty) and, with ``clamp``, clamped to [lo, hi]."""
    _index_dot(x, _csr_operand(x), indices, codebook, bias, lo, hi, clamp, out, 0, indices.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def index_matmul_t_par(x, indices, codebook, bias, lo, hi, clamp, out):  # pragma: no cover - compiled
    parts = _PARTS
    xt = _csr_operand(x)
    for t in prange(parts):
        n0, n1 = _split(indices.shape[0], parts, t)
        _index_dot(x, xt, indices, codebook, bias, lo, hi, clamp, out, n0, n1)


# The paper's other way to compute from a codebook: add up the activations that share a centroid,
# then multiply each sum by its centroid once (one multiply per centroid instead of per weight).
# Benchmarked against the dot products above (benchmarks/run.py); not the default.
@njit(cache=True, nogil=True)
def index_matmul_t_bins(x, indices, codebook, out):  # pragma: no cover - compiled
    """As :func:`index_matmul_t`, by per-centroid sums of the activations."""
    bins = np.zeros(codebook.size, np.float32)
    for n in range(indices.shape[0]):
        row = indices[n]
        for b in range(x.shape[0]):
            xv = x[b]
            for c in range(bins.size):
                bins[c] = 0.0
            for k in range(indices.shape[1]):
                bins[row[k]] += xv[k]
            acc = np.float32(0.0)
            for c in range(bins.size):
                acc += bins[c] * codebook[c]
            out[b, n] = acc


# -- x @ W with W [K, N] as dense indices: scatter the rows of W, skipping zero activations -------

@njit(inline="always")
def _index_scatter_block(x, indices, codebook, out, n0, n1):  # pragma: no cover - compiled
    for b in range(x.shape[0]):
        dst = out[b]
        for n in range(n0, n1):
            dst[n] = 0.0
        for k in range(indices.shape[0]):
            xv = x[b, k]
            if xv != 0.0:
                row = indices[k]
                for n in range(n0, n1):
                    dst[n] += xv * codebook[row[n]]


@njit(cache=True, nogil=True)
def index_matmul(x, indices, codebook, bias, lo, hi, clamp, out):  # pragma: no cover - compiled
    """``out[b, n] = sum_k x[b, k] * codebook[indices[k, n]]`` (weight ``[K, N]``), then the epilogue."""
    _index_scatter_block(x, indices, codebook, out, 0, indices.shape[1])
    _finish_rows(out, bias, lo, hi, clamp, 0, indices.shape[1])


@njit(cache=True, nogil=True, parallel=True)
def index_matmul_par(x, indices, codebook, bias, lo, hi, clamp, out):  # pragma: no cover - compiled
    cols = indices.shape[1]
    for blk in prange((cols + _COLUMN_BLOCK - 1) // _COLUMN_BLOCK):
        n0 = blk * _COLUMN_BLOCK
        n1 = min(cols, n0 + _COLUMN_BLOCK)
        _index_scatter_block(x, indices, codebook, out, n0, n1)
        _finish_rows(out, bias, lo, hi, clamp, n0, n1)


# -- CSR weights ------------------------------------------------------------------------------------

@njit(inline="always")
def csr_row_dot(xv, cols, symbols, codebook, e, end):  # pragma: no cover - compiled
    """``sum xv[cols[k]] * codebook[symbols[k]]`` over the entries ``[e, end)`` of one CSR row.

    Four accumulators hide the gather latency; the LSTM kernel (``_numba_rnn``) shares this.
    """
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    while e + 3 < end:
        a0 += xv[_U(cols[_U(e)])] * codebook[symbols[_U(e)]]
        a1 += xv[_U(cols[_U(e + 1)])] * codebook[symbols[_U(e + 1)]]
        a2 += xv[_U(cols[_U(e + 2)])] * codebook[symbols[_U(e + 2)]]
        a3 += xv[_U(cols[_U(e + 3)])] * codebook[symbols[_U(e + 3)]]
        e += 4
    while e < end:
        a0 += xv[_U(cols[_U(e)])] * codebook[symbols[_U(e)]]
        e += 1
    return (a0 + a1) + (a2 + a3)


# Several rows of x: the activations transposed and padded to a multiple of LANES columns, so that
# each kept weight is read once and multiplies up to 64 rows of x in 16-lane registers
# (``_simd.csr_lanes``: a broadcast centroid and one vector multiply-add per register, the sums never
# stored until the row's end). One core, a slow spell, against 4 register sums a pass (up to 8 rows)
# and arrays of sums (more): 512x64 at 10 %, 2 rows 17-20 -> 15-16 us, 16 rows 36-42 -> 21-22, 64
# rows 94-101 -> 82-85; 512x128 at 40 %, 16 rows 194-218 -> 55-60 (benchmarks/RESULTS.md, session
# 30). The LSTM kernel's batch path shares this.
@njit(inline="always")
def padded_t(x):  # pragma: no cover - compiled
    """``x.T`` as ``[K, B]`` with its columns padded with zeros to a multiple of LANES."""
    batch, k = x.shape
    xt = np.zeros((k, (batch + LANES - 1) // LANES * LANES), np.float32)
    for j in range(k):      # written row by row (by columns of x: 64x784 131 -> 32 us)
        for b in range(batch):
            xt[j, b] = x[b, j]
    return xt


@njit(inline="always")
def lane_sums(xt, row_ptr, cols, symbols, codebook, n0, n1, sums):  # pragma: no cover - compiled
    """``sums[(n - n0) * W + b] = sum over row n's kept weights of codebook[symbol] * xt[col, b]`` for
    rows ``[n0, n1)`` and ``b < W`` (``xt`` from :func:`padded_t`, ``W`` its width), up to
    ``LANE_GROUPS * LANES`` rows of x per pass over a row's kept weights."""
    width = xt.shape[1]
    flat = xt.reshape(-1)
    for b0 in range(0, width, LANE_GROUPS * LANES):
        csr_lanes(flat, b0, width, min(LANE_GROUPS, (width - b0) // LANES), row_ptr, cols, symbols, codebook, n0, n1,
                  sums, b0, width)


@njit(inline="always")
def index_lane_sums(xt, indices, codebook, n0, n1, sums):  # pragma: no cover - compiled
    """:func:`lane_sums` for a weight of dense indices ``[N, K]`` (``_simd.index_lanes``; a pass of one
    register, ``_simd.index_tile``)."""
    width, k = xt.shape[1], indices.shape[1]
    flat, rows = xt.reshape(-1), indices.reshape(-1)
    for b0 in range(0, width, LANE_GROUPS * LANES):
        groups = min(LANE_GROUPS, (width - b0) // LANES)
        if groups == 1:
            index_tile(flat, b0, width, rows, k, codebook, n0, n1, sums, b0, width)
        else:
            index_lanes(flat, b0, width, groups, rows, k, codebook, n0, n1, sums, b0, width)


@njit(inline="always")
def _lanes_out(sums, width, out, n0, n1):  # pragma: no cover - compiled
    """``out[b, n] = sums[(n - n0) * width + b]`` for rows ``[n0, n1)`` of ``out`` (lane sums moved into
    place row by row of ``out``)."""
    for b in range(out.shape[0]):
        for n in range(n0, n1):
            out[b, n] = sums[(n - n0) * width + b]


@njit(inline="always")
def _csr_operand(x):  # pragma: no cover - compiled
    """What :func:`_csr_dot` and :func:`_index_dot` read besides ``x``: ``x`` transposed and padded
    (:func:`padded_t`), made once for all the parts of a parallel product; for one row nothing (``x``
    itself, unread)."""
    return x if x.shape[0] == 1 else padded_t(x)


@njit(inline="always")
def _csr_dot(x, xt, row_ptr, cols, symbols, codebook, bias, lo, hi, clamp, out, n0, n1):  # pragma: no cover
    batch = x.shape[0]
    if batch == 1:
        xv = x[0]
        for n in range(n0, n1):
            out[0, n] = csr_row_dot(xv, cols, symbols, codebook, row_ptr[n], row_ptr[n + 1])
    else:
        # the sums side by side (out transposed), then moved into out in one pass: stored down a
        # column of out, each value went to another cache line (512x64 at 10 %, one core: 32 rows
        # 48 -> 20 us, 64 rows 181 -> 36 us)
        width = xt.shape[1]
        sums = np.empty((n1 - n0) * width, np.float32)
        lane_sums(xt, row_ptr, cols, symbols, codebook, n0, n1, sums)
        _lanes_out(sums, width, out, n0, n1)
    # the epilogue after all rows: inside the row loop it kept LLVM from vectorising the batch loop
    # (512x64 at 10 %, 16 rows of x: 52 -> 14 us), and at batch 1 it cost ~7 ns a row (a 300x784
    # weight at 10 %, one core: 9.5-9.7 -> 9.1 us). Expanding each row as _index_dot does is slower
    # for CSR: a zeroed row of mostly zeros for a few kept weights (16 rows: 36 us).
    _finish_rows(out, bias, lo, hi, clamp, n0, n1)


@njit(cache=True, nogil=True)
def csr_matmul_t(x, row_ptr, cols, symbols, codebook, bias, lo, hi, clamp, out):  # pragma: no cover
    """``out[b, n] = sum over kept (n, k) of x[b, k] * codebook[symbol]`` (CSR weight ``[N, K]``), then
    the epilogue (see :func:`index_matmul_t`)."""
    xt = _csr_operand(x)
    _csr_dot(x, xt, row_ptr, cols, symbols, codebook, bias, lo, hi, clamp, out, 0, row_ptr.size - 1)


@njit(cache=True, nogil=True, parallel=True)
def csr_matmul_t_par(x, row_ptr, cols, symbols, codebook, bias, lo, hi, clamp, out):  # pragma: no cover
    parts = _PARTS
    xt = _csr_operand(x)
    for t in prange(parts):
        n0, n1 = _split(row_ptr.size - 1, parts, t)
        _csr_dot(x, xt, row_ptr, cols, symbols, codebook, bias, lo, hi, clamp, out, n0, n1)


@njit(cache=True, nogil=True)
def csr_matmul_t_bins(x, row_ptr, cols, symbols, codebook, out):  # pragma: no cover - compiled
    """As :func:`csr_matmul_t`, by per-centroid sums of the activations (the paper's other way)."""
    bins = np.zeros(codebook.size, np.float32)
    for n in range(row_ptr.size - 1):
        for b in range(x.shape[0]):
            xv = x[b]
            for c in range(bins.size):
                bins[c] = 0.0
            for e in range(row_ptr[n], row_ptr[n + 1]):
                bins[symbols[_U(e)]] += xv[_U(cols[_U(e)])]
            acc = np.float32(0.0)
            for c in range(bins.size):
                acc += bins[c] * codebook[c]
            out[b, n] = acc


@njit(inline="always")
def _csr_scatter(x, xt, row_ptr, cols, symbols, codebook, acc, k0, k1):  # pragma: no cover - compiled
    """Add the kept weights of W's rows ``[k0, k1)`` times their activations into ``acc``, skipping
    zero activations: for one row of ``x``, into ``acc`` ``[1, N]``; for several, from ``xt`` (``x``
    transposed, ``[K, B]``) into ``acc`` ``[N, B]``, so each kept weight is read once for all B."""
    if x.shape[0] == 1:
        xv = x[0]
        dst = acc[0]
        for k in range(k0, k1):
            v = xv[k]
            if v != 0.0:       # unsigned offsets: with int32 pointers a signed e costs 5 % here
                for e in range(_U(row_ptr[k]), _U(row_ptr[k + 1])):
                    dst[_U(cols[e])] += v * codebook[symbols[e]]
        return
    batch = xt.shape[1]
    for k in range(k0, k1):
        xk = xt[k]
        live = False
        for b in range(batch):
            live |= xk[b] != 0.0
        if live:
            for e in range(_U(row_ptr[k]), _U(row_ptr[k + 1])):
                c = codebook[symbols[e]]
                dst = acc[_U(cols[e])]
                for b in range(batch):
                    dst[b] += c * xk[b]


@njit(inline="always")
def _scatter_buffers(x, n, parts):  # pragma: no cover - compiled
    """``(xt, acc)`` for :func:`_csr_scatter`: ``parts`` zeroed accumulators, ``[1, N]`` or ``[N, B]``."""
    if x.shape[0] == 1:
        return x, np.zeros((parts, 1, n), np.float32)
    return np.ascontiguousarray(x.T), np.zeros((parts, n, x.shape[0]), np.float32)


@njit(inline="always")
def _scatter_finish(x, acc, bias, lo, hi, clamp, out):  # pragma: no cover - compiled
    """``out[b, c]``: the accumulators of :func:`_scatter_buffers` summed over parts, then the epilogue."""
    single = x.shape[0] == 1
    for b in range(out.shape[0]):
        for c in range(out.shape[1]):
            total = np.float32(0.0)
            for t in range(acc.shape[0]):
                total += acc[t, 0, c] if single else acc[t, c, b]
            out[b, c] = _finish(total, bias, c, lo, hi, clamp)


@njit(cache=True, nogil=True)
def csr_matmul(x, row_ptr, cols, symbols, codebook, bias, lo, hi, clamp, out):  # pragma: no cover
    """``out[b, c] = sum over kept (k, c) of x[b, k] * codebook[symbol]`` (CSR weight ``[K, N]``), then
    the epilogue."""
    xt, acc = _scatter_buffers(x, out.shape[1], 1)
    _csr_scatter(x, xt, row_ptr, cols, symbols, codebook, acc[0], 0, row_ptr.size - 1)
    _scatter_finish(x, acc, bias, lo, hi, clamp, out)


@njit(inline="always")
def slot_dot(table, slots, e, end):  # pragma: no cover - compiled
    """``sum table[slots[k]]`` over the entries ``[e, end)`` of one row: four partial sums, in
    :func:`csr_row_dot`'s order (the same products, so the same sums bit for bit)."""
    i, stop = _U(e), _U(end)
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    while i + _U(3) < stop:
        a0 += table[_U(slots[i])]
        a1 += table[_U(slots[i + _U(1)])]
        a2 += table[_U(slots[i + _U(2)])]
        a3 += table[_U(slots[i + _U(3)])]
        i += _U(4)
    while i < stop:
        a0 += table[_U(slots[i])]
        i += _U(1)
    return (a0 + a1) + (a2 + a3)


@njit(cache=True, nogil=True)
def csr_matmul_t_dual(x, row_ptr, slots, in_ptr, in_rows, in_symbols, codebook, bias, lo, hi, clamp,
                      out):  # pragma: no cover - compiled
    """``x @ W.T`` for one row ``x`` and a weight held both ways (``indexed.ByInput`` with its
    ``TableRows``): when under a quarter of ``x`` is zero, by rows from a product table of every
    ``codebook[s] * x[0, k]`` (:func:`product_table`), which a kept weight's slot reads in one load
    instead of two (its activation's and its centroid's); else by input (:func:`csr_matmul` on
    ``W.T``'s CSR ``in_ptr``, ``in_rows``, ``in_symbols``), which skips the zeros. Counting them here
    costs ~0.1 us, where a numpy count and a second launch cost ~1 us."""
    xv = x[0]
    k = xv.size
    zeros = 0
    for j in range(k):
        zeros += xv[j] == 0.0
    if 4 * zeros >= k:
        csr_matmul(x, in_ptr, in_rows, in_symbols, codebook, bias, lo, hi, clamp, out)
        return
    table = np.empty(table_stride(codebook.size) * k, np.float32)
    product_table(table, codebook, xv)
    slot_rows(table, row_ptr, slots, out[0], 0, row_ptr.size - 1)
    _finish_rows(out, bias, lo, hi, clamp, 0, row_ptr.size - 1)


@njit(inline="always")
def table_stride(entries):  # pragma: no cover - compiled
    """``dcrt.memory.table_stride``: the codebook's entries rounded up to a power of two."""
    stride = 1
    while stride < entries:
        stride *= 2
    return stride


@njit(inline="always")
def product_table(table, codebook, xv):  # pragma: no cover - compiled
    """``table[k * stride + s] = xv[k] * codebook[s]``: every product a kept weight of a row can make,
    where its slot (``column * stride + symbol``) finds it; entries past the codebook in each column
    are never read and not written (vectorised: ~0.8 us for 128 activations by 256 centroids). The
    LSTM and GRU kernels share this."""
    stride = _U(table_stride(codebook.size))
    for j in range(xv.size):
        v = xv[j]
        base = _U(j) * stride
        for c in range(codebook.size):
            table[base + _U(c)] = v * codebook[c]


@njit(inline="always")
def slot_rows(table, row_ptr, slots, out_row, n0, n1):  # pragma: no cover - compiled
    """``out_row[n] = sum table[slots]`` over the kept weights of each row ``n`` in ``[n0, n1)``."""
    for n in range(n0, n1):
        out_row[n] = slot_dot(table, slots, row_ptr[n], row_ptr[n + 1])


@njit(inline="always")
def slot_split(codebook):  # pragma: no cover - compiled
    """``(shift, mask)``: a slot's column is ``slot >> shift``, its symbol ``slot & mask``."""
    stride = _U(table_stride(codebook.size))
    shift = _U(0)
    while (_U(1) << shift) < stride:
        shift += _U(1)
    return shift, stride - _U(1)


@njit(inline="always")
def slot_expand(row_ptr, slots, codebook, shift, mask, wrow, n):  # pragma: no cover - compiled
    """Row ``n`` of the weight into the float32 row ``wrow`` (:func:`slot_split`): zeros (vector
    stores), then the kept weights."""
    for k in range(wrow.size):
        wrow[k] = np.float32(0.0)
    for e in range(row_ptr[n], row_ptr[n + 1]):
        s = _U(slots[_U(e)])
        wrow[s >> shift] = codebook[s & mask]


@njit(cache=True, nogil=True)
def slot_matmul_t(x, row_ptr, slots, codebook, bias, lo, hi, clamp, out):  # pragma: no cover - compiled
    """``x @ W.T`` for a weight held only as product-table slots (``indexed.TableRows``, a recurrent
    ``R``): a table per row of ``x``, built into one buffer and reused."""
    table = np.empty(table_stride(codebook.size) * x.shape[1], np.float32)
    for b in range(x.shape[0]):
        product_table(table, codebook, x[b])
        slot_rows(table, row_ptr, slots, out[b], 0, row_ptr.size - 1)
    _finish_rows(out, bias, lo, hi, clamp, 0, row_ptr.size - 1)


@njit(cache=True, nogil=True, parallel=True)
def csr_matmul_par(x, row_ptr, cols, symbols, codebook, bias, lo, hi, clamp, out):  # pragma: no cover
    """Rows of W split among the threads, each scattering into its own partial result, then summed."""
    parts = _PARTS
    rows = row_ptr.size - 1
    xt, acc = _scatter_buffers(x, out.shape[1], parts)
    for t in prange(parts):
        k0, k1 = _split(rows, parts, t)
        _csr_scatter(x, xt, row_ptr, cols, symbols, codebook, acc[t], k0, k1)
    _scatter_finish(x, acc, bias, lo, hi, clamp, out)
