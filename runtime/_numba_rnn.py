"""numba kernels for the LSTM and GRU recurrences; import only through ``numba_kernels.kernels()``.

One call runs every time step of one direction: the recurrent product ``h @ R.T`` straight from the
weight as it is held (float32, codebook indices, or CSR of codebook symbols) and the gate update, so
a step costs no Python and no temporary arrays. The input projection ``x @ W.T`` of all steps is
one product computed before (``kernels.matmul_t``), passed in as ``proj`` with both biases added;
at batch 1 with a sliced R and a CSR or dense-index W the kernel takes it too (``*_sliced_csr``,
``*_sliced_index``).

The numpy twin is the step loop of ``runtime/ops/rnn.py`` (``DCRT_NO_NUMBA=1``, or any case these
kernels do not cover: other activations, ``sequence_lens``); ``tests/test_kernels.py`` checks that
they agree. Gate order is ONNX's ``i, o, f, c`` (GRU: ``z, r, h``; its kernels are at the end).

The float32 kernel's dot products are reassociated (``fastmath={"reassoc", "nsz"}``: vectorised,
with NaN and inf kept), four rows of ``R`` at a time; the index kernel's are four scalar sums at batch 1 (a
vectorised gather is slower, see ``_numba_index.index_dot4``); at larger batches both sparse forms
expand one row of ``R`` at a time and share it across the batch (``row_dots``), and with AVX-512
every form but an LSTM's CSR takes ``R`` expanded for the call in blocks of 16 rows and register tiles
(``lstm_tiled``, ``gru_tiled``). Results agree with the twin to float32 rounding, not bit for bit.
One LSTM classifier step here (512x128 recurrent weight, one core, the gate update included): 6.0
-> 3.7 us from float32, 25.6 -> 15.8 us from 8-bit indices. The float32 kernel also fuses its
multiply-adds (``"contract"``: FMA): its 16 steps 58.5 -> 53.0 us, at batch 8 462 -> 421 us. The
index kernels do not: their scalar sums wait on each addition, and an FMA's latency is longer (16
steps 260 -> 274 us).
"""
from __future__ import annotations

import numpy as np
from .._jit import njit

from ._numba_index import (csr_row_dot, index_dot4, index_lane_sums, lane_sums, padded_t, product_table, row_dots,
                           slot_expand, slot_rows, slot_split, table_stride)
from ._simd import BLOCK, LANES, PACK, SLICE, TABLE, centroids, packed_tile, sliced_dot, transpose8x8

_U = np.uint64
_FAST = {"reassoc", "nsz", "contract"}


# tanh(x) ~ x P(x^2) / Q(x^2) on |x| <= _TANH_EDGE (where float32 tanh rounds to 1), clamped beyond:
# a rational fit of our own (``python benchmarks/fit_tanh.py`` derives these coefficients), max error
# 4.7e-7 absolute, 1.0e-6 relative in float32. No exp (libm's expf is a scalar call, 5 per hidden
# unit and step): the 16 steps of a 128-unit LSTM went from 121 to 97 us on one core here.
_TANH_EDGE = np.float32(7.90531110763549805)
_P0, _P1, _P2, _P3, _P4 = (np.float32(0.9999991655349731), np.float32(0.1270894557237625),
                           np.float32(0.0026937469374388456), np.float32(7.151957106543705e-06),
                           np.float32(-6.141336328369107e-09))
_Q1, _Q2, _Q3 = (np.float32(0.4604196846485138), np.float32(0.022836975753307343),
                 np.float32(0.00019647966837510467))


@njit(inline="always")
def _tanh(v):  # pragma: no cover - compiled
    """tanh by the rational fit above (NaN stays NaN: the clamps compare, they do not take max/min)."""
    x = _TANH_EDGE if v > _TANH_EDGE else v
    x = -_TANH_EDGE if x < -_TANH_EDGE else x
    s = x * x
    p = (((_P4 * s + _P3) * s + _P2) * s + _P1) * s + _P0
    q = ((_Q3 * s + _Q2) * s + _Q1) * s + np.float32(1.0)
    return x * p / q


@njit(inline="always")
def _sigmoid(v):  # pragma: no cover - compiled
    """``(1 + tanh(v / 2)) / 2``: within 2.4e-7 of the logistic function (absolute)."""
    return np.float32(0.5) + np.float32(0.5) * _tanh(np.float32(0.5) * v)


@njit(inline="always")
def _clip(v, clip):  # pragma: no cover - compiled
    return min(max(v, -clip), clip) if clip < np.inf else v


@njit(inline="always")
def _update(gates, p, clip, input_forget, h, c, y, b, hidden):  # pragma: no cover - compiled
    """The LSTM cell for batch entry ``b`` from its gate pre-activations (``i, o, f, c``)."""
    peep = p.size > 0
    for j in range(hidden):
        cj = c[b, j]
        gi = gates[j] + (p[j] * cj if peep else np.float32(0.0))
        i = _sigmoid(_clip(gi, clip))
        if input_forget:
            f = np.float32(1.0) - i
        else:
            gf = gates[2 * hidden + j] + (p[2 * hidden + j] * cj if peep else np.float32(0.0))
            f = _sigmoid(_clip(gf, clip))
        cn = f * cj + i * _tanh(_clip(gates[3 * hidden + j], clip))
        go = gates[hidden + j] + (p[hidden + j] * cn if peep else np.float32(0.0))
        o = _sigmoid(_clip(go, clip))
        hn = o * _tanh(cn)
        c[b, j] = cn
        y[b, j] = hn


@njit(inline="always")
def _carry(h, y):  # pragma: no cover - compiled
    """The step's outputs become the next step's ``h`` (after every batch entry has used the old)."""
    for b in range(h.shape[0]):
        for j in range(h.shape[1]):
            h[b, j] = y[b, j]


@njit(inline="always")
def _store4(out, n, a0, a1, a2, a3):  # pragma: no cover - compiled
    """``out[n:n + 4] = a0..a3``."""
    out[n] = a0
    out[n + 1] = a1
    out[n + 2] = a2
    out[n + 3] = a3


@njit(inline="always")
def _rows4(r, v, o, n0, n1):  # pragma: no cover - compiled
    """``o[n] = r[n] . v`` for rows ``[n0, n1)`` of a float32 ``r``, four rows per load of ``v`` (the
    LSTM's 512x128: 3.6 -> 2.9 us a step), the rows past a multiple of four one by one."""
    n = n0
    while n + 4 <= n1:
        r0, r1, r2, r3 = r[n], r[n + 1], r[n + 2], r[n + 3]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for k in range(v.size):
            e = v[k]
            a0 += e * r0[k]
            a1 += e * r1[k]
            a2 += e * r2[k]
            a3 += e * r3[k]
        _store4(o, n, a0, a1, a2, a3)
        n += 4
    while n < n1:
        a = np.float32(0.0)
        for k in range(v.size):
            a += v[k] * r[n, k]
        o[n] = a
        n += 1


# error_model="numpy": a float division by zero gives inf/NaN instead of raising, so numba adds no
# check to the rational tanh's division and LLVM vectorises the gate update (16 steps of 128 units:
# 40 -> 5.5 us here).
@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def lstm_dense(proj, r, p, clip, input_forget, h, c, ys):  # pragma: no cover - compiled
    """All steps of one LSTM direction with a float32 recurrent weight ``r [4H, H]``.

    ``proj [T, B, 4H]`` (input projections + biases, in processing order), ``p`` the peepholes
    ``[3H]`` (``i, o, f``) or empty, ``clip`` (inf for none); ``h``, ``c`` ``[B, H]`` hold the initial
    state and receive the final one; ``ys [T, B, H]`` receives every step's ``h``.
    """
    steps, batch, gates4 = proj.shape
    hidden = gates4 // 4
    gates = np.empty(gates4, np.float32)
    for t in range(steps):
        for b in range(batch):
            _rows4(r, h[b], gates, 0, gates4)
            for n in range(gates4):
                gates[n] += proj[t, b, n]
            _update(gates, p, clip, input_forget, h, c, ys[t], b, hidden)
        _carry(h, ys[t])


# Batch > 1: each row of R is expanded once a step into a float32 buffer of one row, and its dot
# products with every entry's h are vectorised (``_numba_index.row_dots``). Entry by entry, R's
# 65,536 8-bit indices were looked up 8 times a step. The LSTM classifier's recurrence at batch 8,
# one core: 129-131 -> 52-57 us a step here.
# The input projections are added after all rows, in one pass: added row by row, ``proj[t]`` was a
# view made for each of the 512 rows (batch 8: 41.4 -> 33.6 us a step).
@njit(inline="always")
def _add_step(gates, proj, t):  # pragma: no cover - compiled
    """``gates += proj[t]`` (``[batch, 4H]``)."""
    for b in range(gates.shape[0]):
        for n in range(gates.shape[1]):
            gates[b, n] += proj[t, b, n]


@njit(inline="always")
def _update_batch(gates, p, clip, input_forget, h, c, y, hidden):  # pragma: no cover - compiled
    """The cell update of every batch entry, then its outputs become ``h``."""
    for b in range(h.shape[0]):
        _update(gates[b], p, clip, input_forget, h, c, y, b, hidden)
    _carry(h, y)


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_index(proj, indices, codebook, p, clip, input_forget, h, c, ys):  # pragma: no cover - compiled
    """As :func:`lstm_dense` with ``R = codebook[indices]`` (``indices [4H, H]``); at batch 1 not
    reassociated (see ``_numba_index.index_dot4``)."""
    steps, batch, gates4 = proj.shape
    hidden = gates4 // 4
    if batch > 1:
        gates_b = np.empty((batch, gates4), np.float32)
        wrow = np.empty(hidden, np.float32)
        for t in range(steps):
            for n in range(gates4):
                row = indices[n]
                for k in range(hidden):
                    wrow[k] = codebook[row[k]]
                row_dots(wrow, h, gates_b, n)
            _add_step(gates_b, proj, t)
            _update_batch(gates_b, p, clip, input_forget, h, c, ys[t], hidden)
        return
    gates = np.empty(gates4, np.float32)
    for t in range(steps):
        hv = h[0]
        for n in range(0, gates4, 4):
            a0, a1, a2, a3 = index_dot4(hv, indices, codebook, n)
            gates[n] = proj[t, 0, n] + a0
            gates[n + 1] = proj[t, 0, n + 1] + a1
            gates[n + 2] = proj[t, 0, n + 2] + a2
            gates[n + 3] = proj[t, 0, n + 3] + a3
        _update(gates, p, clip, input_forget, h, c, ys[t], 0, hidden)
        _carry(h, ys[t])


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_csr(proj, row_ptr, cols, symbols, codebook, p, clip, input_forget, h, c, ys):  # pragma: no cover
    """As :func:`lstm_dense` with R in CSR form (rows ``4H``): ``codebook[symbols]`` at ``cols``. At
    batch > 1, each kept weight read once for up to 64 entries from ``h`` transposed
    (``_numba_index.lane_sums``): the 90 %-pruned LSTM classifier at batch 8, one core, 43-44 us a
    step with four entries' sums a pass, 16-24 with 16-lane registers."""
    steps, batch, gates4 = proj.shape
    hidden = gates4 // 4
    if batch > 1:
        gates_b = np.empty((batch, gates4), np.float32)
        sums = np.empty(gates4 * ((batch + LANES - 1) // LANES * LANES), np.float32)
        for t in range(steps):
            ht = padded_t(h)
            width = ht.shape[1]
            lane_sums(ht, row_ptr, cols, symbols, codebook, 0, gates4, sums)
            for b in range(batch):
                for n in range(gates4):
                    gates_b[b, n] = sums[n * width + b] + proj[t, b, n]
            _update_batch(gates_b, p, clip, input_forget, h, c, ys[t], hidden)
        return
    gates = np.empty(gates4, np.float32)
    for t in range(steps):
        hv = h[0]
        for n in range(gates4):
            gates[n] = proj[t, 0, n] + csr_row_dot(hv, cols, symbols, codebook, row_ptr[n], row_ptr[n + 1])
        _update(gates, p, clip, input_forget, h, c, ys[t], 0, hidden)
        _carry(h, ys[t])


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def lstm_sliced(proj, slot_ptr, cols, symbols, order, codebook, p, clip, input_forget, h, c,
                ys):  # pragma: no cover - compiled
    """As :func:`lstm_csr` at batch 1 with R as ``indexed.SlicedRows``: 32 rows of R at a time, a
    permute of a block's activations and a vector multiply-add per 16 of them (``_simd.sliced_dot``),
    the sums scattered to R's rows, beside the input projections. That R's product, one step on
    one core: gathering the activations from memory 1.6-2.7 us, permuting them 0.8-1.4 (against
    :func:`lstm_csr`'s 16 steps 105-161 us, slices with gathers 52-82)."""
    gates4 = proj.shape[2]
    _sliced_steps(proj.reshape(-1), np.zeros(gates4, np.float32), slot_ptr, cols, symbols, order,
                  codebook, p, clip, input_forget, h, c, ys)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def lstm_sliced_csr(x, w_row_ptr, w_cols, w_symbols, w_codebook, b, slot_ptr, cols, symbols, order, codebook, clip,
                    input_forget, h, c, ys):  # pragma: no cover - compiled
    """:func:`lstm_sliced` (no peepholes) with the input projections taken here, from ``x`` ``[T, 1, I]``
    and a CSR ``W`` (``_numba_index.lane_sums``: each kept weight of W read once for 16 steps), and
    ``b`` ``[8H]`` both biases: the step loop reads the sums where ``lane_sums`` leaves them, so that
    no pass moves them into ``[T, 4H]`` or adds the biases, and one call does what ``matmul_t`` and
    the kernel did (the 90 %-pruned LSTM classifier's LSTM node, one core: 49-58 -> 43-49 us)."""
    sums, width = _csr_projection(x, w_row_ptr, w_cols, w_symbols, w_codebook)
    _projected_steps(sums, width, b, slot_ptr, cols, symbols, order, codebook, clip, input_forget, h, c, ys)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def lstm_sliced_index(x, w_indices, w_codebook, b, slot_ptr, cols, symbols, order, codebook, clip, input_forget, h, c,
                      ys):  # pragma: no cover - compiled
    """:func:`lstm_sliced_csr` with ``W`` as dense indices ``[4H, I]`` (``index_lane_sums``: each row of
    W expanded once for 16 steps). The default plan's LSTM classifier, its LSTM kernel and input
    projection, one core: ``lstm_slots`` after ``matmul_t`` ~300 us, ``lstm_sliced`` after it 114,
    this 89."""
    sums, width = _index_projection(x, w_indices, w_codebook)
    _projected_steps(sums, width, b, slot_ptr, cols, symbols, order, codebook, clip, input_forget, h, c, ys)


@njit(inline="always")
def _csr_projection(x, w_row_ptr, w_cols, w_symbols, w_codebook):  # pragma: no cover - compiled
    """The input projections of all steps of ``x`` ``[T, 1, I]`` by a CSR ``W``, gate row by row, a
    step a column (``lane_sums``: each kept weight read once for 16 steps), and the row's width."""
    xt = padded_t(x.reshape(x.shape[0], x.shape[2]))
    sums = np.empty((w_row_ptr.size - 1) * xt.shape[1], np.float32)
    lane_sums(xt, w_row_ptr, w_cols, w_symbols, w_codebook, 0, w_row_ptr.size - 1, sums)
    return sums, xt.shape[1]


@njit(inline="always")
def _index_projection(x, w_indices, w_codebook):  # pragma: no cover - compiled
    """:func:`_csr_projection` by dense indices (``index_lane_sums``: each row expanded once for 16 steps)."""
    xt = padded_t(x.reshape(x.shape[0], x.shape[2]))
    sums = np.empty(w_indices.shape[0] * xt.shape[1], np.float32)
    index_lane_sums(xt, w_indices, w_codebook, 0, w_indices.shape[0], sums)
    return sums, xt.shape[1]


@njit(inline="always")
def _projected_steps(sums, width, b, slot_ptr, cols, symbols, order, codebook, clip, input_forget, h, c,
                     ys):  # pragma: no cover - compiled
    """The steps from the input projections' sums ``[4H, width]`` (gate row by row, a step a column)
    and both biases ``b`` ``[8H]``."""
    gates4 = sums.size // width
    bias = np.empty(gates4, np.float32)
    for n in range(gates4):
        bias[n] = b[n] + b[gates4 + n]
    _sliced_steps(_step_major(sums, width, gates4), bias, slot_ptr, cols, symbols, order, codebook,
                  np.zeros(0, np.float32), clip, input_forget, h, c, ys)


@njit(inline="always")
def _step_major(sums, width, rows):  # pragma: no cover - compiled
    """The projections' sums ``[rows, width]`` (a step a column; ``width`` a multiple of 16) as
    ``[width, rows]``, in 8x8 tiles (``_simd.transpose8x8``): a step's gate rows then side by side, so
    that the loop adding them to the recurrent sums vectorises."""
    out = np.empty(width * rows, np.float32)
    whole = rows // 8 * 8
    for n0 in range(0, whole, 8):
        for t0 in range(0, width, 8):
            transpose8x8(sums, n0 * width + t0, width, out, t0 * rows + n0, rows)
    for n in range(whole, rows):
        for t in range(width):
            out[t * rows + n] = sums[n * width + t]
    return out


@njit(inline="always")
def _sliced_steps(proj, bias, slot_ptr, cols, symbols, order, codebook, p, clip, input_forget, h, c,
                  ys):  # pragma: no cover - compiled
    """The steps of :func:`lstm_sliced`, its input projection of gate row ``n`` at step ``t`` being
    ``proj[t * 4H + n] + bias[n]`` (see :func:`_sliced_buffers`)."""
    steps, gates4 = ys.shape[0], bias.size
    hidden = gates4 // 4
    values, hv, dots = _sliced_buffers(symbols, codebook, slot_ptr, hidden)
    gates = np.empty(gates4, np.float32)
    for t in range(steps):
        _sliced_product(h, hv, slot_ptr, cols, values, order, dots)
        for n in range(gates4):
            gates[n] = proj[t * gates4 + n] + bias[n] + dots[n]
        _update(gates, p, clip, input_forget, h, c, ys[t], 0, hidden)
        _carry(h, ys[t])


@njit(inline="always")
def _sliced_buffers(symbols, codebook, slot_ptr, hidden):  # pragma: no cover - compiled
    """What the sliced steps keep for a call: the centroids of the slots (looked up once for all the
    steps: a temporary bounded as a product table is, ``indexed._held_slices``; 43 KB for the LSTM
    classifier's R at 90 %), ``h`` in blocks, each followed by the zero the padding reads, and the
    product's sums in row order (and room for the padding lanes past the rows)."""
    blocks = -(-hidden // BLOCK)
    values = np.empty(symbols.size, np.float32)
    centroids(codebook, symbols, values)
    return values, np.zeros(blocks * TABLE, np.float32), np.empty((slot_ptr.size - 1) // blocks * SLICE, np.float32)


@njit(inline="always")
def _sliced_product(h, hv, slot_ptr, cols, values, order, dots):  # pragma: no cover - compiled
    """``dots[:rows]``: ``h @ R.T`` by R's slices (``_simd.sliced_dot``; past the rows, the padding lanes'
    zeros)."""
    hidden = h.shape[1]
    blocks = -(-hidden // BLOCK)
    for j in range(hidden):     # a loop: a slice assignment's code imports numba's slicing and
        hv[j + j // BLOCK] = h[0, j]        # unicode modules when the cached kernel loads (26 ms, 1.8 MB)
    for s in range(dots.size // SLICE):
        sliced_dot(hv, slot_ptr, cols, values, s * blocks, blocks, order, s * SLICE, dots)


# Table slots at batch 3 and more: a table per entry costs its building and a pass over the slots
# each (8 entries: 52 us a step for the LSTM classifier's R product alone), so each row of R is
# expanded once a step from its slots and shared across the batch, as from dense indices (8 entries:
# 32 us a step with the gate update, 35 from dense indices).
TABLE_BATCH = 2


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_slots(proj, row_ptr, slots, codebook, p, clip, input_forget, h, c, ys):  # pragma: no cover - compiled
    """As :func:`lstm_dense` with R held as product-table slots (``indexed.TableRows``): up to
    ``TABLE_BATCH`` entries, each step and entry builds the table of every ``h[k] * centroid`` and
    each kept weight of R adds its slot's product, one load instead of three (index, centroid,
    activation); more entries share each row of R expanded from its slots. The LSTM classifier's
    60 %-pruned 512x128 R with 256 centroids, one step at batch 1: 12.8 us from 8-bit indices -> 7.4."""
    steps, batch, gates4 = proj.shape
    hidden = gates4 // 4
    gates = np.empty((batch, gates4), np.float32)
    table = np.empty(table_stride(codebook.size) * hidden if batch <= TABLE_BATCH else 0, np.float32)
    weight = (row_ptr, slots, codebook, table, np.zeros(hidden, np.float32))
    for t in range(steps):
        _slot_rows(weight, h, gates, 0, gates4)
        _add_step(gates, proj, t)
        _update_batch(gates, p, clip, input_forget, h, c, ys[t], hidden)


# Batches of two or more with AVX-512 (``ops/rnn.py``'s ``_tiled``; a float32 R from three): R
# expanded to float32 for the call in blocks of 16 rows, each transposed (``slots_t``, ``csr_t``,
# ``index_t``, ``dense_t``: a temporary within ``indexed.call_bound``), so that a step is register
# tiles of a block by up to PACK entries (``_simd.packed_tile``: a load of 16 weights and a
# multiply-add per entry by its broadcast activation, an input). Row by row, each row expanded and
# dotted with every entry (``_slot_rows``), was a chain of scalar additions per entry and row (these
# kernels are not reassociated). Batch 8, one core, best ratio to onnxruntime (old and new code in
# alternating processes): the default plan's LSTM classifier 3.9-4.2x -> 1.7x, the GRU classifier
# 2.6-2.9x -> 1.3x; dense mode's LSTM (``lstm_dense``, a product per entry) 2.2x -> 1.6-1.7x. A
# block's 16 weights of an input are adjacent, so that a tile reads its block in one stream (from
# R transposed whole, rows 2 KB apart, a tile of two entries with four chains of sums took 7.5-9 us
# a step of the LSTM classifier's R, from blocks 3.1).
@njit(inline="always")
def _tiled_rows(weight, x, out, n0, n1):  # pragma: no cover - compiled
    """``out[b, n] = R[n] . x[b]`` for rows ``[n0, n1)`` from ``weight`` = (``rb``: R in blocks,
    :func:`_blocks`; a buffer of ``H * PACK`` floats for ``x`` packed as the tiles read it; an empty
    array; a buffer of ``PACK * LANES`` floats): the blocks inside the rows straight into ``out``, one
    that the rows cut through into the buffer, its rows in them copied."""
    rb, packed, none, scratch = weight
    hidden, width = rb.shape[1], out.shape[1]
    flat, o = rb.reshape(-1), out.reshape(-1)
    for b0 in range(0, x.shape[0], PACK):
        rows = min(PACK, x.shape[0] - b0)
        pack = 2 if rows <= 2 else 4 if rows <= 4 else 8 if rows <= 8 else PACK
        for k in range(hidden):
            for i in range(rows):
                packed[k * pack + i] = x[b0 + i, k]
        for g in range(n0 // LANES, -(-n1 // LANES)):
            m0, at = g * LANES, g * hidden * LANES
            if n0 <= m0 and m0 + LANES <= n1:
                _tile(pack, packed, flat, at, hidden, o, b0 * width + m0, width, rows, none)
                continue
            _tile(pack, packed, flat, at, hidden, scratch, 0, LANES, rows, none)
            for i in range(rows):
                for m in range(max(n0, m0), min(n1, m0 + LANES)):
                    out[b0 + i, m] = scratch[i * LANES + m - m0]


@njit(inline="always")
def _tile(pack, packed, rb, at, hidden, out, o0, ldo, rows, none):  # pragma: no cover - compiled
    """The register tile of :func:`_tiled_rows` for the block at ``rb[at:]``, ``pack`` (2, 4, 8 or
    PACK) accumulators for its ``rows`` entries: each a constant to ``packed_tile``."""
    zero = np.float32(0.0)
    if pack == 2:
        packed_tile(2, packed, 0, rb, at, LANES, hidden, out, o0, ldo, rows, none, 0, none, zero, zero, 0)
    elif pack == 4:
        packed_tile(4, packed, 0, rb, at, LANES, hidden, out, o0, ldo, rows, none, 0, none, zero, zero, 0)
    elif pack == 8:
        packed_tile(8, packed, 0, rb, at, LANES, hidden, out, o0, ldo, rows, none, 0, none, zero, zero, 0)
    else:
        packed_tile(PACK, packed, 0, rb, at, LANES, hidden, out, o0, ldo, rows, none, 0, none, zero, zero, 0)


@njit(inline="always")
def _tile_buffers(rb):  # pragma: no cover - compiled
    """``weight`` of :func:`_tiled_rows` for ``rb``."""
    return rb, np.zeros(rb.shape[1] * PACK, np.float32), np.zeros(0, np.float32), np.empty(PACK * LANES, np.float32)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def lstm_tiled(proj, rb, p, clip, input_forget, h, c, ys):  # pragma: no cover - compiled
    """As :func:`lstm_dense` with R expanded for the call in blocks of 16 rows (:func:`_blocks`), its
    product in register tiles (:func:`_tiled_rows`): batches with AVX-512."""
    steps, batch, gates4 = proj.shape
    gates = np.empty((batch, gates4), np.float32)
    weight = _tile_buffers(rb)
    for t in range(steps):
        _tiled_rows(weight, h, gates, 0, gates4)
        _add_step(gates, proj, t)
        _update_batch(gates, p, clip, input_forget, h, c, ys[t], gates4 // 4)


@njit(inline="always")
def _blocks(rows, width):  # pragma: no cover - compiled
    """Zeros ``[ceil(rows / LANES), width, LANES]``: R's rows in blocks of LANES, block ``g``'s
    ``[k, l]`` being ``R[g * LANES + l, k]`` (zeros past the rows)."""
    return np.zeros((-(-rows // LANES), width, LANES), np.float32)


@njit(cache=True, nogil=True)
def slots_t(row_ptr, slots, codebook, width):  # pragma: no cover - compiled
    """A weight ``[N, width]`` held as table slots (``indexed.TableRows``) as float32 in blocks of rows
    (:func:`_blocks`)."""
    shift, mask = slot_split(codebook)
    rb = _blocks(row_ptr.size - 1, width)
    for n in range(row_ptr.size - 1):
        for e in range(row_ptr[n], row_ptr[n + 1]):
            s = _U(slots[_U(e)])
            rb[n // LANES, s >> shift, n % LANES] = codebook[s & mask]
    return rb


@njit(cache=True, nogil=True)
def csr_t(row_ptr, cols, symbols, codebook, width):  # pragma: no cover - compiled
    """:func:`slots_t` of a CSR weight (``indexed.SparseWeight``)."""
    rb = _blocks(row_ptr.size - 1, width)
    for n in range(row_ptr.size - 1):
        for e in range(row_ptr[n], row_ptr[n + 1]):
            rb[n // LANES, cols[e], n % LANES] = codebook[symbols[e]]
    return rb


@njit(cache=True, nogil=True)
def index_t(indices, codebook):  # pragma: no cover - compiled
    """:func:`slots_t` of dense indices ``[N, K]`` (``indexed.IndexedWeight``)."""
    rows, width = indices.shape
    rb = _blocks(rows, width)
    for n in range(rows):
        for k in range(width):
            rb[n // LANES, k, n % LANES] = codebook[indices[n, k]]
    return rb


@njit(cache=True, nogil=True)
def dense_t(r):  # pragma: no cover - compiled
    """:func:`slots_t` of a float32 weight."""
    rows, width = r.shape
    rb = _blocks(rows, width)
    for n in range(rows):
        for k in range(width):
            rb[n // LANES, k, n % LANES] = r[n, k]
    return rb


# -- GRU -----------------------------------------------------------------------------------------
# One call runs every step of one direction, as for the LSTM; ``proj`` holds the input projections
# with ``Wb`` added, ``rb`` is ``Rb`` (added after the recurrent product, as ONNX and the numpy twin
# do). Gate order ``z, r, h``. Without ``linear_before_reset`` the candidate's recurrent product is
# taken of ``r * h``, so it comes after the gates: the rows of ``R`` are multiplied in two passes.

@njit(inline="always")
def _dense_rows(weight, x, out, n0, n1):  # pragma: no cover - compiled
    """``out[b, n] = R[n] . x[b]`` for rows ``[n0, n1)`` of a float32 ``R``, entry by entry, four rows
    per load of ``x[b]`` (at batch 8 faster than ``row_dots`` over the entries: 0.27 against 0.36 ms
    for the GRU classifier)."""
    r = weight[0]
    for b in range(x.shape[0]):
        _rows4(r, x[b], out[b], n0, n1)


@njit(inline="always")
def _index_rows(weight, x, out, n0, n1):  # pragma: no cover - compiled
    """As :func:`_dense_rows` with ``R = codebook[indices]``; several entries share each row,
    expanded once a step (as the LSTM's batch path)."""
    indices, codebook = weight
    if x.shape[0] > 1:
        wrow = np.empty(indices.shape[1], np.float32)
        for n in range(n0, n1):
            row = indices[n]
            for k in range(wrow.size):
                wrow[k] = codebook[row[k]]
            row_dots(wrow, x, out, n)
        return
    v, o = x[0], out[0]
    n = n0
    while n + 4 <= n1:
        a0, a1, a2, a3 = index_dot4(v, indices, codebook, n)
        _store4(o, n, a0, a1, a2, a3)
        n += 4
    while n < n1:
        a = np.float32(0.0)
        for k in range(v.size):
            a += v[k] * codebook[indices[n, k]]
        o[n] = a
        n += 1


@njit(inline="always")
def _csr_rows(weight, x, out, n0, n1):  # pragma: no cover - compiled
    """As :func:`_dense_rows` with R in CSR form (``codebook[symbols]`` at ``cols``); several entries
    share each row, scattered into a row of zeros and cleared after."""
    row_ptr, cols, symbols, codebook = weight
    if x.shape[0] > 1:
        wrow = np.zeros(x.shape[1], np.float32)
        for n in range(n0, n1):
            for e in range(row_ptr[n], row_ptr[n + 1]):
                wrow[cols[e]] = codebook[symbols[e]]
            row_dots(wrow, x, out, n)
            for e in range(row_ptr[n], row_ptr[n + 1]):
                wrow[cols[e]] = np.float32(0.0)
        return
    v, o = x[0], out[0]
    for n in range(n0, n1):
        o[n] = csr_row_dot(v, cols, symbols, codebook, row_ptr[n], row_ptr[n + 1])


@njit(inline="always")
def _slot_rows(weight, x, out, n0, n1):  # pragma: no cover - compiled
    """As :func:`_dense_rows` with R held as product-table slots: a table per entry of ``x``, or past
    ``TABLE_BATCH`` entries each row expanded once and shared (see :func:`lstm_slots`)."""
    row_ptr, slots, codebook, table, wrow = weight
    if x.shape[0] > TABLE_BATCH:
        shift, mask = slot_split(codebook)
        for n in range(n0, n1):
            slot_expand(row_ptr, slots, codebook, shift, mask, wrow, n)
            row_dots(wrow, x, out, n)
        return
    for b in range(x.shape[0]):
        product_table(table, codebook, x[b])
        slot_rows(table, row_ptr, slots, out[b], n0, n1)


@njit(inline="always")
def _gru_steps(rows, weight, proj, rb, clip, before_reset, h, ys):  # pragma: no cover - compiled
    steps, batch, gates3 = proj.shape
    hidden = gates3 // 3
    rec = np.empty((batch, gates3), np.float32)
    z = np.empty((batch, hidden), np.float32)
    r = np.empty((batch, hidden), np.float32)
    rh = np.empty((batch, hidden), np.float32)
    for t in range(steps):
        rows(weight, h, rec, 0, gates3 if before_reset else 2 * hidden)
        for b in range(batch):
            pt, rt = proj[t, b], rec[b]
            for j in range(hidden):
                z[b, j] = _sigmoid(_clip(pt[j] + rt[j] + rb[j], clip))
                r[b, j] = _sigmoid(_clip(pt[hidden + j] + rt[hidden + j] + rb[hidden + j], clip))
        if not before_reset:
            for b in range(batch):
                for j in range(hidden):
                    rh[b, j] = r[b, j] * h[b, j]
            rows(weight, rh, rec, 2 * hidden, gates3)
        for b in range(batch):
            pt, rt = proj[t, b], rec[b]
            for j in range(hidden):
                n = 2 * hidden + j
                pre = pt[n] + r[b, j] * (rt[n] + rb[n]) if before_reset else pt[n] + rt[n] + rb[n]
                ys[t, b, j] = (np.float32(1.0) - z[b, j]) * _tanh(_clip(pre, clip)) + z[b, j] * h[b, j]
        _carry(h, ys[t])


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def gru_dense(proj, r, rb, clip, before_reset, h, ys):  # pragma: no cover - compiled
    """All steps of one GRU direction with a float32 recurrent weight ``r [3H, H]``.

    ``proj [T, B, 3H]`` (input projections + ``Wb``, in processing order), ``rb [3H]`` the recurrent
    bias, ``clip`` (inf for none); ``h [B, H]`` holds the initial state and receives the final one;
    ``ys [T, B, H]`` receives every step's ``h``.
    """
    _gru_steps(_dense_rows, (r,), proj, rb, clip, before_reset, h, ys)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def gru_tiled(proj, blocks, rb, clip, before_reset, h, ys):  # pragma: no cover - compiled
    """As :func:`gru_dense` with R expanded for the call in blocks of 16 rows (see :func:`lstm_tiled`)."""
    _gru_steps(_tiled_rows, _tile_buffers(blocks), proj, rb, clip, before_reset, h, ys)


@njit(cache=True, nogil=True, error_model="numpy")
def gru_index(proj, indices, codebook, rb, clip, before_reset, h, ys):  # pragma: no cover - compiled
    """As :func:`gru_dense` with ``R = codebook[indices]`` (not reassociated: ``index_dot4``)."""
    _gru_steps(_index_rows, (indices, codebook), proj, rb, clip, before_reset, h, ys)


@njit(cache=True, nogil=True, error_model="numpy")
def gru_csr(proj, row_ptr, cols, symbols, codebook, rb, clip, before_reset, h, ys):  # pragma: no cover
    """As :func:`gru_dense` with R in CSR form (rows ``3H``)."""
    _gru_steps(_csr_rows, (row_ptr, cols, symbols, codebook), proj, rb, clip, before_reset, h, ys)


@njit(cache=True, nogil=True, error_model="numpy")
def gru_slots(proj, row_ptr, slots, codebook, rb, clip, before_reset, h, ys):  # pragma: no cover - compiled
    """As :func:`gru_dense` with R held as product-table slots (rows ``3H``; see :func:`lstm_slots`)."""
    hidden = h.shape[1]
    table = np.empty(table_stride(codebook.size) * hidden if h.shape[0] <= TABLE_BATCH else 0, np.float32)
    _gru_steps(_slot_rows, (row_ptr, slots, codebook, table, np.zeros(hidden, np.float32)), proj, rb, clip,
               before_reset, h, ys)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def gru_sliced(proj, slot_ptr, cols, symbols, order, codebook, rb, clip, h, ys):  # pragma: no cover - compiled
    """As :func:`gru_csr` at batch 1 with ``linear_before_reset`` and R as ``indexed.SlicedRows`` (see
    :func:`lstm_sliced`): one product of all ``3H`` rows a step."""
    gates3 = rb.size
    _gru_sliced_steps(proj.reshape(-1), np.zeros(gates3, np.float32), rb, slot_ptr, cols, symbols, order,
                      codebook, clip, h, ys)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def gru_sliced_before(proj, slot_ptr, cols, symbols, order, codebook, h_slot_ptr, h_cols, h_symbols, h_order, rb, clip,
                      h, ys):  # pragma: no cover - compiled
    """As :func:`gru_csr` at batch 1 with the reset before R (``linear_before_reset`` 0): R's rows of
    ``z`` and ``r`` as slices (the first five arrays), a product by ``h`` a step; then its rows of
    the candidate as slices of their own (``h_*``, the same codebook), a product by ``r * h``."""
    hidden = rb.size // 3
    values, hv, dots = _sliced_buffers(symbols, codebook, slot_ptr, hidden)
    h_values, h_hv, h_dots = _sliced_buffers(h_symbols, codebook, h_slot_ptr, hidden)
    z, rh = np.empty(hidden, np.float32), np.empty((1, hidden), np.float32)
    for t in range(ys.shape[0]):
        _sliced_product(h, hv, slot_ptr, cols, values, order, dots)
        pt, y = proj[t, 0], ys[t, 0]
        for j in range(hidden):
            z[j] = _sigmoid(_clip(pt[j] + dots[j] + rb[j], clip))
            rh[0, j] = _sigmoid(_clip(pt[hidden + j] + dots[hidden + j] + rb[hidden + j], clip)) * h[0, j]
        _sliced_product(rh, h_hv, h_slot_ptr, h_cols, h_values, h_order, h_dots)
        for j in range(hidden):
            n = 2 * hidden + j
            y[j] = (np.float32(1.0) - z[j]) * _tanh(_clip(pt[n] + h_dots[j] + rb[n], clip)) + z[j] * h[0, j]
        _carry(h, ys[t])


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def gru_sliced_csr(x, w_row_ptr, w_cols, w_symbols, w_codebook, b, slot_ptr, cols, symbols, order, codebook, clip, h,
                   ys):  # pragma: no cover - compiled
    """:func:`gru_sliced` with the input projections taken here from ``x`` ``[T, 1, I]`` and a CSR
    ``W`` (as :func:`lstm_sliced_csr`), ``b`` ``[6H]`` both biases."""
    sums, width = _csr_projection(x, w_row_ptr, w_cols, w_symbols, w_codebook)
    wb, rb = _gru_biases(b)
    _gru_sliced_steps(_step_major(sums, width, rb.size), wb, rb, slot_ptr, cols, symbols, order,
                      codebook, clip, h, ys)


@njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
def gru_sliced_index(x, w_indices, w_codebook, b, slot_ptr, cols, symbols, order, codebook, clip, h,
                     ys):  # pragma: no cover - compiled
    """:func:`gru_sliced_csr` with ``W`` as dense indices ``[3H, I]``."""
    sums, width = _index_projection(x, w_indices, w_codebook)
    wb, rb = _gru_biases(b)
    _gru_sliced_steps(_step_major(sums, width, rb.size), wb, rb, slot_ptr, cols, symbols, order,
                      codebook, clip, h, ys)


@njit(inline="always")
def _gru_biases(b):  # pragma: no cover - compiled
    """``Wb`` and ``Rb`` of ``b`` ``[6H]`` as arrays of their own (a loop: see :func:`_sliced_product`)."""
    gates3 = b.size // 2
    wb, rb = np.empty(gates3, np.float32), np.empty(gates3, np.float32)
    for n in range(gates3):
        wb[n], rb[n] = b[n], b[gates3 + n]
    return wb, rb


@njit(inline="always")
def _gru_sliced_steps(proj, wb, rb, slot_ptr, cols, symbols, order, codebook, clip, h,
                      ys):  # pragma: no cover - compiled
    """The steps of :func:`gru_sliced`, the input projection of gate row ``n`` at step ``t`` being
    ``proj[t * 3H + n] + wb[n]``; the sums as :func:`_gru_steps` makes them."""
    hidden = rb.size // 3
    values, hv, rec = _sliced_buffers(symbols, codebook, slot_ptr, hidden)
    xp = np.empty(rb.size, np.float32)
    for t in range(ys.shape[0]):
        _sliced_product(h, hv, slot_ptr, cols, values, order, rec)
        for n in range(rb.size):
            xp[n] = proj[t * rb.size + n] + wb[n]
        y = ys[t, 0]
        for j in range(hidden):
            n = 2 * hidden + j
            z = _sigmoid(_clip(xp[j] + rec[j] + rb[j], clip))
            r = _sigmoid(_clip(xp[hidden + j] + rec[hidden + j] + rb[hidden + j], clip))
            y[j] = (np.float32(1.0) - z) * _tanh(_clip(xp[n] + r * (rec[n] + rb[n]), clip)) + z * h[0, j]
        _carry(h, ys[t])

