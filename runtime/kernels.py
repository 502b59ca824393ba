"""Kernels: the only code that computes with weights.

Operators never call numpy on a weight input (a Gemm/MatMul ``B``, a Conv ``W``, an LSTM ``W``/``R``,
an embedding table) because on the device it may be an *indexed weight*: a per-layer codebook of
centroids plus the indices of the shared weights, never expanded into a dense float array. They use
the weight's ``shape``/``ndim``/``dtype``, leading-axis indexing (``w[i]``, ``w[a:b]``),
``w.reshape(rows, -1)`` (which merges the trailing axes), and the functions below:

* ``matmul(x, w)``   = ``x @ w``   for a 2-D weight ``[K, N]`` (``x`` may be N-D: its last axis is
  contracted)
* ``matmul_t(x, w)`` = ``x @ w.T`` for a 2-D weight ``[N, K]``
* ``take_rows(w, idx)`` = ``w[idx]`` (embedding lookup along axis 0)
* ``dense(w)``       = the weight as a float ``np.ndarray`` (fallback for anything else)

Here they are written for ``np.ndarray`` weights; a weight of another kind is handed to its own
method of the same name when it has one (``w.matmul(x)``, ``w.matmul_t(x)``, ``w.take_rows(idx)``,
``w.dense()``), else expanded with ``dense``. ``conv`` and ``conv_transpose`` are built on
``matmul_t``/``matmul`` (im2col / col2im), so they work for any weight kind.
"""
from __future__ import annotations

import itertools
from typing import Any, List, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Weight = Any  # np.ndarray or an indexed weight

#: Upper bound on the bytes of one im2col block: big enough for BLAS to be efficient, small enough
#: that a large image never needs its whole (k*k times larger) im2col matrix in memory at once.
IM2COL_BLOCK_BYTES = 16 << 20


def dense(w: Weight) -> np.ndarray:
    """Return ``w`` as an ``np.ndarray`` (expanding an indexed weight)."""
    if isinstance(w, np.ndarray):
        return w
    expand = getattr(w, "dense", None)
    return expand() if expand is not None else np.asarray(w)


def matmul(x: np.ndarray, w: Weight) -> np.ndarray:
    """``x @ w`` for a 2-D weight ``w`` of shape ``[K, N]``; ``x`` is ``[..., K]``."""
    if isinstance(w, np.ndarray):
        return np.matmul(x, w)
    own = getattr(w, "matmul", None)
    return own(x) if own is not None else np.matmul(x, dense(w))


def matmul_t(x: np.ndarray, w: Weight) -> np.ndarray:
    """``x @ w.T`` for a 2-D weight ``w`` of shape ``[N, K]``; ``x`` is ``[..., K]``."""
    if isinstance(w, np.ndarray):
        return np.matmul(x, w.T)
    own = getattr(w, "matmul_t", None)
    return own(x) if own is not None else np.matmul(x, dense(w).T)


def take_rows(w: Weight, idx: np.ndarray) -> np.ndarray:
    """``w[idx]`` along axis 0 (``idx`` already non-negative, any shape): an embedding lookup."""
    if isinstance(w, np.ndarray):
        return np.take(w, idx, axis=0)
    own = getattr(w, "take_rows", None)
    return own(idx) if own is not None else np.take(dense(w), idx, axis=0)


# ---------------------------------------------------------------------------------------------
# Convolution


def _blocks(batch: int, rows: int, row_bytes: int) -> List[Tuple[int, int, int, int]]:
    """Cut a ``[batch, rows, ...]`` output into blocks ``(n0, n1, r0, r1)`` of bounded im2col size.

    Whole samples are grouped while a sample fits the budget (small feature maps, big batches);
    otherwise each sample is cut along its first spatial output axis.
    """
    per_sample = max(1, rows * row_bytes)
    if per_sample <= IM2COL_BLOCK_BYTES:
        step = max(1, IM2COL_BLOCK_BYTES // per_sample)
        return [(n, min(batch, n + step), 0, rows) for n in range(0, batch, step)]
    step = max(1, IM2COL_BLOCK_BYTES // max(1, row_bytes))
    return [(n, n + 1, r, min(rows, r + step)) for n in range(batch) for r in range(0, rows, step)]


def conv(
    x: np.ndarray,
    w: Weight,
    bias: "np.ndarray | None",
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    group: int,
) -> np.ndarray:
    """N-D convolution (ONNX ``Conv``) of ``x [N, C, *spatial]`` with ``w [M, C/group, *kernel]``.

    ``pads`` is ``[begin..., end...]`` (already resolved from ``auto_pad``). Each group is an im2col
    matrix ``[N*out, C/group*k]`` times the group's rows of ``w.reshape(M, -1)`` through
    ``matmul_t``; depthwise convolutions (one input channel per group) take a direct path instead.
    """
    dims = x.ndim - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    batch, channels = x.shape[:2]
    out_channels = int(w.shape[0])
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(int(pads[i]), int(pads[i + dims])) for i in range(dims)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    out = tuple((s - e) // st + 1 for s, e, st in zip(x.shape[2:], extent, strides))
    if min(out, default=1) <= 0:
        raise ValueError(f"Conv: kernel {kernel} does not fit the padded input {x.shape[2:]}")
    dtype = np.result_type(x.dtype, w.dtype)
    cin, cout = channels // group, out_channels // group

    if cin == 1 and group > 1:
        y = _depthwise(x, dense(w), kernel, strides, dilations, out, group)
    else:
        win = sliding_window_view(x, extent, axis=tuple(range(2, 2 + dims)))
        # [N, C, *positions, *extent] -> strided positions, dilated taps: [N, C, *out, *kernel]
        win = win[(slice(None),) * 2 + tuple(slice(None, None, s) for s in strides)
                  + tuple(slice(None, None, d) for d in dilations)]
        y = np.empty((batch, out_channels) + out, dtype=dtype)
        kprod = int(np.prod(kernel, dtype=np.int64))
        inner = int(np.prod(out[1:], dtype=np.int64))
        row_bytes = inner * cin * kprod * x.itemsize
        # [N, C, *out, *kernel] -> [C, *kernel, N, *out]: a copy in this order is ~10x faster than
        # with the channels last, and cols.T is the [positions, C*k] im2col matrix BLAS reads
        # transposed for free
        order = (1,) + tuple(range(2 + dims, 2 + 2 * dims)) + (0,) + tuple(range(2, 2 + dims))
        for g in range(group):
            wg = w[g * cout:(g + 1) * cout].reshape(cout, -1)
            for n0, n1, r0, r1 in _blocks(batch, out[0], row_bytes):
                block = win[n0:n1, g * cin:(g + 1) * cin, r0:r1].transpose(order)
                cols = block.reshape(cin * kprod, -1)
                res = matmul_t(cols.T, wg)  # [positions, cout]
                res = res.reshape(n1 - n0, -1, cout).transpose(0, 2, 1)
                y[n0:n1, g * cout:(g + 1) * cout, r0:r1] = res.reshape((n1 - n0, cout, r1 - r0) + out[1:])
    if bias is not None:
        y += np.asarray(bias).reshape((1, -1) + (1,) * dims)
    return y


def _depthwise(
    x: np.ndarray,
    w: np.ndarray,
    kernel: Tuple[int, ...],
    strides: Sequence[int],
    dilations: Sequence[int],
    out: Tuple[int, ...],
    group: int,
) -> np.ndarray:
    """Depthwise convolution: one multiply-accumulate over the whole map per kernel tap.

    The weight is tiny (``M * k`` values), so it is used dense; the loop runs over the ``k`` taps,
    never over channels.
    """
    batch, dims = x.shape[0], len(kernel)
    mult = w.shape[0] // group
    taps = w.reshape(group, mult, -1)
    y = np.zeros((batch, group, mult) + out, dtype=np.result_type(x.dtype, w.dtype))
    tail = (1,) * dims
    for t, offset in enumerate(itertools.product(*(range(k) for k in kernel))):
        view = x[(slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, dilations, out, strides))]
        y += view[:, :, None] * taps[:, :, t].reshape((1, group, mult) + tail)
    return y.reshape((batch, group * mult) + out)


def conv_transpose(
    x: np.ndarray,
    w: Weight,
    bias: "np.ndarray | None",
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    out_shape: Sequence[int],
    group: int,
) -> np.ndarray:
    """N-D transposed convolution (ONNX ``ConvTranspose``) of ``x [N, C, *in]``, ``w [C, M/g, *k]``.

    Each group computes ``cols = x_g @ w_g.reshape(C/g, -1)`` (``matmul``), then scatters every
    kernel tap into the output (col2im). ``pads`` holds the begin pads (an output crop, may be
    negative) and ``out_shape`` the spatial output size; both already resolved by the operator.
    """
    dims = x.ndim - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    batch, channels = x.shape[:2]
    cin = channels // group
    cout = int(w.shape[1])
    insize = x.shape[2:]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(insize, strides, kernel, dilations)]
    # the scatter buffer covers both the full result and the requested window (which can reach
    # outside it: output_padding or a large output_shape add zeros)
    lo = [min(0, int(p)) for p in pads[:dims]]
    size = [max(f, int(p) + o) - l for f, p, o, l in zip(full, pads, out_shape, lo)]
    dtype = np.result_type(x.dtype, w.dtype)
    buf = np.zeros((batch, cout * group) + tuple(size), dtype=dtype)
    taps = list(itertools.product(*(range(k) for k in kernel)))
    for g in range(group):
        wg = w[g * cin:(g + 1) * cin].reshape(cin, -1)  # [cin, cout * k]
        xg = np.moveaxis(x[:, g * cin:(g + 1) * cin], 1, -1)  # [N, *in, cin]
        for n in range(batch):
            cols = matmul(xg[n], wg).reshape(insize + (cout, len(taps)))
            cols = np.moveaxis(cols, (dims, dims + 1), (0, 1))  # [cout, k, *in]
            target = buf[n, g * cout:(g + 1) * cout]
            for t, offset in enumerate(taps):
                region = tuple(slice(o * d - l, o * d - l + (i - 1) * s + 1, s)
                               for o, d, l, i, s in zip(offset, dilations, lo, insize, strides))
                target[(slice(None),) + region] += cols[:, t]
    y = buf[(slice(None), slice(None)) + tuple(
        slice(int(p) - l, int(p) - l + o) for p, l, o in zip(pads, lo, out_shape))]
    if bias is not None:
        y = y + np.asarray(bias).reshape((1, -1) + (1,) * dims)
    return np.ascontiguousarray(y)
