"""numba kernels for 2-D convolutions; import only through ``runtime.numba_kernels.kernels()``.

- ``depthwise2d``: a direct depthwise (grouped, one input channel per group) convolution that reads
  the input without padding it, with the bias and an optional clamp (a fused Relu/Clip); it takes
  the float32 taps of a tile of channels (an index-mode weight is expanded a quarter at a time).
- ``im2col2d``: the im2col matrix ``[C*kh*kw, samples, positions]`` of a block of output rows, zeros
  for the padding, straight from the unpadded input (no padded copy, no strided numpy copy); with
  unit strides and rows as wide as the input's, each tap's block is one flat copy of the plane; small
  blocks are gathered through a table of tap offsets.
- ``pointwise``: the product of a weight packed by ``pack_pointwise`` with one sample's 1x1
  convolution input or im2col matrix, in register tiles of 12 output channels by 16 positions
  (``_simd.pointwise_tile``), the bias, a residual and the clamp applied before each tile is stored
  (numpy twin: the product and ``_bias_clamp_numpy``).
- ``conv_tiles``: a convolution of one sample by the same packed weight and tiles, each tile reading
  its taps from the input in place (its columns split by the stride) instead of an im2col matrix
  (``_simd.conv_tile``; numpy twin: the im2col product).
- ``bias_clamp``: adds the bias and clamps, in place, in one pass over the output; ``add_clamp``
  the same for a residual Add and its Relu.
- ``winograd_input``, ``winograd_output``, ``winograd_weights``: the three transforms of a 3x3
  convolution by Winograd's F(2x2, 3x3) (``runtime/winograd.py``, whose numpy twins they have).
- ``max_pool2d``: 2-D max pooling, the rows of a window first, then along the row (numpy twin:
  ``ops.nn.max_pool``).
- ``softmax_rows``: softmax along the last axis, a classifier's head (numpy twin: ``ops.nn.softmax``).

Each has a ``_par`` twin that spreads (sample, channel) planes over numba's threads, and a numpy twin
in ``runtime/kernels.py`` (``_depthwise_numpy``, ``_im2col_numpy``, ``_bias_clamp_numpy``) or
``runtime/winograd.py``.

Arrays are read through flat views with unsigned offsets: numba then drops its negative-index
check and LLVM vectorises the inner loops (3-5x faster than ``x[n, c, i, j + off]`` here).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import njit
from ._simd import COLUMNS, LANES, PACK, conv_tile, pointwise_column, pointwise_tile, transpose8x8

_U = np.uint64
#: Bytes of the input's columns that ``pointwise`` works through at a time (they stay in L2).
_POINTWISE_BLOCK = 512 << 10
#: Input channels a ``pointwise`` tile sums before it stores (the next chunk sums onto the stored
#: values): the chunk's rows of a block of the input stay in L1 and its pages in the TLB.
_POINTWISE_DEPTH = 64
_PARTS = 16      # tasks of a parallel kernel (a constant: numba.get_num_threads() is not cachable)
# Depthwise multiply-adds may be fused (FMA), and the 3x3 rows sum per kernel row: results differ
# from the numpy twin's (one tap at a time, each product rounded) in the last bits only; NaN and inf
# behave as usual.
_CONTRACT = {"contract"}


@njit(inline="always")
def _valid(off, stride, size, count):  # pragma: no cover - compiled
    """``[lo, hi)``: the outputs ``o`` with ``0 <= o * stride + off < size`` (``0 <= o < count``)."""
    lo = 0 if off >= 0 else (-off + stride - 1) // stride
    last = size - 1 - off
    hi = 0 if last < 0 else min(count, last // stride + 1)
    return lo, max(lo, hi)


@njit(inline="always")
def _row3x3(xf, a, b, c, top, bottom, t, start, width, dst, db):  # pragma: no cover - compiled
    """``dst[db + u]`` for ``u < width`` (>= 2): the 3x3, pad 1, stride 1 depthwise row centred on
    input row ``b`` (flat offsets ``a``, ``b``, ``c`` of the rows above, at and below; ``top`` /
    ``bottom`` False when that row is padding). All nine taps in one pass, so each output is written
    once; the interior loop vectorises, with one partial sum per kernel row (three independent
    chains of multiply-adds, not one chain of nine). Taps in the padding are skipped."""
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]
    e = width - 1
    v = start
    if top:
        v = v + t1 * xf[_U(a)] + t2 * xf[_U(a + 1)]
    v = v + t4 * xf[_U(b)] + t5 * xf[_U(b + 1)]
    if bottom:
        v = v + t7 * xf[_U(c)] + t8 * xf[_U(c + 1)]
    dst[_U(db)] = v
    v = start
    if top:
        v = v + t0 * xf[_U(a + e - 1)] + t1 * xf[_U(a + e)]
    v = v + t3 * xf[_U(b + e - 1)] + t4 * xf[_U(b + e)]
    if bottom:
        v = v + t6 * xf[_U(c + e - 1)] + t7 * xf[_U(c + e)]
    dst[_U(db + e)] = v
    if top and bottom:
        for u in range(1, e):
            p0 = t0 * xf[_U(a + u - 1)] + t1 * xf[_U(a + u)] + t2 * xf[_U(a + u + 1)]
            p1 = t3 * xf[_U(b + u - 1)] + t4 * xf[_U(b + u)] + t5 * xf[_U(b + u + 1)]
            p2 = t6 * xf[_U(c + u - 1)] + t7 * xf[_U(c + u)] + t8 * xf[_U(c + u + 1)]
            dst[_U(db + u)] = start + (p0 + (p1 + p2))
    elif bottom:
        for u in range(1, e):
            p1 = t3 * xf[_U(b + u - 1)] + t4 * xf[_U(b + u)] + t5 * xf[_U(b + u + 1)]
            p2 = t6 * xf[_U(c + u - 1)] + t7 * xf[_U(c + u)] + t8 * xf[_U(c + u + 1)]
            dst[_U(db + u)] = start + (p1 + p2)
    elif top:
        for u in range(1, e):
            p0 = t0 * xf[_U(a + u - 1)] + t1 * xf[_U(a + u)] + t2 * xf[_U(a + u + 1)]
            p1 = t3 * xf[_U(b + u - 1)] + t4 * xf[_U(b + u)] + t5 * xf[_U(b + u + 1)]
            dst[_U(db + u)] = start + (p0 + p1)
    else:
        for u in range(1, e):
            dst[_U(db + u)] = start + (t3 * xf[_U(b + u - 1)] + t4 * xf[_U(b + u)] + t5 * xf[_U(b + u + 1)])


@njit(inline="always")
def _depthwise_plane(x, xf, w, bias, m0, mult, geometry, lo, hi, clamp, out, of, save, line, split, t,
                     job):  # pragma: no cover - compiled
    sh, sw, dh, dw, ph, pw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    tiles, kh, kw = w.shape[0], w.shape[1], w.shape[2]
    n = job // tiles
    mt = job % tiles
    m = m0 + mt
    ci = m // mult
    height, width = x.shape[2], x.shape[3]
    oh_count, ow_count = out.shape[2], out.shape[3]
    plane = oh_count * ow_count
    xb = (n * x.shape[1] + ci) * height * width
    ob = (n * out.shape[1] + m) * plane
    start = bias[m] if bias.size else np.float32(0.0)
    if (kh == 3 and kw == 3 and dh == 1 and dw == 1 and ph == 1 and pw == 1 and width > 1
            and (ow_count - 1) * sw < width and (oh_count - 1) * sh < height):
        # The common 3x3 / pad 1 case: each output row from its three input rows in one pass; with a
        # stride the row is computed at stride 1 into ``line`` and every ``sw``-th value kept.
        for i in range(3):
            for j in range(3):
                t[i * 3 + j] = w[mt, i, j]
        if sh == 1 and sw == 1 and height >= 3:
            _plane3x3(xf, xb, t, start, height, width, of, ob)
            if clamp:
                _clamp_run(of, ob, plane, lo, hi)
            return
        if sh == 2 and sw == 2 and split.size >= 2 * (height + 1) * (ow_count + 1):
            _plane3x3_s2(xf, xb, t, start, height, width, oh_count, ow_count, split, of, ob)
            if clamp:
                _clamp_run(of, ob, plane, lo, hi)
            return
        for oh in range(oh_count):
            ih = oh * sh
            b = xb + ih * width
            top = ih > 0
            bottom = ih + 1 < height
            if sw == 1:
                _row3x3(xf, b - width, b, b + width, top, bottom, t, start, width, of, ob + oh * ow_count)
            else:
                _row3x3(xf, b - width, b, b + width, top, bottom, t, start, width, line, 0)
                for ow in range(ow_count):
                    of[_U(ob + oh * ow_count + ow)] = line[ow * sw]
        if clamp:
            _clamp_run(of, ob, plane, lo, hi)
        return
    for p in range(plane):
        of[_U(ob + p)] = start
    if sh == 1 and sw == 1 and ow_count == width:
        # Unit strides and rows as wide as the input's: each tap is one multiply-add over the flat
        # plane (long vectorised loops); the columns a tap reaches across a row edge are saved before
        # and restored after it, so every output sums exactly its valid taps, in tap order.
        for i in range(kh):
            rshift = i * dh - ph
            oh_lo = max(0, -rshift)
            oh_hi = min(oh_count, height - rshift)
            if oh_lo >= oh_hi:
                continue
            for j in range(kw):
                t = w[mt, i, j]
                off = j * dw - pw
                shift = rshift * width + off
                ncol = min(abs(off), width)
                c0 = 0 if off < 0 else width - ncol
                for r in range(oh_lo, oh_hi):
                    for c in range(ncol):
                        save[(r - oh_lo) * ncol + c] = of[_U(ob + r * width + c0 + c)]
                p_lo = max(oh_lo * width, -shift)
                p_hi = min(oh_hi * width, height * width - shift)
                for p in range(p_lo, p_hi):
                    of[_U(ob + p)] += t * xf[_U(xb + p + shift)]
                for r in range(oh_lo, oh_hi):
                    for c in range(ncol):
                        of[_U(ob + r * width + c0 + c)] = save[(r - oh_lo) * ncol + c]
    else:
        # Row by row. With a column stride the row is computed at stride 1 (vectorised, ``sw`` times
        # the columns needed) into ``line``, then every ``sw``-th column is kept.
        span = (ow_count - 1) * sw + 1
        for oh in range(oh_count):
            orow = ob + oh * ow_count
            if sw > 1:
                for u in range(span):
                    line[u] = start
            for i in range(kh):
                ih = oh * sh + i * dh - ph
                if ih < 0 or ih >= height:
                    continue
                xrow = xb + ih * width
                for j in range(kw):
                    t = w[mt, i, j]
                    off = j * dw - pw
                    if sw == 1:
                        a, b = _valid(off, 1, width, ow_count)
                        for ow in range(a, b):
                            of[_U(orow + ow)] += t * xf[_U(xrow + ow + off)]
                    else:
                        a, b = _valid(off, 1, width, span)
                        for u in range(a, b):
                            line[_U(u)] += t * xf[_U(xrow + u + off)]
            if sw > 1:
                for ow in range(ow_count):
                    of[_U(orow + ow)] = line[ow * sw]
    if clamp:
        _clamp_run(of, ob, plane, lo, hi)


@njit(inline="always")
def _plane3x3(xf, xb, t, start, height, width, of, ob):  # pragma: no cover - compiled
    """The whole ``height x width`` plane (>= 3 rows) of a 3x3, pad 1, stride 1 depthwise
    convolution: rows 1 .. height-2 as one flat loop over the plane (each tap a fixed offset: long,
    vectorised runs even on 7- or 14-wide maps), whose first and last columns, which that loop
    reads across a row edge, are then redone; the first and last rows by :func:`_row3x3`."""
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]
    w = width
    a, b, c = xb - w, xb, xb + w
    for p in range(w + 1, (height - 1) * w - 1):
        p0 = t0 * xf[_U(a + p - 1)] + t1 * xf[_U(a + p)] + t2 * xf[_U(a + p + 1)]
        p1 = t3 * xf[_U(b + p - 1)] + t4 * xf[_U(b + p)] + t5 * xf[_U(b + p + 1)]
        p2 = t6 * xf[_U(c + p - 1)] + t7 * xf[_U(c + p)] + t8 * xf[_U(c + p + 1)]
        of[_U(ob + p)] = start + (p0 + (p1 + p2))
    e = w - 1
    for r in range(1, height - 1):
        a = xb + (r - 1) * w
        b = a + w
        c = b + w
        p0 = t1 * xf[_U(a)] + t2 * xf[_U(a + 1)]
        p1 = t4 * xf[_U(b)] + t5 * xf[_U(b + 1)]
        p2 = t7 * xf[_U(c)] + t8 * xf[_U(c + 1)]
        of[_U(ob + r * w)] = start + (p0 + (p1 + p2))
        p0 = t0 * xf[_U(a + e - 1)] + t1 * xf[_U(a + e)]
        p1 = t3 * xf[_U(b + e - 1)] + t4 * xf[_U(b + e)]
        p2 = t6 * xf[_U(c + e - 1)] + t7 * xf[_U(c + e)]
        of[_U(ob + r * w + e)] = start + (p0 + (p1 + p2))
    _row3x3(xf, xb - w, xb, xb + w, False, True, t, start, w, of, ob)
    last = xb + (height - 1) * w
    _row3x3(xf, last - w, last, last + w, True, False, t, start, w, of, ob + (height - 1) * w)


@njit(inline="always")
def _plane3x3_s2(xf, xb, t, start, height, width, oh_count, ow_count, split, of, ob):  # pragma: no cover
    """The plane of a 3x3, pad 1, stride 2 depthwise convolution. Every input row is first split
    into its even columns and its odd ones shifted by one (``split``: ``2 (height + 1) (ow_count + 1)``
    floats; zeros in the padding and in an extra row that stands for the rows above and below the
    input), so that each output row is one loop over contiguous runs: no stride-1 row computed and
    thinned, no strided loads in the sum."""
    span = ow_count + 1
    odd = (height + 1) * span                  # where the odd columns start in ``split``
    even_count = min(ow_count, (width + 1) // 2)
    odd_count = min(ow_count, width // 2)
    for r in range(height + 1):
        e = r * span
        o = odd + r * span
        split[_U(o)] = 0.0
        if r == height:                        # the zero row
            for u in range(span):
                split[_U(e + u)] = 0.0
                split[_U(o + u)] = 0.0
            continue
        src = xb + r * width
        for u in range(odd_count):
            split[_U(e + u)] = xf[_U(src + 2 * u)]
            split[_U(o + u + 1)] = xf[_U(src + 2 * u + 1)]
        for u in range(odd_count, ow_count):
            split[_U(e + u)] = xf[_U(src + 2 * u)] if u < even_count else np.float32(0.0)
            split[_U(o + u + 1)] = 0.0
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]
    for oh in range(oh_count):
        above = 2 * oh - 1 if oh > 0 else height
        below = 2 * oh + 1 if 2 * oh + 1 < height else height
        ea, eb, ec = above * span, 2 * oh * span, below * span
        oa, ob_, oc = odd + ea, odd + eb, odd + ec
        dst = ob + oh * ow_count
        for u in range(ow_count):
            p0 = t0 * split[_U(oa + u)] + t1 * split[_U(ea + u)] + t2 * split[_U(oa + u + 1)]
            p1 = t3 * split[_U(ob_ + u)] + t4 * split[_U(eb + u)] + t5 * split[_U(ob_ + u + 1)]
            p2 = t6 * split[_U(oc + u)] + t7 * split[_U(ec + u)] + t8 * split[_U(oc + u + 1)]
            of[_U(dst + u)] = start + (p0 + (p1 + p2))


@njit(inline="always")
def _clamped(v, lo, hi, clamp):  # pragma: no cover - compiled
    """``v`` clamped to [lo, hi] when ``clamp`` (NaN stays NaN, as ``np.clip``: compares, no min/max)."""
    if clamp:
        v = lo if v < lo else v
        v = hi if v > hi else v
    return v


@njit(inline="always")
def _clamp_run(of, start, count, lo, hi):  # pragma: no cover - compiled
    """Clamp ``of[start:start + count]`` to [lo, hi] in place."""
    for p in range(count):
        of[_U(start + p)] = _clamped(of[_U(start + p)], lo, hi, True)


@njit(inline="always")
def _transpose(src, s0, rows, cols, dst, d0):  # pragma: no cover - compiled
    """``dst[d0 + j * rows + i] = src[s0 + i * cols + j]``: a ``[rows, cols]`` block of a flat array
    transposed into another, by 8x8 tiles of vector shuffles (``_simd.transpose8x8``), a column of
    tiles at a time so that ``dst`` is written in order: 960 channels of 49 positions here, 0.65 ->
    0.24-0.27 ns a value (scalar 8x8 tiles, a row of tiles at a time, before)."""
    r8 = rows - rows % 8
    c8 = cols - cols % 8
    for j0 in range(0, c8, 8):
        for i0 in range(0, r8, 8):
            transpose8x8(src, s0 + i0 * cols + j0, cols, dst, d0 + j0 * rows + i0, rows)
    for i0 in range(0, r8, 8):
        for j in range(c8, cols):
            for i in range(8):
                dst[_U(d0 + j * rows + i0 + i)] = src[_U(s0 + (i0 + i) * cols + j)]
    for i in range(r8, rows):
        for j in range(cols):
            dst[_U(d0 + j * rows + i)] = src[_U(s0 + i * cols + j)]


@njit(inline="always")
def _depthwise_channels_last(x, w, bias, m0, geometry, lo, hi, clamp, out, n, c_lo, c_hi):  # pragma: no cover
    """Channels ``[c_lo, c_hi)`` of the tile for sample ``n``, through a channels-last copy: on small
    maps (7x7, 14x14) the per-plane loops are too short to vectorise, the loop over channels is not.
    One input channel per output channel (``mult`` 1). The copy ends with a row of zeros that taps
    outside the input read (the zero padding, as in the twin), so a 3x3 output is one pass over the
    channels with its nine taps unrolled; other kernels add one tap at a time. MobileNetV2's 576
    channels from 14x14 at stride 2, one core: 114 -> 70 us with the 8x8 transposes and the
    unrolled taps (onnxruntime, channel-blocked throughout: 20 us)."""
    sh, sw, dh, dw, ph, pw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    kh, kw = w.shape[1], w.shape[2]
    height, width = x.shape[2], x.shape[3]
    oh_count, ow_count = out.shape[2], out.shape[3]
    count = c_hi - c_lo
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    pin = height * width
    pout = oh_count * ow_count
    zero = pin * count                  # where the row of zeros starts in xt
    xt = np.empty(zero + count, np.float32)
    acc = np.empty(pout * count, np.float32)
    taps = np.empty(kh * kw * count, np.float32)
    start = np.empty(count, np.float32)
    for c in range(count):
        xt[_U(zero + c)] = 0.0
        start[c] = bias[m0 + c_lo + c] if bias.size else np.float32(0.0)
        for i in range(kh):
            for j in range(kw):
                taps[(i * kw + j) * count + c] = w[c_lo + c, i, j]
    _transpose(xf, (n * x.shape[1] + m0 + c_lo) * pin, count, pin, xt, 0)
    for oh in range(oh_count):
        for ow in range(ow_count):
            q = (oh * ow_count + ow) * count
            if kh == 3 and kw == 3:
                iw = ow * sw - pw
                s0 = _source(oh * sh - ph, iw, dw, height, width, count, zero)
                s1 = _source(oh * sh + dh - ph, iw, dw, height, width, count, zero)
                s2 = _source(oh * sh + 2 * dh - ph, iw, dw, height, width, count, zero)
                _nine_taps(xt, taps, start, s0, s1, s2, acc, q, count, lo, hi, clamp)
                continue
            for c in range(count):
                acc[_U(q + c)] = start[c]
            for i in range(kh):
                ih = oh * sh + i * dh - ph
                if ih < 0 or ih >= height:
                    continue
                for j in range(kw):
                    iw = ow * sw + j * dw - pw
                    if iw < 0 or iw >= width:
                        continue
                    tb = (i * kw + j) * count
                    sb = (ih * width + iw) * count
                    for c in range(count):
                        acc[_U(q + c)] += taps[_U(tb + c)] * xt[_U(sb + c)]
            if clamp:
                for c in range(count):
                    acc[_U(q + c)] = _clamped(acc[_U(q + c)], lo, hi, True)
    _transpose(acc, 0, pout, count, of, (n * out.shape[1] + m0 + c_lo) * pout)


@njit(inline="always")
def _offset(ih, iw, height, width, count, zero):  # pragma: no cover - compiled
    """Where input position ``(ih, iw)`` starts in the channels-last copy: the row of zeros outside."""
    return (ih * width + iw) * count if 0 <= ih < height and 0 <= iw < width else zero


@njit(inline="always")
def _source(ih, iw, dw, height, width, count, zero):  # pragma: no cover - compiled
    """The offsets the three taps of a 3x3 kernel row read: input row ``ih``, columns ``iw``,
    ``iw + dw`` and ``iw + 2 dw``."""
    return (_offset(ih, iw, height, width, count, zero), _offset(ih, iw + dw, height, width, count, zero),
            _offset(ih, iw + 2 * dw, height, width, count, zero))


@njit(inline="always")
def _nine_taps(xt, taps, start, s0, s1, s2, acc, q, count, lo, hi, clamp):  # pragma: no cover - compiled
    """``acc[q + c]`` for every channel ``c``: its start plus its nine taps times the values at the
    offsets ``s0`` (kernel row 0), ``s1``, ``s2``, summed by kernel rows as ``_plane3x3`` does, then
    clamped."""
    a0, a1, a2 = s0
    b0, b1, b2 = s1
    e0, e1, e2 = s2
    t1, t2, t3, t4, t5, t6, t7, t8 = count, 2 * count, 3 * count, 4 * count, 5 * count, 6 * count, 7 * count, 8 * count
    for c in range(count):
        p0 = taps[_U(c)] * xt[_U(a0 + c)] + taps[_U(t1 + c)] * xt[_U(a1 + c)] + taps[_U(t2 + c)] * xt[_U(a2 + c)]
        p1 = taps[_U(t3 + c)] * xt[_U(b0 + c)] + taps[_U(t4 + c)] * xt[_U(b1 + c)] + taps[_U(t5 + c)] * xt[_U(b2 + c)]
        p2 = taps[_U(t6 + c)] * xt[_U(e0 + c)] + taps[_U(t7 + c)] * xt[_U(e1 + c)] + taps[_U(t8 + c)] * xt[_U(e2 + c)]
        acc[_U(q + c)] = _clamped(start[c] + (p0 + (p1 + p2)), lo, hi, clamp)


#: Output maps up to this many positions take the channels-last depthwise loop: below it the
#: per-plane loops are too short to vectorise well, and the two transposes are cheap. One core here
#: (session 27, with the shuffled 8x8 transposes; channels-last against the per-plane loops, us):
#: 576 channels from 14x14 at stride 2 56 / 230, 960 on 7x7 77 / 199, 192 from 28x28 at stride 2
#: 66 / 132, 384 on 14x14 79 / 102, 96 on 16x16 33 / 35; 144 from 56x56 at stride 2 (784
#: positions) 384 / 256, so not there. (With scalar transposes unit-stride 3x3 maps took it only
#: up to 64 positions.)
CHANNELS_LAST_PLANE = 256


@njit(inline="always")
def _channels_last(mult, out):  # pragma: no cover - compiled
    return mult == 1 and out.shape[2] * out.shape[3] <= CHANNELS_LAST_PLANE


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def depthwise2d(x, w, bias, m0, mult, geometry, lo, hi, clamp, out):  # pragma: no cover - compiled
    """Output channels ``[m0, m0 + len(w))`` of a depthwise convolution of ``x [N, C, H, W]``.

    ``w [tile, kh, kw]``: float32 taps of those channels; ``bias`` float32 [M] or empty; channel
    ``m`` reads input channel ``m // mult``; ``geometry`` = (stride h, stride w, dilation h,
    dilation w, pad top, pad left); with ``clamp`` each output is clamped to [lo, hi] (NaN stays
    NaN, as ``np.clip``). ``out [N, M, OH, OW]`` float32, C-contiguous like ``x``. Each output is
    ``bias + tap_0 * x_0 + tap_1 * x_1 + ...`` over the taps inside the input.
    """
    if _channels_last(mult, out):
        for n in range(x.shape[0]):
            _depthwise_channels_last(x, w, bias, m0, geometry, lo, hi, clamp, out, n, 0, w.shape[0])
        return
    _depthwise_jobs(x, w, bias, m0, mult, geometry, lo, hi, clamp, out, 0, x.shape[0] * w.shape[0])


@njit(cache=True, nogil=True, parallel=True, fastmath=_CONTRACT)
def depthwise2d_par(x, w, bias, m0, mult, geometry, lo, hi, clamp, out):  # pragma: no cover - compiled
    if _channels_last(mult, out):
        tiles = w.shape[0]
        parts = max(1, min(tiles // 8, _PARTS))
        for t in prange(x.shape[0] * parts):
            n = t // parts
            k = t % parts
            _depthwise_channels_last(x, w, bias, m0, geometry, lo, hi, clamp, out, n, k * tiles // parts,
                                     (k + 1) * tiles // parts)
        return
    jobs = x.shape[0] * w.shape[0]
    parts = min(jobs, _PARTS)
    for t in prange(parts):
        _depthwise_jobs(x, w, bias, m0, mult, geometry, lo, hi, clamp, out, t * jobs // parts,
                        (t + 1) * jobs // parts)


@njit(inline="always")
def _depthwise_jobs(x, w, bias, m0, mult, geometry, lo, hi, clamp, out, first, last):  # pragma: no cover
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    save = np.empty(out.shape[2] * x.shape[3], np.float32)
    line = np.empty(max(x.shape[3], (out.shape[3] - 1) * geometry[1] + 1), np.float32)
    split = np.empty(2 * (x.shape[2] + 1) * (out.shape[3] + 1) if geometry[1] == 2 else 0, np.float32)
    t = np.empty(9, np.float32)     # a 3x3 plane's taps: allocated once, not per plane (~50 ns each)
    for job in range(first, last):
        _depthwise_plane(x, xf, w, bias, m0, mult, geometry, lo, hi, clamp, out, of, save, line, split, t, job)


@njit(inline="always")
def _zero_run(cf, start, count):  # pragma: no cover - compiled
    """``cf[start:start + count] = 0`` (nothing for a count <= 0)."""
    for u in range(count):
        cf[_U(start + u)] = 0.0


@njit(inline="always")
def _im2col_flat(xf, xb, cf, db0, tap_stride, kh, kw, dh, dw, ph, pw, r0, rows, height, width):  # pragma: no cover
    """Unit strides, rows as wide as the input's: each tap's block is the plane shifted, one flat copy
    (long, vectorised), then the columns the copy took across a row edge and the rows past the
    input are zeroed. Block of tap ``(i, j)`` at ``db0 + (i * kw + j) * tap_stride``."""
    for i in range(kh):
        di = r0 + i * dh - ph                 # input row of the block's first output row
        r_lo, r_hi = max(0, -di), max(0, min(rows, height - di))
        for j in range(kw):
            db = db0 + (i * kw + j) * tap_stride
            if r_lo >= r_hi:
                _zero_run(cf, db, rows * width)
                continue
            _zero_run(cf, db, r_lo * width)
            _zero_run(cf, db + r_hi * width, (rows - r_hi) * width)
            off = j * dw - pw
            shift = di * width + off
            # the flat copy stops where it would read before or past the plane: those are edge columns
            for p in range(max(r_lo * width, -shift), min(r_hi * width, height * width - shift)):
                cf[_U(db + p)] = xf[_U(xb + p + shift)]
            a, b = _valid(off, 1, width, width)
            for r in range(r_lo, r_hi):
                _zero_run(cf, db + r * width, a)
                _zero_run(cf, db + r * width + b, width - b)


@njit(inline="always")
def _im2col_plane(x, n0, c0, kh, kw, geometry, r0, cols, job):  # pragma: no cover - compiled
    sh, sw, dh, dw, ph, pw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    ow_count = geometry[6]
    cin = cols.shape[0] // (kh * kw)
    samples = cols.shape[1]
    nl = job // cin
    c = job % cin
    height, width = x.shape[2], x.shape[3]
    positions = cols.shape[2]
    rows = positions // ow_count
    xf = x.reshape(x.size)
    cf = cols.reshape(cols.size)
    xb = ((n0 + nl) * x.shape[1] + c0 + c) * height * width
    db0, tap_stride = (c * kh * kw * samples + nl) * positions, samples * positions
    if sh == 1 and sw == 1 and ow_count == width:
        _im2col_flat(xf, xb, cf, db0, tap_stride, kh, kw, dh, dw, ph, pw, r0, rows, height, width)
        return
    for i in range(kh):
        for j in range(kw):
            db = db0 + (i * kw + j) * tap_stride
            off = j * dw - pw
            a, b = _valid(off, sw, width, ow_count)
            for r in range(rows):
                ih = (r0 + r) * sh + i * dh - ph
                base = db + r * ow_count
                if ih < 0 or ih >= height:
                    for ow in range(ow_count):
                        cf[_U(base + ow)] = 0.0
                    continue
                xrow = xb + ih * width
                for ow in range(a):
                    cf[_U(base + ow)] = 0.0
                if sw == 1:
                    for ow in range(a, b):
                        cf[_U(base + ow)] = xf[_U(xrow + ow + off)]
                else:
                    for ow in range(a, b):
                        cf[_U(base + ow)] = xf[_U(xrow + ow * sw + off)]
                for ow in range(b, ow_count):
                    cf[_U(base + ow)] = 0.0


# Small maps: one table of every tap's offset in the input plane at every output position of the
# block (-1 in the padding), built once per call, then each (sample, channel) is one gather through it.
# Tap by tap and row by row, a row of the matrix cost ~12-25 ns of bookkeeping whatever its length.
# One core, one sample, 3x3 pad 1, kernel alone: 64 channels on 1x1 6.6 -> 1.0 us, 32 on 2x2 5.3 ->
# 1.1, 16 on 4x4 3.3 -> 1.3, 512 on 7x7 102 -> 49, 256 14 -> 7 (stride 2) 70 -> 26, 128 28 -> 14 74 ->
# 52; past these sizes the flat copies win (unit stride: 96 channels on 12x12 24 against 30 us) and
# so does the row path (strided: 16 channels 32 -> 16 12 against 13 us).
TAPS_FLAT = 128          # output positions per sample, unit strides and rows as wide as the input's
TAPS_STRIDED = 224       # output positions per sample, any other geometry


@njit(inline="always")
def by_taps(geometry, width, positions):  # pragma: no cover - compiled
    """Whether :func:`im2col2d` copies a block of ``positions`` outputs per sample through a table."""
    flat = geometry[0] == 1 and geometry[1] == 1 and geometry[6] == width
    return positions <= (TAPS_FLAT if flat else TAPS_STRIDED)


@njit(inline="always")
def _tap_offsets(kh, kw, geometry, r0, positions, height, width):  # pragma: no cover - compiled
    """Flat ``[kh*kw, positions]``: the input plane offset tap ``(i, j)`` reads at each output
    position of the block starting at output row ``r0``, or -1 where it falls in the padding."""
    sh, sw, dh, dw, ph, pw, ow_count = geometry
    taps = np.empty(kh * kw * positions, np.int64)
    for i in range(kh):
        for j in range(kw):
            t0 = (i * kw + j) * positions
            for r in range(positions // ow_count):
                ih = (r0 + r) * sh + i * dh - ph
                for ow in range(ow_count):
                    iw = ow * sw + j * dw - pw
                    inside = 0 <= ih < height and 0 <= iw < width
                    taps[t0 + r * ow_count + ow] = ih * width + iw if inside else -1
    return taps


@njit(inline="always")
def _im2col_gather(x, xf, n0, c0, taps, cols, cf, job):  # pragma: no cover - compiled
    """The rows ``(c, i, j)`` of sample ``job // cin``, channel ``c = job % cin``, through ``taps``
    (``xf``, ``cf``: ``x`` and ``cols`` flat, reshaped once per call: ~30 ns each)."""
    samples, positions = cols.shape[1], cols.shape[2]
    kprod = taps.size // positions
    cin = cols.shape[0] // kprod
    nl = job // cin
    c = job % cin
    xb = ((n0 + nl) * x.shape[1] + c0 + c) * x.shape[2] * x.shape[3]
    for t in range(kprod):
        db = ((c * kprod + t) * samples + nl) * positions
        tb = t * positions
        for p in range(positions):
            o = taps[tb + p]
            # read only inside the plane (a load then a select of max(o, 0): 512 on 7x7 47 -> 81 us)
            cf[_U(db + p)] = xf[_U(xb + o)] if o >= 0 else np.float32(0.0)


@njit(cache=True, nogil=True)
def im2col2d(x, n0, c0, kh, kw, geometry, r0, cols):  # pragma: no cover - compiled
    """``cols [cin*kh*kw, nb, rows*OW]`` for samples ``n0..``, channels ``c0..`` and output rows ``r0..``.

    ``x [N, C, H, W]`` C-contiguous; ``geometry`` = (stride h, stride w, dilation h, dilation w,
    pad top, pad left, OW). Row ``(c, i, j)`` holds tap ``(i, j)`` of channel ``c`` at every output
    position of every sample (zero where it falls in the padding): reshaped to
    ``[cin*kh*kw, nb*rows*OW]`` it is the matrix one product multiplies. Small blocks go through a
    table of tap offsets (:func:`by_taps`), others tap by tap.
    """
    jobs = cols.shape[1] * (cols.shape[0] // (kh * kw))
    # two loops, not one choosing per job: with both bodies inlined in one loop LLVM slowed them
    # (64 channels on 1x1 1.0 -> 4.1 us, 512 on 7x7 49 -> 75 us)
    if by_taps(geometry, x.shape[3], cols.shape[2]):
        taps = _tap_offsets(kh, kw, geometry, r0, cols.shape[2], x.shape[2], x.shape[3])
        xf, cf = x.reshape(x.size), cols.reshape(cols.size)
        for job in range(jobs):
            _im2col_gather(x, xf, n0, c0, taps, cols, cf, job)
        return
    for job in range(jobs):
        _im2col_plane(x, n0, c0, kh, kw, geometry, r0, cols, job)


@njit(cache=True, nogil=True, parallel=True)
def im2col2d_par(x, n0, c0, kh, kw, geometry, r0, cols):  # pragma: no cover - compiled
    jobs = cols.shape[1] * (cols.shape[0] // (kh * kw))
    if by_taps(geometry, x.shape[3], cols.shape[2]):
        taps = _tap_offsets(kh, kw, geometry, r0, cols.shape[2], x.shape[2], x.shape[3])
        xf, cf = x.reshape(x.size), cols.reshape(cols.size)
        for job in prange(jobs):
            _im2col_gather(x, xf, n0, c0, taps, cols, cf, job)
        return
    for job in prange(jobs):
        _im2col_plane(x, n0, c0, kh, kw, geometry, r0, cols, job)


@njit(inline="always")
def _bias_clamp_plane(y, bias, res, lo, hi, clamp, job):  # pragma: no cover - compiled
    m = job % y.shape[1]
    n = job // y.shape[1]
    row = y[n, m]
    if res.size:                # a residual Add fused: (y + bias) + res, as the Add after it would sum
        r = res[n, m]
        if bias.size:
            b = bias[m]
            for p in range(row.size):
                row[p] = _clamped(row[p] + b + r[p], lo, hi, clamp)
        else:
            for p in range(row.size):
                row[p] = _clamped(row[p] + r[p], lo, hi, clamp)
    elif bias.size:
        b = bias[m]
        for p in range(row.size):
            row[p] = _clamped(row[p] + b, lo, hi, clamp)
    elif clamp:
        for p in range(row.size):
            row[p] = _clamped(row[p], lo, hi, True)


@njit(cache=True, nogil=True)
def bias_clamp(y, bias, res, lo, hi, clamp):  # pragma: no cover - compiled
    """In place on ``y [N, M, P]``: ``y += bias[m]`` (``bias`` may be empty), ``y += res`` (a residual
    of ``y``'s shape, or empty), then clamp to [lo, hi]; one pass over each row."""
    for job in range(y.shape[0] * y.shape[1]):
        _bias_clamp_plane(y, bias, res, lo, hi, clamp, job)


@njit(cache=True, nogil=True, parallel=True)
def bias_clamp_par(y, bias, res, lo, hi, clamp):  # pragma: no cover - compiled
    for job in prange(y.shape[0] * y.shape[1]):
        _bias_clamp_plane(y, bias, res, lo, hi, clamp, job)


@njit(inline="always")
def _add_clamp_run(af, bf, lo, hi, of, start, stop):  # pragma: no cover - compiled
    for i in range(start, stop):
        of[_U(i)] = _clamped(af[_U(i)] + bf[_U(i)], lo, hi, True)


@njit(cache=True, nogil=True)
def add_clamp(a, b, lo, hi, out):  # pragma: no cover - compiled
    """``out = clamp(a + b, lo, hi)`` for three same-shape C-contiguous float32 arrays, in one pass:
    a residual Add with its Relu (numpy: the sum, then the clamp over it again; 800K values 404 ->
    114 us here, hot)."""
    _add_clamp_run(a.reshape(a.size), b.reshape(b.size), lo, hi, out.reshape(out.size), 0, out.size)


@njit(cache=True, nogil=True, parallel=True)
def add_clamp_par(a, b, lo, hi, out):  # pragma: no cover - compiled
    af, bf, of = a.reshape(a.size), b.reshape(b.size), out.reshape(out.size)
    for t in prange(_PARTS):
        _add_clamp_run(af, bf, lo, hi, of, t * of.size // _PARTS, (t + 1) * of.size // _PARTS)


# -- pointwise convolution from packed weights ------------------------------------------------------

@njit(cache=True, nogil=True)
def pack_pointwise(w):  # pragma: no cover - compiled
    """``[ceil(M / PACK), K, PACK]`` from ``w [M, K]``: each group of PACK rows with its column ``c``
    adjacent, as ``pointwise_tile`` reads them (zero rows pad the last group)."""
    m, k = w.shape
    packed = np.zeros(((m + PACK - 1) // PACK, k, PACK), np.float32)
    for r in range(m):
        for c in range(k):
            packed[r // PACK, c, r % PACK] = w[r, c]
    return packed


@njit(inline="always")
def _chunk(k0, k, epilogue):  # pragma: no cover - compiled
    """``(depth, flags)`` of the input channels from ``k0``: ``_POINTWISE_DEPTH`` of them (fewer at the
    end), summed onto the previous chunks' stored sums (flag 8) from the second on, ``epilogue`` with
    the last."""
    depth = min(_POINTWISE_DEPTH, k - k0)
    return depth, (8 if k0 else 0) | (epilogue if k0 + depth == k else 0)


@njit(inline="always")
def _pointwise_rows(wf, xf, k, n, m, bias, rf, lo, hi, flags, of, t, p0, p1):  # pragma: no cover - compiled
    """Output channels ``t * PACK`` on, positions ``p0..p1`` (whole tiles of LANES), input channels a
    chunk at a time (``_chunk``)."""
    c0 = t * PACK
    rows = min(PACK, m - c0)
    for k0 in range(0, k, _POINTWISE_DEPTH):
        depth, chunk = _chunk(k0, k, flags)
        for p in range(p0, p1, LANES):
            pointwise_tile(wf, c0 * k + k0 * PACK, xf, k0 * n + p, n, depth, of, c0 * n + p, n, rows, bias, c0,
                           rf, lo, hi, chunk)


@njit(inline="always")
def _pointwise_tail(wf, xt, k, n, full, m, bias, rf, lo, hi, flags, of, t):  # pragma: no cover - compiled
    """Output channels ``t * PACK`` on, the positions from ``full`` (fewer than LANES): from ``xt``
    (those columns of ``x``, zero-padded to LANES) into a scratch tile, COLUMNS positions at a time
    (``pointwise_column``; ``xt`` is compact, so all input channels in one pass), then finished and
    copied."""
    c0 = t * PACK
    rows = min(PACK, m - c0)
    scratch = np.empty(PACK * LANES, np.float32)
    for s in range(0, n - full, COLUMNS):
        pointwise_column(wf, c0 * k, xt, s, LANES, k, scratch, s, LANES, rows, bias if flags & 1 else bias[:0], c0)
    _store_scratch(scratch, rows, n - full, rf, lo, hi, flags, of, c0 * n + full, n)


@njit(inline="always")
def _store_scratch(scratch, rows, count, rf, lo, hi, flags, of, o0, ldo):  # pragma: no cover - compiled
    """The first ``count`` columns of a scratch tile's ``rows`` rows (LANES apart) into ``of`` from
    ``o0`` (rows ``ldo`` apart), the residual ``rf`` (laid out as ``of``) added with flag 2 and the
    clamp applied with flag 4: a partial tile's epilogue."""
    for i in range(rows):
        at = o0 + i * ldo
        for j in range(count):
            v = scratch[i * LANES + j]
            if flags & 2:
                v += rf[at + j]
            of[at + j] = _clamped(v, lo, hi, flags & 4 != 0)


@njit(inline="always")
def _pointwise_setup(packed, x, res, out):  # pragma: no cover - compiled
    """Flat views, the tail columns of ``x`` zero-padded to LANES (``[K * LANES]``, empty when the
    positions are whole tiles), the positions of a block, the positions in whole tiles, the jobs over
    them and all the jobs (see ``pointwise``)."""
    k, n = x.shape
    full = n - n % LANES
    xt = np.zeros(k * LANES if full < n else 0, np.float32)
    for c in range(k if full < n else 0):
        for j in range(n - full):
            xt[c * LANES + j] = x[c, full + j]
    block = max(LANES, _POINTWISE_BLOCK // (4 * k) // LANES * LANES)
    tiles = packed.shape[0]
    whole = (full + block - 1) // block * tiles
    flat = packed.reshape(packed.size), x.reshape(x.size), res.reshape(res.size), out.reshape(out.size)
    return flat + (xt, block, full, whole, whole + (tiles if full < n else 0))


@njit(inline="always")
def _pointwise_job(packed, x, bias, res, lo, hi, flags, out, views, job):  # pragma: no cover - compiled
    """Job ``job`` of ``pointwise``: a block of positions for a tile of output channels, blocks first
    (so one thread's jobs read a block's input columns while they are in L2), then the tail tiles."""
    wf, xf, rf, of, xt, block, full, whole, _ = views
    k, n = x.shape
    m, tiles = out.shape[0], packed.shape[0]
    if job < whole:
        p0 = job // tiles * block
        _pointwise_rows(wf, xf, k, n, m, bias, rf, lo, hi, flags, of, job % tiles, p0, min(p0 + block, full))
    else:
        _pointwise_tail(wf, xt, k, n, full, m, bias, rf, lo, hi, flags, of, job - whole)


@njit(cache=True, nogil=True)
def pointwise(packed, x, bias, res, lo, hi, flags, out):  # pragma: no cover - compiled
    """``out [M, P]`` = ``W @ x`` for ``x [K, P]`` (one sample's 1x1 convolution input or im2col
    matrix) and the weight ``W [M, K]`` packed as ``pack_pointwise`` gives it, then with ``flags`` 1
    the bias added, 2 the residual ``res [M, P]``, 4 clamped to [lo, hi] (``_simd.pointwise_tile``).
    Positions go in blocks whose columns of ``x`` stay in L2 while every tile of output channels reads
    them; each tile sums ``_POINTWISE_DEPTH`` input channels at a time."""
    views = _pointwise_setup(packed, x, res, out)
    for job in range(views[-1]):
        _pointwise_job(packed, x, bias, res, lo, hi, flags, out, views, job)


@njit(cache=True, nogil=True, parallel=True)
def pointwise_par(packed, x, bias, res, lo, hi, flags, out):  # pragma: no cover - compiled
    views = _pointwise_setup(packed, x, res, out)
    for job in prange(views[-1]):
        _pointwise_job(packed, x, bias, res, lo, hi, flags, out, views, job)


# -- convolution of one sample in register tiles, the input read in place -----------------------------

@njit(inline="always")
def _conv_tiles_setup(packed, x, geometry, kh, kw, out):  # pragma: no cover - compiled
    """``(wf, xs, offs, span, tiles_w, of, jobs)``: the packed weight flat; sample 0's columns split by
    the column stride into ``sw`` planes per channel (``xs``: plane ``(c, p)`` holds the padded input's
    columns ``p, p + sw, ...`` of the rows the output reads, ``span`` of them, zeros for the padding);
    ``offs`` where the row of tap ``(c, i, j)`` (a row of the im2col matrix, in its order) starts for
    output position (0, 0); the tiles of LANES positions a row of the output takes; the output flat;
    the jobs (output rows x tiles of output channels). Output position ``(oh, ow)`` of a tap is then
    ``xs[oh * sh * span + ow + offs[tap]]``: LANES adjacent outputs read LANES adjacent values
    whatever the strides and dilations."""
    sh, sw, dh, dw, pt, pl = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    cin, height, width = x.shape[1], x.shape[2], x.shape[3]
    oh_count, ow_count = out.shape[2], out.shape[3]
    tiles_w = (ow_count + LANES - 1) // LANES
    rows = (oh_count - 1) * sh + (kh - 1) * dh + 1
    span = tiles_w * LANES + (kw - 1) * dw // sw
    plane = rows * span
    xf = x.reshape(x.size)
    xs = np.zeros(cin * sw * plane, np.float32)
    for c in range(cin):
        for r in range(max(0, pt), min(rows, height + pt)):
            src = (c * height + r - pt) * width
            for p in range(sw):
                dst = (c * sw + p) * plane + r * span
                u0 = max(0, (pl - p + sw - 1) // sw)           # the first column inside the input
                u1 = min(span, (width + pl - p + sw - 1) // sw)
                for u in range(u0, u1):
                    xs[_U(dst + u)] = xf[_U(src + u * sw + p - pl)]
    offs = np.empty(cin * kh * kw, np.int64)
    for c in range(cin):
        for i in range(kh):
            for j in range(kw):
                offs[(c * kh + i) * kw + j] = (c * sw + j * dw % sw) * plane + i * dh * span + j * dw // sw
    return packed.reshape(packed.size), xs, offs, span, tiles_w, out.reshape(out.size), oh_count * packed.shape[0]


@njit(inline="always")
def _conv_tiles_job(views, sh, bias, rf, lo, hi, flags, out, job):  # pragma: no cover - compiled
    """Job ``job`` of ``conv_tiles``: output row ``job // tiles`` for the tile ``job % tiles`` of PACK
    output channels, whole tiles of positions straight into the output, a row's last partial one
    through a scratch tile."""
    wf, xs, offs, span, tiles_w, of, _ = views
    m, oh_count, ow_count = out.shape[1], out.shape[2], out.shape[3]
    tiles = (m + PACK - 1) // PACK
    oh, t = job // tiles, job % tiles
    c0 = t * PACK
    rows = min(PACK, m - c0)
    k = offs.size
    plane_out = oh_count * ow_count
    for tw in range(tiles_w):
        ow0 = tw * LANES
        x0 = oh * sh * span + ow0
        o0 = c0 * plane_out + oh * ow_count + ow0
        if ow0 + LANES <= ow_count:
            conv_tile(wf, c0 * k, xs, x0, offs, k, of, o0, plane_out, rows, bias, c0, rf, lo, hi, flags)
            continue
        scratch = np.empty(PACK * LANES, np.float32)
        conv_tile(wf, c0 * k, xs, x0, offs, k, scratch, 0, LANES, rows, bias, c0, scratch, lo, hi, flags & 1)
        _store_scratch(scratch, rows, ow_count - ow0, rf, lo, hi, flags, of, o0, plane_out)


@njit(cache=True, nogil=True)
def conv_tiles(packed, x, bias, res, geometry, kh, kw, lo, hi, flags, out):  # pragma: no cover - compiled
    """``out [1, M, OH, OW]``: the convolution of one sample ``x [1, C, H, W]`` by the weight packed as
    ``pack_pointwise`` gives it from ``w [M, C * kh * kw]``, in register tiles (``_simd.conv_tile``)
    that read the input in place, not an im2col matrix; ``geometry`` = (stride h, stride w, dilation
    h, dilation w, pad top, pad left, ...: any more are not read); ``flags`` as ``pointwise``'s (1
    bias, 2 the residual ``res``: flat, laid out as ``out``, 4 clamp to [lo, hi]). numpy twin: the
    im2col product."""
    views = _conv_tiles_setup(packed, x, geometry, kh, kw, out)
    for job in range(views[-1]):
        _conv_tiles_job(views, geometry[0], bias, res, lo, hi, flags, out, job)


@njit(cache=True, nogil=True, parallel=True)
def conv_tiles_par(packed, x, bias, res, geometry, kh, kw, lo, hi, flags, out):  # pragma: no cover - compiled
    views = _conv_tiles_setup(packed, x, geometry, kh, kw, out)
    for job in prange(views[-1]):
        _conv_tiles_job(views, geometry[0], bias, res, lo, hi, flags, out, job)


# -- Winograd F(2x2, 3x3) transforms (see runtime/winograd.py) -------------------------------------

@njit(inline="always")
def _winograd_input_plane(x, ph, pw, r0, r1, th, tw, rows, cols, v, c):  # pragma: no cover - compiled
    """``v[:, c, :]`` for tile rows ``[r0, r1)``: each 4x4 input patch ``d`` (stride 2, zeros in the
    padding) becomes ``B^T d B``. The row half of the transform runs over whole padded rows (long,
    vectorised loops), the column half per tile."""
    height, width = x.shape[2], x.shape[3]
    span = rows.shape[1]
    xf = x.reshape(x.size)
    vf = v.reshape(v.size)
    plane = v.shape[1] * v.shape[2]       # stride of the 16 elements of a tile in v
    lo = max(0, pw)
    hi = min(span, width + pw)
    for q in range(r0, r1):
        n = q // th
        i = q - n * th
        base = (n * x.shape[1] + c) * height * width
        for a in range(4):
            ih = 2 * i - ph + a
            for u in range(span):
                rows[a, u] = 0.0
            if 0 <= ih < height:
                src = base + ih * width - pw
                for u in range(lo, hi):
                    rows[a, u] = xf[_U(src + u)]
        half = tw + 1
        for h in range(2):         # B^T d, column by column, even and odd columns apart
            for u in range(half):
                d0, d1, d2, d3 = rows[0, 2 * u + h], rows[1, 2 * u + h], rows[2, 2 * u + h], rows[3, 2 * u + h]
                cols[h, 0, u] = d0 - d2
                cols[h, 1, u] = d1 + d2
                cols[h, 2, u] = d2 - d1
                cols[h, 3, u] = d1 - d3
        dst = c * v.shape[2] + (q - r0) * tw
        for a in range(4):         # (B^T d) B: tile j covers columns 2j..2j+3
            ev = cols[0, a]
            od = cols[1, a]
            e0 = vf[dst + 4 * a * plane:dst + 4 * a * plane + tw]
            e1 = vf[dst + (4 * a + 1) * plane:dst + (4 * a + 1) * plane + tw]
            e2 = vf[dst + (4 * a + 2) * plane:dst + (4 * a + 2) * plane + tw]
            e3 = vf[dst + (4 * a + 3) * plane:dst + (4 * a + 3) * plane + tw]
            for j in range(tw):
                t0, t1, t2, t3 = ev[j], od[j], ev[j + 1], od[j + 1]
                e0[j] = t0 - t2
                e1[j] = t1 + t2
                e2[j] = t2 - t1
                e3[j] = t1 - t3


@njit(cache=True, nogil=True)
def winograd_input(x, ph, pw, r0, r1, th, v):  # pragma: no cover - compiled
    """``v [16, C, (r1 - r0) * tw]``: the Winograd-domain input of tile rows ``[r0, r1)``.

    ``x [N, C, H, W]`` float32, C-contiguous; tile row ``q`` is sample ``q // th``, output rows
    ``2 * (q % th)`` and the next; ``(ph, pw)`` the top and left pads. Element ``4a + b`` of a tile is
    entry ``(a, b)`` of ``B^T d B``.
    """
    tw = v.shape[2] // max(1, r1 - r0)
    rows = np.empty((4, 2 * tw + 2), np.float32)
    cols = np.empty((2, 4, tw + 1), np.float32)
    for c in range(x.shape[1]):
        _winograd_input_plane(x, ph, pw, r0, r1, th, tw, rows, cols, v, c)


@njit(cache=True, nogil=True, parallel=True)
def winograd_input_par(x, ph, pw, r0, r1, th, v):  # pragma: no cover - compiled
    tw = v.shape[2] // max(1, r1 - r0)
    for c in prange(x.shape[1]):
        rows = np.empty((4, 2 * tw + 2), np.float32)
        cols = np.empty((2, 4, tw + 1), np.float32)
        _winograd_input_plane(x, ph, pw, r0, r1, th, tw, rows, cols, v, c)


@njit(inline="always")
def _winograd_output_plane(m, bias, res, lo, hi, clamp, r0, r1, th, k0, out, line, sums, k):  # pragma: no cover
    tw = m.shape[2] // max(1, r1 - r0)
    oh_count, ow_count = out.shape[2], out.shape[3]
    mf = m.reshape(m.size)
    of = out.reshape(out.size)
    rf = res.reshape(res.size)
    plane = m.shape[1] * m.shape[2]
    b = bias[k0 + k] if bias.size else np.float32(0.0)
    early = clamp and not res.size     # with a residual the clamp follows its sum
    for q in range(r0, r1):
        n = q // th
        i = q - n * th
        src = k * m.shape[2] + (q - r0) * tw
        for c in range(4):         # A^T M, column c of every tile of the row: long loops
            o0 = src + c * plane
            o1 = o0 + 4 * plane
            o2 = o1 + 4 * plane
            o3 = o2 + 4 * plane
            for j in range(tw):
                m1 = mf[_U(o1 + j)]
                m2 = mf[_U(o2 + j)]
                sums[c, j] = mf[_U(o0 + j)] + m1 + m2
                sums[4 + c, j] = m1 - m2 - mf[_U(o3 + j)]
        for r in range(2):         # (A^T M) A, the bias and the clamp: two rows of 2 * tw outputs
            for j in range(tw):
                s0, s1, s2, s3 = sums[4 * r, j], sums[4 * r + 1, j], sums[4 * r + 2, j], sums[4 * r + 3, j]
                line[r, 2 * j] = _clamped(b + (s0 + s1 + s2), lo, hi, early)
                line[r, 2 * j + 1] = _clamped(b + (s1 - s2 - s3), lo, hi, early)
        for a in range(min(2, oh_count - 2 * i)):     # the last row/column of a tile may lie past the edge
            dst = ((n * out.shape[1] + k0 + k) * oh_count + 2 * i + a) * ow_count
            if res.size:
                for u in range(ow_count):
                    of[_U(dst + u)] = _clamped(line[a, u] + rf[_U(dst + u)], lo, hi, clamp)
            else:
                for u in range(ow_count):
                    of[_U(dst + u)] = line[a, u]


@njit(cache=True, nogil=True)
def winograd_output(m, bias, res, lo, hi, clamp, r0, r1, th, k0, out):  # pragma: no cover - compiled
    """Output tile rows ``[r0, r1)`` of channels ``[k0, k0 + K)`` of ``out [N, M, OH, OW]`` from the
    Winograd-domain products ``m [16, K, (r1 - r0) * tw]``: ``A^T M A`` per tile, ``+ bias`` (may be
    empty), ``+ res`` (a residual of ``out``'s shape, or empty), then clamped to [lo, hi] when
    ``clamp``; the last row/column of a tile is dropped past the edge."""
    tw = m.shape[2] // max(1, r1 - r0)
    line = np.empty((2, 2 * tw), np.float32)
    sums = np.empty((8, tw), np.float32)
    for k in range(m.shape[1]):
        _winograd_output_plane(m, bias, res, lo, hi, clamp, r0, r1, th, k0, out, line, sums, k)


@njit(cache=True, nogil=True, parallel=True)
def winograd_output_par(m, bias, res, lo, hi, clamp, r0, r1, th, k0, out):  # pragma: no cover - compiled
    for k in prange(m.shape[1]):
        tw = m.shape[2] // max(1, r1 - r0)
        line = np.empty((2, 2 * tw), np.float32)
        sums = np.empty((8, tw), np.float32)
        _winograd_output_plane(m, bias, res, lo, hi, clamp, r0, r1, th, k0, out, line, sums, k)


@njit(inline="always")
def _winograd_kernel(w, u, job):  # pragma: no cover - compiled
    k = job // w.shape[1]
    c = job - k * w.shape[1]
    for a in range(4):             # row a of G g
        if a == 0:
            r0, r1, r2 = w[k, c, 0, 0], w[k, c, 0, 1], w[k, c, 0, 2]
        elif a == 3:
            r0, r1, r2 = w[k, c, 2, 0], w[k, c, 2, 1], w[k, c, 2, 2]
        else:
            sign = np.float32(1.0) if a == 1 else np.float32(-1.0)
            r0 = np.float32(0.5) * (w[k, c, 0, 0] + sign * w[k, c, 1, 0] + w[k, c, 2, 0])
            r1 = np.float32(0.5) * (w[k, c, 0, 1] + sign * w[k, c, 1, 1] + w[k, c, 2, 1])
            r2 = np.float32(0.5) * (w[k, c, 0, 2] + sign * w[k, c, 1, 2] + w[k, c, 2, 2])
        u[4 * a, k, c] = r0          # (G g) G^T
        u[4 * a + 1, k, c] = np.float32(0.5) * (r0 + r1 + r2)
        u[4 * a + 2, k, c] = np.float32(0.5) * (r0 - r1 + r2)
        u[4 * a + 3, k, c] = r2


@njit(cache=True, nogil=True)
def winograd_weights(w, u):  # pragma: no cover - compiled
    """``u [16, K, C]``: ``G g G^T`` of every 3x3 kernel ``g`` of ``w [K, C, 3, 3]`` (element ``4a + b``)."""
    for job in range(w.shape[0] * w.shape[1]):
        _winograd_kernel(w, u, job)


@njit(cache=True, nogil=True, parallel=True)
def winograd_weights_par(w, u):  # pragma: no cover - compiled
    for job in prange(w.shape[0] * w.shape[1]):
        _winograd_kernel(w, u, job)


# -- max pooling -----------------------------------------------------------------------------------

@njit(inline="always")
def _max(m, v):  # pragma: no cover - compiled
    """``np.maximum``'s rule (NaN wins), as selects: no branch on the data."""
    t = v if v > m else m
    return v if v != v else t


@njit(inline="always")
def _bigger(m, v):  # pragma: no cover - compiled
    """The larger of two values neither of which is NaN (one comparison: ``maxps``)."""
    return v if v > m else m


@njit(inline="always")
def _pool_line(line, kw, sw, dw, of, d, count):  # pragma: no cover - compiled
    """``of[d + ow]`` for ``ow < count`` = the max of ``line`` (a row with its pads, no NaN in it)
    over the ``kw`` taps of column ``ow``. 2 and 3 taps at stride 2 (the pools of ResNet, LeNet, VGG
    and YOLO) are written out with a constant stride, which LLVM vectorises."""
    if kw == 3 and sw == 2 and dw == 1:
        for o in range(count):
            of[_U(d + o)] = _bigger(_bigger(line[_U(2 * o)], line[_U(2 * o + 1)]), line[_U(2 * o + 2)])
    elif kw == 2 and sw == 2 and dw == 1:
        for o in range(count):
            of[_U(d + o)] = _bigger(line[_U(2 * o)], line[_U(2 * o + 1)])
    else:
        for o in range(count):
            m = line[_U(o * sw)]
            for j in range(1, kw):
                m = _bigger(m, line[_U(o * sw + j * dw)])
            of[_U(d + o)] = m


@njit(inline="always")
def _pool_plane(x, xf, kh, kw, geometry, out, of, line, job):  # pragma: no cover - compiled
    """Plane ``job`` (sample, channel), one output row at a time: the max of the window's input rows
    (contiguous, vectorised; two or three rows in one pass) into the middle of ``line``, whose pads
    hold -inf (as the numpy twin pads), then the max along it (:func:`_pool_line`). Rows first would
    do the strided pass on every input row, twice the work at stride 2 (0.45 ms against 0.3 for 64
    channels of 112x112). The rows by ``np.maximum``'s rule, the strided pass by plain comparisons:
    True when the rows held a NaN, and the plane is then done again by :func:`_pool_plane_nan`."""
    sh, sw, dh, dw, ph, pw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    height, width = x.shape[2], x.shape[3]
    base = job * height * width
    count = out.shape[3]
    nan = False
    for oh in range(out.shape[2]):
        i0 = 0                                  # the window's rows inside the plane: i0 .. i1 - 1
        while i0 < kh and oh * sh + i0 * dh - ph < 0:
            i0 += 1
        i1 = kh
        while i1 > i0 and oh * sh + (i1 - 1) * dh - ph >= height:
            i1 -= 1
        r = base + (oh * sh + i0 * dh - ph) * width     # its first row's offset
        step = dh * width
        if i1 - i0 == 2:
            for u in range(width):
                v = _max(xf[_U(r + u)], xf[_U(r + step + u)])
                line[_U(pw + u)] = v
                nan |= v != v
        elif i1 - i0 == 3:
            for u in range(width):
                v = _max(_max(xf[_U(r + u)], xf[_U(r + step + u)]), xf[_U(r + 2 * step + u)])
                line[_U(pw + u)] = v
                nan |= v != v
        else:                                   # one row, four or more, or none (-inf: all padding)
            for u in range(width):
                line[_U(pw + u)] = xf[_U(r + u)] if i1 > i0 else -np.inf
            for i in range(1, i1 - i0):
                for u in range(width):
                    line[_U(pw + u)] = _max(line[_U(pw + u)], xf[_U(r + i * step + u)])
            for u in range(width):
                nan |= line[_U(pw + u)] != line[_U(pw + u)]
        _pool_line(line, kw, sw, dw, of, (job * out.shape[2] + oh) * count, count)
    return nan


@njit(nogil=True)
def _pool_plane_nan(x, kh, kw, geometry, out, line, job):  # pragma: no cover - compiled
    """:func:`_pool_plane` for a plane with a NaN in it, by ``np.maximum``'s rule throughout, tap by
    tap (a call of its own: inlined beside the fast loops, this rare case slowed them 1.6-3x)."""
    sh, sw, dh, dw, ph, pw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    n = job // x.shape[1]
    c = job - n * x.shape[1]
    height, width = x.shape[2], x.shape[3]
    for oh in range(out.shape[2]):
        first = True
        for i in range(kh):
            ih = oh * sh + i * dh - ph
            if ih < 0 or ih >= height:
                continue
            src = x[n, c, ih]
            if first:
                for u in range(width):
                    line[_U(pw + u)] = src[_U(u)]
                first = False
            else:
                for u in range(width):
                    line[_U(pw + u)] = _max(line[_U(pw + u)], src[_U(u)])
        if first:                            # every tap in the padding
            for u in range(width):
                line[_U(pw + u)] = -np.inf
        dst = out[n, c, oh]
        for o in range(dst.size):
            m = line[_U(o * sw)]
            for j in range(1, kw):
                m = _max(m, line[_U(o * sw + j * dw)])
            dst[_U(o)] = m


@njit(inline="always")
def _pool_line_buffer(x, kw, geometry, out):  # pragma: no cover - compiled
    """A row with its pads: the left pad, the row, and as far right as the last window reaches. The
    pads hold -inf from here on: the planes write the row between them only."""
    reach = (out.shape[3] - 1) * geometry[1] + (kw - 1) * geometry[3] + 1
    return np.full(max(x.shape[3] + geometry[5], reach), -np.inf, np.float32)


@njit(cache=True, nogil=True)
def max_pool2d(x, kh, kw, geometry, out):  # pragma: no cover - compiled
    """Max pooling of ``x [N, C, H, W]`` (float32, C-contiguous) into ``out [N, C, OH, OW]``;
    ``geometry`` = (stride h, stride w, dilation h, dilation w, pad top, pad left). The padding never
    wins (-inf where a window holds nothing else), NaN does, as in the numpy twin
    (``ops.nn.max_pool``)."""
    line = _pool_line_buffer(x, kw, geometry, out)
    xf, of = x.reshape(x.size), out.reshape(out.size)
    for job in range(x.shape[0] * x.shape[1]):
        if _pool_plane(x, xf, kh, kw, geometry, out, of, line, job):
            _pool_plane_nan(x, kh, kw, geometry, out, line, job)


@njit(cache=True, nogil=True, parallel=True)
def max_pool2d_par(x, kh, kw, geometry, out):  # pragma: no cover - compiled
    jobs = x.shape[0] * x.shape[1]
    parts = min(jobs, _PARTS)
    for t in prange(parts):
        line = _pool_line_buffer(x, kw, geometry, out)
        xf, of = x.reshape(x.size), out.reshape(out.size)
        for job in range(t * jobs // parts, (t + 1) * jobs // parts):
            if _pool_plane(x, xf, kh, kw, geometry, out, of, line, job):
                _pool_plane_nan(x, kh, kw, geometry, out, line, job)


@njit(cache=True, nogil=True, error_model="numpy")
def softmax_rows(x, out):  # pragma: no cover - compiled
    """``out[r] = exp(x[r] - max) / sum`` for each row of a C-contiguous float32 ``x [rows, n]``, ``n``
    >= 1: one call where numpy makes six (the Softmax op on a [1, 2] head 7.8 -> 2.9 us here; its exp
    is scalar, so only small inputs come here: ``ops.nn.SOFTMAX_COMPILED``). The sum is float64; a NaN
    in a row makes the whole row NaN, as in numpy (its ``exp`` makes the sum NaN)."""
    for r in range(x.shape[0]):
        xr = x[r]
        orow = out[r]
        m = xr[0]
        for i in range(1, xr.size):
            m = xr[i] if xr[i] > m else m
        total = 0.0
        for i in range(xr.size):
            e = np.exp(xr[i] - m)
            orow[i] = e
            total += e
        scale = np.float32(total)
        for i in range(xr.size):
            orow[i] = orow[i] / scale
