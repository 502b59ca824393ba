"""Kernels: the only code that computes with weights.

Operators never call numpy on a weight input (a Gemm/MatMul ``B``, a Conv ``W``, an LSTM ``W``/``R``,
an embedding table) because on the device it may be an *indexed weight*: a per-layer codebook of
centroids plus the indices of the shared weights, never expanded into a dense float array. They use
the weight's ``shape``/``ndim``/``dtype``, leading-axis indexing (``w[i]``, ``w[a:b]``),
``w.reshape(rows, -1)`` (which merges the trailing axes), and the functions below:

* ``matmul(x, w)``   = ``x @ w``   for a 2-D weight ``[K, N]`` (``x`` may be N-D: its last axis is
  contracted); optionally ``+ bias`` and a clamp in the same call (a Gemm's bias and fused Relu)
* ``matmul_t(x, w)`` = ``x @ w.T`` for a 2-D weight ``[N, K]``
* ``lmatmul(w, x)``  = ``w @ x`` for a 2-D weight ``[M, K]`` and ``x`` ``[K, P]`` or ``[B, K, P]``
* ``take_rows(w, idx)`` = ``w[idx]`` (embedding lookup along axis 0, negative indices wrapped)
* ``dense(w)``       = the weight as a float ``np.ndarray`` (fallback for anything else)
* ``conv_runner``, ``product_runner``: ``conv`` and ``matmul_t``/``matmul`` prepared once for a kind of
  inputs (shapes, dtypes, weight kind), holding no weight; the Conv and Gemm operators keep them
  per node, so a small layer's call skips the work that follows from its shapes

Here they are written for ``np.ndarray`` weights; a weight of another kind is handed to its own
method of the same name when it has one (``w.matmul(x)``, ``w.matmul_t(x)``, ``w.lmatmul(x)``,
``w.take_rows(idx)``, ``w.dense()``), else expanded with ``dense`` (``lmatmul`` falls back to
``matmul_t``). ``conv`` and ``conv_transpose`` are built on ``lmatmul``/``matmul`` (im2col /
col2im), so they work for any weight kind; a weight that can expand one tile of rows at a time
(``tile_rows``/``expand_rows``, as the index-mode weights do) lets ``conv`` choose whether to expand
each tile once per call or build each im2col block once.

3x3 convolutions with unit strides on big enough maps take Winograd's F(2x2, 3x3) instead of im2col
(``runtime/winograd.py``: 4/9 of the multiplies). With numba (``runtime/numba_kernels.py``) the
1-D/2-D im2col, the depthwise convolution and the bias + clamp epilogue are compiled kernels; their
numpy twins here (``_im2col_numpy``, ``_depthwise_numpy``, ``_bias_clamp_numpy``) run with
``DCRT_NO_NUMBA=1`` or without numba. So is a batch-1 product with a large float32 weight
(``product_t``: numba's ``gemv_t``, whose twin is the BLAS call).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dcrt.errors import IndexRangeError

from . import winograd
from .derived import derived
from .numba_kernels import kernels, launch, wide_vectors

Weight = Any  # np.ndarray or an indexed weight

#: Upper bound on the bytes of one im2col (or Winograd input) block: big enough for BLAS to be
#: efficient, small enough that a large image never needs its whole (k*k times larger) im2col matrix
#: in memory at once, and that a block is still in L2/L3 when BLAS reads it. One core here, dense,
#: against 16 MB: ResNet-18 40.5 -> 39.1 ms, MobileNetV2 11.24 -> 11.00 ms (ResNet-50 96.8 -> 96.2);
#: 512 KB was slower for ResNet-18 (45.8 ms).
IM2COL_BLOCK_BYTES = 2 << 20

#: ``lmatmul`` first reads an array weight of WARM_BYTES (from, to) once in order when the product has
#: at most WARM_COLUMNS columns (see ``_warm``).
WARM_BYTES = (128 << 10, 2 << 20)
WARM_COLUMNS = 256

#: A pointwise convolution of several samples whose maps have at least this many positions takes one
#: product per sample, straight into the output (numpy's matmul over the samples), instead of one
#: product of all samples side by side, which costs a transposed copy of the input and of the output.
#: One core, batch 8, dense, with the Clip: 16 -> 96 channels on 112x112 26.5 -> 12.5 ms, 64 -> 256
#: on 56x56 17.0 -> 11.3, 64 -> 384 on 14x14 0.91 -> 0.87; on 7x7 the side-by-side product is faster
#: (160 -> 960: 1.30 against 1.38 ms).
SAMPLE_POSITIONS = 128

#: A convolution of one sample by a constant float32 weight whose product has at most this many input
#: rows (a pointwise one's input channels; channels x taps for an im2col product: MobileNetV2's stem,
#: 27), or whose input and output are both at most POINTWISE_MAX_VALUES values, runs numba's
#: ``pointwise`` kernel where the CPU has 32 512-bit vector registers (``numba_kernels.wide_vectors``),
#: else BLAS. One core, hot, against OpenBLAS's product + the bias/clamp pass (Emerald Rapids):
#: MobileNetV2's 16 -> 96 on 112x112 0.44-0.67x, 24 -> 144 on 56x56 0.65x, 160 -> 960 on 7x7
#: 0.64-0.78x, 64 -> 384 on 14x14 0.70x, 320 -> 1280 on 7x7 0.83-0.92x, the stem's 27 rows on
#: 112x112 0.53-0.79x. From 384 inputs it pays only on small maps (each tile of output channels reads
#: the whole input): 960 -> 320 on 7x7 0.81-0.96x, 576 -> 160 on 7x7 0.77-0.93x, 576 -> 96 on 14x14
#: 0.87-1.03x, 512 -> 2048 on 7x7 0.85-0.95x; not 512 -> 1024 on 14x14 (1.08-1.27x, its output
#: 200K values), 512 -> 128 on 28x28 (1.12-1.22x) or 1024 -> 256 on 14x14 (1.09-1.17x).
POINTWISE_MAX_INPUTS = 320
#: 512 KB: the kernel's block of positions (``_numba_conv._POINTWISE_BLOCK``), all in L2 at once.
POINTWISE_MAX_VALUES = 128 << 10
#: Such a convolution with a kernel larger than 1x1 and output rows of at least this many positions
#: reads its input in place (``_numba_conv.conv_tiles``: a tile is 16 adjacent positions of one
#: output row, so narrower rows waste lanes; they keep the im2col matrix). One core, against
#: the im2col matrix and the same tiles in one process: ResNet's 7x7 stem (147 rows on 112x112)
#: 5.48 -> 3.19 ms (against OpenBLAS's blocks 3.58 -> 2.43), MobileNetV2's 3x3 stride-2 stem 0.66
#: -> 0.59 ms, 8 -> 16 channels 3x3 on 64x64 0.32 -> 0.19, LeNet-5's 6 -> 16 5x5 on 24x24 98 -> 78
#: us, 16 -> 24 3x3 stride 2 on 28x28 and 3 -> 16 on 32x32 within 3 %.
DIRECT_MIN_WIDTH = 16


def dense(w: Weight) -> np.ndarray:
    """Return ``w`` as an ``np.ndarray`` (expanding an indexed weight)."""
    if isinstance(w, np.ndarray):
        return w
    expand = getattr(w, "dense", None)
    return expand() if expand is not None else np.asarray(w)


def finish(y: np.ndarray, bias: "np.ndarray | None", clamp: "Tuple[float, float] | None") -> np.ndarray:
    """``y + bias`` then clamped, in place on a fresh product ``y``: the numpy form of the compiled
    kernels' epilogue (``runtime/indexed.py`` uses it too)."""
    if bias is not None:
        y += bias
    if clamp is not None:
        clamp_in_place(y, clamp)
    return y


def clamp_in_place(y: np.ndarray, clamp: Tuple[float, float]) -> None:
    """Clamp ``y`` to ``clamp = (lo, hi)`` in place, an open bound being infinite; NaN stays NaN.

    A float array takes one ``clip`` with both bounds, infinite or not: with numpy 2 here that is
    3.5x faster than ``np.maximum`` alone, which a Relu would need (1 M float32: 109 against 384 us; a
    Relu6 as maximum then minimum 768 us), and as fast at 1 K values (1.2 against 1.0 us: the array
    method, not ``np.clip``, whose wrapper adds ~1.4 us). An integer array takes its finite bounds one
    by one.
    """
    lo, hi = clamp
    if y.dtype.kind == "f":
        y.clip(y.dtype.type(lo), y.dtype.type(hi), out=y)
        return
    if lo > -np.inf:
        np.maximum(y, y.dtype.type(lo), out=y)
    if hi < np.inf:
        np.minimum(y, y.dtype.type(hi), out=y)


def matmul(x: np.ndarray, w: Weight, bias: "np.ndarray | None" = None,
           clamp: "Tuple[float, float] | None" = None) -> np.ndarray:
    """``x @ w`` for a 2-D weight ``w`` of shape ``[K, N]``; ``x`` is ``[..., K]``.

    ``bias`` (``[N]``, of the result's dtype) is added and ``clamp=(lo, hi)`` applied in the same
    call: inside the compiled kernel for an index-mode weight, in place otherwise.
    """
    if isinstance(w, np.ndarray):
        return finish(np.matmul(x, w), bias, clamp)
    _check_inner(x.shape[-1], w.shape[0], x, w)
    own = getattr(w, "matmul", None)
    if own is not None and getattr(w, "fused_epilogue", False):
        return own(x, bias, clamp)
    return finish(own(x) if own is not None else np.matmul(x, dense(w)), bias, clamp)


#: ``x @ w.T`` for a few rows of ``x`` (TRANSPOSED_ROWS) giving TRANSPOSED_OUTPUTS or more outputs
#: (rows x weight rows), the weight at least TRANSPOSED_SIDE on each side, is computed as
#: ``(w @ x.T).T``. numpy's OpenBLAS (0.3.31, SkylakeX kernels) computes the first form with its
#: small-matrix kernel up to 1,152-1,200 outputs and from 1,280 1.2-8x slower than the second form,
#: the copy back to C order included (one core here: 16x64 by 256x64 8.4 -> 5.4 us, 3x64 by 512x64
#: 13.7 -> 8.6, 8x784 by 300x784 104 -> 45; below the bound the first form is 5-30 % faster: 4x128 by
#: 256x128 2.5 against 2.8 us). With 33+ rows, or a side below 64, the second form was no faster.
#: OpenBLAS's Haswell kernels (``OPENBLAS_CORETYPE=Haswell``) show no such step: both forms within
#: ~10 % below 2,000 outputs, the second faster above (8x784 by 300x784 57 -> 45 us).
TRANSPOSED_ROWS = range(3, 33)
TRANSPOSED_OUTPUTS = 1280
TRANSPOSED_SIDE = 64
#: One row of ``x`` by a float32 weight of at least this many bytes takes numba's ``gemv_t``, which
#: reads the weight in one sequential pass (``runtime/_numba_dense.py``): 30-50 % faster than
#: OpenBLAS's GEMV when the weight is not in cache. Smaller weights tend to stay in L2 (1 MB a core
#: here) between runs, where BLAS is as fast or faster (300x784 in cache: 11.7-12.0 against 13.3-14.9 us).
GEMV_BYTES = 1 << 20


def product_t(x2: np.ndarray, w2: np.ndarray, out: "np.ndarray | None" = None) -> np.ndarray:
    """``x2 @ w2.T`` (both 2-D), C-contiguous, into ``out`` when given, in BLAS's faster orientation;
    one row by a float32 weight of GEMV_BYTES or more by numba's ``gemv_t`` (one sequential pass)."""
    n, k = w2.shape
    if w2.nbytes >= GEMV_BYTES and x2.shape[0] == 1 and x2.dtype == w2.dtype == np.float32 \
            and w2.flags.c_contiguous:
        kern = kernels()
        if kern is not None:
            y = np.empty((1, n), np.float32) if out is None else out
            launch(kern, "gemv_t", n * k, w2, np.ascontiguousarray(x2[0]), y[0])
            return y
    if x2.shape[0] in TRANSPOSED_ROWS and x2.shape[0] * n >= TRANSPOSED_OUTPUTS and min(n, k) >= TRANSPOSED_SIDE:
        y = np.matmul(w2, x2.T).T
        if out is None:
            return np.ascontiguousarray(y)
        out[...] = y
        return out
    return np.matmul(x2, w2.T, out=out)


def matmul_t(x: np.ndarray, w: Weight, bias: "np.ndarray | None" = None,
             clamp: "Tuple[float, float] | None" = None) -> np.ndarray:
    """``x @ w.T`` for a 2-D weight ``w`` of shape ``[N, K]``; ``x`` is ``[..., K]``; epilogue as
    :func:`matmul`."""
    if isinstance(w, np.ndarray):
        if w.ndim != 2 or x.ndim < 2:
            return finish(np.matmul(x, w.T), bias, clamp)
        y = product_t(x.reshape(-1, x.shape[-1]), w)
        return finish(y.reshape(x.shape[:-1] + (w.shape[0],)), bias, clamp)
    _check_inner(x.shape[-1], w.shape[1], x, w)
    own = getattr(w, "matmul_t", None)
    if own is not None and getattr(w, "fused_epilogue", False):
        return own(x, bias, clamp)
    return finish(own(x) if own is not None else np.matmul(x, dense(w).T), bias, clamp)


def _check_inner(k: int, weight_k: int, x: np.ndarray, w: Weight) -> None:
    """ValueError unless ``x``'s inner dimension is the weight's: numpy checks it for an array, but an
    index-mode weight's compiled kernels would read past their arrays (a dynamic input fed the wrong
    size)."""
    if k != weight_k:
        raise ValueError(f"an input of shape {list(x.shape)} does not multiply a weight of shape "
                         f"{list(w.shape)}: the inner dimensions are {k} and {weight_k}")


ProductRunner = Callable[[np.ndarray, Weight, "np.ndarray | None"], np.ndarray]


def product_runner(x: np.ndarray, w: Weight, bias: "np.ndarray | None", clamp: "Tuple[float, float] | None",
                   transposed: bool) -> ProductRunner:
    """:func:`matmul_t` (``transposed``) or :func:`matmul` with this clamp, prepared for inputs shaped
    as ``x`` and weights of ``w``'s kind and shape: ``run(x, w, bias)``, holding no weight. An index-mode
    weight's own runner calls its compiled batch-1 kernel directly (LeNet-300-100's Gemm layers:
    ~1.1 us less Python each); any other case is the plain call."""
    _check_inner(x.shape[-1], w.shape[1 if transposed else 0], x, w)
    own = getattr(w, "product_runner", None)
    run = own(x, transposed, clamp) if own is not None and (bias is None or _is_vector32(bias)) else None
    if run is not None:
        return run
    product = matmul_t if transposed else matmul
    return lambda x, w, bias: product(x, w, bias, clamp)


def take_rows(w: Weight, idx: np.ndarray) -> np.ndarray:
    """``w[idx]`` along axis 0, an embedding lookup (Gather): integer ``idx`` of any shape, a negative
    index counting from the end; one out of range is an IndexError."""
    own = getattr(w, "take_rows", None)
    if own is not None:
        return own(idx)
    return np.take(w if isinstance(w, np.ndarray) else dense(w), wrap_indices(idx, w.shape[0]), axis=0)


def wrap_indices(idx: np.ndarray, size: int, axis: int = 0) -> np.ndarray:
    """ONNX indices into an axis of ``size`` (Gather, GatherElements, ScatterElements) as intp,
    negative ones counted from the end; IndexRangeError (an IndexError and InputError) naming the
    first one out of range and the valid range (numpy's ``take`` would wrap one below ``-size`` into
    range again)."""
    idx = np.asarray(idx).astype(np.intp, copy=False)
    if not idx.size or (idx.min() >= 0 and idx.max() < size):     # the usual case: two reductions
        return idx
    wrapped = np.where(idx < 0, idx + size, idx)
    outside = (wrapped < 0) | (wrapped >= size)
    if outside.any():
        raise IndexRangeError(f"index {idx[outside].flat[0]} is out of bounds for axis {axis} with size {size} "
                              f"(valid: {-size} to {size - 1})")
    return wrapped


# ---------------------------------------------------------------------------------------------
# Convolution


def lmatmul(w: Weight, x: np.ndarray, out: "np.ndarray | None" = None) -> np.ndarray:
    """``w @ x`` for a 2-D weight ``[M, K]`` and ``x`` ``[K, P]`` or ``[B, K, P]``, into ``out`` if given.

    A convolution's output is ``W @ im2col`` in NCHW order directly; a weight without its own
    ``lmatmul`` goes through ``matmul_t`` (``(x.T @ w.T).T``).
    """
    if isinstance(w, np.ndarray):
        if x.shape[-1] <= WARM_COLUMNS and WARM_BYTES[0] <= w.nbytes <= WARM_BYTES[1]:
            _warm(w)
        return np.matmul(w, x, out=out)
    _check_inner(x.shape[-2], w.shape[1], x, w)
    own = getattr(w, "lmatmul", None)
    if own is not None:
        return own(x, out=out)
    if out is None:
        out = np.empty(x.shape[:-2] + (int(w.shape[0]), x.shape[-1]), np.result_type(x.dtype, w.dtype))
    for i in np.ndindex(*x.shape[:-2]):
        out[i] = matmul_t(x[i].T, w).T
    return out


def _warm(a: np.ndarray) -> None:
    """Read one value of every 64-byte line of ``a``, in order, to bring it into cache.

    BLAS packs a weight before multiplying, reading it in many interleaved runs that the hardware
    prefetcher follows poorly when the weight is not in cache (another layer or program ran since).
    One sequential pass fetches it at memory bandwidth instead. It pays where the product is short
    (a 1x1 convolution on a 7x7 or 14x14 map uses each weight for 49-196 multiply-adds) and the
    weight is small enough to stay in cache (below 128 KB it is already there: no gain, the pass
    costs): one core, dense, each run right after one of onnxruntime's, MobileNetV2 10.8 -> 10.5 ms
    and 11.05 -> 10.73 ms in two A/B runs; ResNet-18/50 (2-9 MB weights on their short products)
    unchanged.
    """
    if a.flags.c_contiguous and a.size:
        np.add.reduce(a.reshape(-1)[::max(1, 64 // a.itemsize)])


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


class _ConvShape(NamedTuple):
    """Everything about a convolution that follows from the shapes and attributes (cached)."""

    kernel: Tuple[int, ...]      # 1-D convolutions are lifted to 2-D (height 1) on the numba path
    strides: List[int]
    dilations: List[int]
    pads: List[int]
    out: Tuple[int, ...]
    cin: int
    cout: int
    kprod: int
    inner: int                   # output positions per first-axis output row
    direct: bool                 # 1x1, unit strides, no padding: x itself is the im2col matrix
    blocks: List[Tuple[int, int, int, int]]
    geometry: Tuple[int, ...]    # for the numba kernels: strides, dilations, begin pads, out width
    lifted: bool


_SHAPES: Dict[Any, _ConvShape] = {}


def _conv_shape(key, x_shape, w_shape, strides, dilations, pads, group, compiled, itemsize) -> _ConvShape:
    dims = len(x_shape) - 2
    kernel = tuple(int(k) for k in w_shape[2:])
    strides, dilations, pads = [int(s) for s in strides], [int(d) for d in dilations], [int(p) for p in pads]
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    padded = tuple(s + pads[i] + pads[i + dims] for i, s in enumerate(x_shape[2:]))
    out = tuple((s - e) // st + 1 for s, e, st in zip(padded, extent, strides))
    if min(out, default=1) <= 0:
        raise ValueError(f"Conv: kernel {kernel} does not fit the padded input {padded}")
    lifted = compiled and dims == 1
    if lifted:   # a 1-D convolution is a 2-D one of height 1
        kernel, strides, dilations, out = (1,) + kernel, [1] + strides, [1] + dilations, (1,) + out
        pads = [0, pads[0], 0, pads[1]]
    cin, cout = int(x_shape[1]) // group, int(w_shape[0]) // group
    kprod, inner = math.prod(kernel), math.prod(out[1:])
    direct = kprod == 1 and all(s == 1 for s in strides) and not any(pads)
    blocks = [(0, x_shape[0], 0, out[0])] if direct else _blocks(x_shape[0], out[0], inner * cin * kprod * itemsize)
    geometry = ((strides[0], strides[1], dilations[0], dilations[1], pads[0], pads[1], out[1])
                if len(kernel) == 2 else ())
    shape = _ConvShape(kernel, strides, dilations, pads, out, cin, cout, kprod, inner, direct, blocks,
                       geometry, lifted)
    if len(_SHAPES) > 4096:
        _SHAPES.clear()
    _SHAPES[key] = shape
    return shape


def conv(
    x: np.ndarray,
    w: Weight,
    bias: "np.ndarray | None",
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    group: int,
    clamp: "Tuple[float, float] | None" = None,
    res: "np.ndarray | None" = None,
) -> np.ndarray:
    """N-D convolution (ONNX ``Conv``) of ``x [N, C, *spatial]`` with ``w [M, C/group, *kernel]``.

    ``pads`` is ``[begin..., end...]`` (already resolved from ``auto_pad``); ``res`` (a residual Add
    fused: an array of the output's shape and dtype) is added to the result; ``clamp=(lo, hi)``
    then clamps it (a fused Relu or Clip); both in the pass that adds the bias. Each group is
    ``W_g @ cols`` where ``cols`` is the im2col matrix ``[C/group*k, positions]`` of a block of
    samples or output rows (``lmatmul``), so the result comes out in NCHW order; a 1x1 convolution
    with unit strides and no padding reads ``x`` itself as ``cols``. Depthwise convolutions (one
    input channel per group) take a direct path instead. With numba, 1-D and 2-D convolutions build
    ``cols`` (and run the depthwise case) with compiled kernels that read the unpadded input. What
    follows from the shapes alone is computed once per shape (``_conv_shape``).
    """
    dtype = x.dtype if x.dtype == w.dtype else np.result_type(x.dtype, w.dtype)
    k = kernels() if dtype == np.float32 and x.ndim in (3, 4) else None
    shape = _shape_of(x, w, strides, dilations, pads, group, k)
    if k is not None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if shape.lifted:
            x = x[:, :, None, :]
            res = None if res is None else res[:, :, None, :]
    if res is not None:
        res = np.ascontiguousarray(res)
    if k is not None and winograd.usable(x, w, shape.strides, shape.dilations, group):
        y = winograd.conv3x3(k, x, w, *_epilogue(bias, clamp), clamp is not None, shape.pads, shape.out,
                             IM2COL_BLOCK_BYTES, res)
        if y is not None:
            return y
    if _direct_tiles(k, w, x, shape, group):
        y = _tiled_conv(k, x, w, bias, shape, clamp, res)
    elif shape.cin == 1 and group > 1:
        y = _depthwise(k, x, w, bias, shape, group, clamp if res is None else None)
        if res is not None:
            add_clamp(y, res, clamp, out=y)     # the depthwise kernels take no residual
    else:
        y = _conv_im2col(k, x, w, bias, shape, group, clamp, dtype, res)
    return y.reshape(y.shape[:2] + y.shape[3:]) if shape.lifted else y


def _shape_of(x: np.ndarray, w: Weight, strides, dilations, pads, group: int, k) -> _ConvShape:
    key = (x.shape, w.shape, tuple(strides), tuple(dilations), tuple(pads), group, k is not None, x.itemsize,
           IM2COL_BLOCK_BYTES)
    return _SHAPES.get(key) or _conv_shape(key, x.shape, w.shape, strides, dilations, pads, group, k is not None,
                                           x.itemsize)


ConvRunner = Callable[..., np.ndarray]     # run(x, w, bias, res=None)


def conv_runner(x: np.ndarray, w: Weight, bias: "np.ndarray | None", strides: Sequence[int],
                dilations: Sequence[int], pads: Sequence[int], group: int,
                clamp: "Tuple[float, float] | None" = None) -> ConvRunner:
    """:func:`conv` prepared once for inputs of ``x``'s shape and dtype, weights of ``w``'s shape,
    dtype and kind, a bias or none as ``bias``, and this clamp: ``run(x, w, bias, res=None)`` (``res``:
    a residual of the output's shape and dtype, added before the clamp, as ``conv`` takes it).

    The runner holds no weight (stream mode drops each weight after use). For the common small
    layers, float32 and 2-D, it skips what ``conv`` works out on every call (geometry, path,
    epilogue, taps): a pointwise convolution of one sample (8x8 map, 16 -> 96 channels: 9.7 -> 5.8 us),
    a depthwise one with an array weight (96 channels on 8x8: 21.9 -> 10.7 us) and, with numba, an
    array weight's im2col product of one sample in one block, where Winograd does not pay (64
    channels 3x3 on 8x8: 94 -> 82 us). An indexed weight that fits one tile (``tile_rows``: at most
    64 KB of float32) takes the array paths too, expanded whole for the call and dropped (index mode,
    one core: ResNet-18 width 8 at 32 px 0.59 -> 0.46 ms, MobileNetV2 x0.25 at 32 px 0.91 -> 0.71).
    Every other layer calls ``conv``.
    """
    strides, dilations, pads = tuple(strides), tuple(dilations), tuple(pads)

    def general(x: np.ndarray, w: Weight, bias: "np.ndarray | None", res: "np.ndarray | None" = None) -> np.ndarray:
        return conv(x, w, bias, strides, dilations, pads, group, clamp, res)

    if not (x.dtype == np.float32 and w.dtype == np.float32 and x.ndim == 4
            and (bias is None or _is_vector32(bias))):
        return general
    k = kernels()
    shape = _shape_of(x, w, strides, dilations, pads, group, k)
    out_shape = x.shape[:1] + (int(w.shape[0]),) + shape.out
    b0, lo, hi = _epilogue(None, clamp)
    clamped = clamp is not None
    array = _as_array(w)
    if shape.cin == 1 and group > 1 and k is not None and array is not None:
        channels, mult = out_shape[1], out_shape[1] // group
        taps = (channels,) + shape.kernel
        geometry, work = shape.geometry[:6], x.shape[0] * math.prod(taps) * math.prod(shape.out)

        def depthwise(x: np.ndarray, w: Weight, bias: "np.ndarray | None",
                      res: "np.ndarray | None" = None) -> np.ndarray:
            y = np.empty(out_shape, np.float32)
            launch(k, "depthwise2d", work, np.ascontiguousarray(x), array(w).reshape(taps),
                   b0 if bias is None else bias, 0, mult, geometry, lo, hi, clamped and res is None, y)
            if res is not None:
                add_clamp(y, res, clamp, out=y)
            return y
        return depthwise
    paying = winograd.usable(x, w, strides, dilations, group) and winograd.pays(w, shape.out)
    if not paying and _direct_tiles(k, w, x, shape, group):
        def direct(x: np.ndarray, w: Weight, bias: "np.ndarray | None", res: "np.ndarray | None" = None) -> np.ndarray:
            return _tiled_conv(k, np.ascontiguousarray(x), w, bias, shape, clamp, res)
        return direct
    pointwise = shape.direct and group == 1 and x.shape[0] == 1     # x itself is the im2col matrix
    if pointwise or (k is not None and array is not None and group == 1 and x.shape[0] == 1
                     and len(shape.blocks) == 1 and not paying):
        rows, cout, positions = shape.cin * shape.kprod, shape.cout, math.prod(shape.out)
        kh, kw = shape.kernel
        whole = None if isinstance(w, np.ndarray) else array    # None: as it is (lmatmul tiles it)

        def product(x: np.ndarray, w: Weight, bias: "np.ndarray | None", res: "np.ndarray | None" = None) -> np.ndarray:
            if pointwise:
                cols = x.reshape(rows, positions)
            else:
                cols = np.empty((rows, positions), np.float32)
                launch(k, "im2col2d", cols.size, np.ascontiguousarray(x), 0, 0, kh, kw, shape.geometry, 0,
                       cols.reshape(rows, 1, positions))
            y = np.empty(out_shape, np.float32)
            y3 = y.reshape(1, cout, positions)
            if _tiles(k, w, x, rows, positions):
                _tiled_product(k, w, cols, bias, res, clamp, y3[0])
                return y
            lmatmul((w if whole is None else whole(w)).reshape(cout, rows), cols, out=y3[0])
            res3 = None if res is None else np.ascontiguousarray(res).reshape(y3.shape)
            if k is None:
                _bias_clamp_numpy(y3, bias, clamp, res3)
            elif bias is not None or clamped or res3 is not None:
                launch(k, "bias_clamp", y3.size, y3, b0 if bias is None else bias,
                       _NO_RESIDUAL if res3 is None else res3, lo, hi, clamped)
            return y
        return product
    return general


def _tiles(k, w: Weight, x: np.ndarray, rows: int, positions: int) -> bool:
    """Whether a product of one sample with ``rows`` input rows of ``positions`` runs numba's register
    tiles (see POINTWISE_MAX_INPUTS): float32, and a constant array weight (a writable one, fed as an
    input, may change between runs; its packed form is kept)."""
    if not (k is not None and isinstance(w, np.ndarray) and not w.flags.writeable and w.dtype == np.float32
            and x.dtype == np.float32 and wide_vectors()):
        return False
    return rows <= POINTWISE_MAX_INPUTS or max(rows, w.shape[0]) * positions <= POINTWISE_MAX_VALUES


def _packed(k, w: np.ndarray, cout: int, rows: int, bias: "np.ndarray | None", clamp: "Tuple[float, float] | None",
            res: "np.ndarray | None") -> Tuple[np.ndarray, np.ndarray, Any, Any, int]:
    """``(packed, bias, lo, hi, flags)`` for numba's register tiles: the constant weight ``w`` as
    ``[cout, rows]`` packed once (``derived``: kept while it lives, one form for ``pointwise`` and
    ``conv_tiles``) and the epilogue as the tiles take it (flags 1 bias, 2 residual, 4 clamp)."""
    packed = derived(w, "pointwise", lambda w: k.pack_pointwise(w.reshape(cout, rows)))
    b, lo, hi = _epilogue(bias, clamp)
    return packed, b, lo, hi, (bias is not None) | (res is not None) << 1 | (clamp is not None) << 2


def _tiled_product(k, w: np.ndarray, cols: np.ndarray, bias: "np.ndarray | None", res: "np.ndarray | None",
                   clamp: "Tuple[float, float] | None", out: np.ndarray) -> None:
    """``out [M, P] = clamp(w @ cols + bias + res)`` by numba's ``pointwise`` kernel, from the constant
    weight ``w`` packed once (``derived``: kept while it lives), the epilogue in its register tiles."""
    cout, rows = out.shape[0], cols.shape[0]
    packed, b, lo, hi, flags = _packed(k, w, cout, rows, bias, clamp, res)
    launch(k, "pointwise", out.size * rows, packed, np.ascontiguousarray(cols), b,
           _NO_RESIDUAL2 if res is None else np.ascontiguousarray(res, np.float32).reshape(out.shape), lo, hi, flags,
           out)


def _direct_tiles(k, w: Weight, x: np.ndarray, shape: _ConvShape, group: int) -> bool:
    """Whether ``conv`` runs on one sample by numba's register tiles reading the input in place
    (``_tiled_conv``) instead of an im2col matrix: a 2-D convolution of a kernel larger than 1x1 (a
    strided 1x1 one's im2col matrix is a subsample, smaller than the split input: ResNet-18's 64 ->
    128 at stride 2 0.34-0.37 -> 0.58-0.85 ms in tiles), with output rows of DIRECT_MIN_WIDTH
    positions or more, whose product has at most POINTWISE_MAX_INPUTS rows and a weight ``_tiles``
    takes (the caller has ruled out Winograd)."""
    rows = shape.cin * shape.kprod
    return (group == 1 and x.shape[0] == 1 and shape.kprod > 1 and len(shape.kernel) == 2
            and shape.out[-1] >= DIRECT_MIN_WIDTH and rows <= POINTWISE_MAX_INPUTS
            and _tiles(k, w, x, rows, math.prod(shape.out)))


def _tiled_conv(k, x: np.ndarray, w: np.ndarray, bias: "np.ndarray | None", shape: _ConvShape,
                clamp: "Tuple[float, float] | None", res: "np.ndarray | None") -> np.ndarray:
    """``conv`` of one sample (see ``_direct_tiles``) by numba's ``conv_tiles``: the constant weight
    packed once as for ``_tiled_product``, the input's columns split by the stride, each tile's
    taps read from them in place, the epilogue in the tiles."""
    cout, rows = shape.cout, shape.cin * shape.kprod
    packed, b, lo, hi, flags = _packed(k, w, cout, rows, bias, clamp, res)
    y = np.empty((1, cout) + shape.out, np.float32)
    launch(k, "conv_tiles", y.size * rows, packed, np.ascontiguousarray(x), b,
           _NO_BIAS if res is None else np.ascontiguousarray(res, np.float32).reshape(-1), shape.geometry,
           shape.kernel[0], shape.kernel[1], lo, hi, flags, y)
    return y


def _as_array(w: Weight) -> "Callable[[Weight], np.ndarray] | None":
    """How a conv runner reads weights of ``w``'s kind as one C-contiguous float32 array: an array as
    it is; an indexed weight that its own tiles expand in one (``tile_rows``: the whole weight is at
    most ``indexed.TILE_FLOOR`` bytes as float32) expanded for the call; None for any other."""
    if isinstance(w, np.ndarray):
        return np.ascontiguousarray
    if not hasattr(w, "expand_rows") or w.ndim < 2:
        return None
    rows = int(w.shape[0])
    if w.tile_rows() < rows:
        return None
    return lambda w: w.expand_rows(0, rows).reshape(w.shape)    # rows of the 2-D view: no reshape first


def _conv_im2col(k, x, w, bias, shape: _ConvShape, group, clamp, dtype, res=None) -> np.ndarray:
    """The im2col path of :func:`conv` (every convolution but depthwise).

    The im2col matrix of a block is ``[C/group*k, samples * positions]``: one 2-D product per block
    and weight tile, which BLAS runs (and threads) far better than a stack of per-sample products;
    with several samples the result is moved to NCHW afterwards.
    """
    kernel, out, cin, cout, kprod, inner = shape.kernel, shape.out, shape.cin, shape.cout, shape.kprod, shape.inner
    batch, dims = x.shape[0], len(kernel)
    y = np.empty((batch, cout * group) + out, dtype=dtype)
    y3 = y.reshape(batch, cout * group, -1)
    blocks, direct = shape.blocks, shape.direct
    if direct and group == 1 and (batch == 1 or y3.shape[2] >= SAMPLE_POSITIONS):
        # pointwise: x itself is the im2col matrix of each sample (one sample as a 2-D product, so
        # that a map of a few positions can take an index weight's compiled dot products)
        xs, ys = (x.reshape(cin, -1), y3[0]) if batch == 1 else (x.reshape(batch, cin, -1), y3)
        if batch == 1 and _tiles(k, w, x, cin, y3.shape[2]):
            _tiled_product(k, w, xs, bias, res, clamp, ys)
            return y
        lmatmul(w.reshape(cout, -1), xs, out=ys)
        _bias_clamp(k, y3, bias, clamp, res)
        return y
    xp = None
    if not direct and k is None:
        pads = shape.pads
        xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)]) if any(pads) else x

    def cols_of(g: int, n0: int, n1: int, r0: int, r1: int) -> np.ndarray:
        """``[cin * k, (n1 - n0) * positions]`` of samples n0..n1, output rows r0..r1."""
        if direct:
            block = x[n0:n1, g * cin:(g + 1) * cin].reshape(n1 - n0, cin, -1)
            return block[0] if n1 - n0 == 1 else np.ascontiguousarray(block.transpose(1, 0, 2)).reshape(cin, -1)
        if k is not None:
            cols = np.empty((cin * kprod, n1 - n0, (r1 - r0) * inner), np.float32)
            launch(k, "im2col2d", cols.size, x, n0, g * cin, kernel[0], kernel[1], shape.geometry, r0, cols)
            return cols.reshape(cin * kprod, -1)
        return _im2col_numpy(xp, n0, n1, g * cin, cin, kernel, shape.strides, shape.dilations, out, r0, r1)

    def product(weight, cols: np.ndarray, yg: np.ndarray, n0: int, n1: int, r0: int, r1: int, a: int, b: int) -> None:
        """``weight @ cols`` into output channels a..b of ``yg`` for the block (NCHW)."""
        target = yg[n0:n1, a:b, r0 * inner:r1 * inner]
        if n1 - n0 == 1:
            multiply(weight, cols, target[0])
        else:
            target[...] = multiply(weight, cols, None).reshape(b - a, n1 - n0, -1).transpose(1, 0, 2)

    if batch == 1 and group == 1 and len(blocks) == 1 and _tiles(k, w, x, cin * kprod, y3.shape[2]):
        _tiled_product(k, w, cols_of(0, *blocks[0]), bias, res, clamp, y3[0])
        return y
    for g in range(group):
        wg = (w if group == 1 else w[g * cout:(g + 1) * cout]).reshape(cout, -1)
        yg = y3 if group == 1 else y3[:, g * cout:(g + 1) * cout]
        tiled = len(blocks) > 1 and not isinstance(wg, np.ndarray) and hasattr(wg, "expand_rows")
        if tiled:
            step = wg.tile_rows()
            tiles = -(-cout // step)
            # expanding every tile once per block, or building every im2col block once per tile:
            # whichever writes fewer floats
            tiled = tiles > 1 and len(blocks) * cout > tiles * batch * out[0] * inner
        if tiled:
            buf = np.empty((min(step, cout), cin * kprod), np.float32)
            multiply = _matmul_into
            for a in range(0, cout, step):
                b = min(cout, a + step)
                tile = wg.expand_rows(a, b, buf[:b - a])
                for n0, n1, r0, r1 in blocks:
                    product(tile, cols_of(g, n0, n1, r0, r1), yg, n0, n1, r0, r1, a, b)
            continue
        multiply = lmatmul
        for n0, n1, r0, r1 in blocks:
            product(wg, cols_of(g, n0, n1, r0, r1), yg, n0, n1, r0, r1, 0, cout)
    _bias_clamp(k, y3, bias, clamp, res)
    return y


def _matmul_into(a: np.ndarray, b: np.ndarray, out: "np.ndarray | None") -> np.ndarray:
    return np.matmul(a, b, out=out)


def _bias_clamp(k, y3: np.ndarray, bias: "np.ndarray | None", clamp: "Tuple[float, float] | None",
                res: "np.ndarray | None" = None) -> None:
    """In place on ``y3 [N, M, P]``: add the per-channel bias, then ``res`` (a residual of ``y3``'s
    size, or None), then clamp (one pass with numba)."""
    if bias is None and clamp is None and res is None:
        return
    res3 = None if res is None else res.reshape(y3.shape)
    if k is not None and y3.dtype == np.float32:
        b, lo, hi = _epilogue(bias, clamp)
        launch(k, "bias_clamp", y3.size, y3, b, _NO_RESIDUAL if res3 is None else res3, lo, hi, clamp is not None)
        return
    _bias_clamp_numpy(y3, bias, clamp, res3)


def _epilogue(bias: "np.ndarray | None", clamp: "Tuple[float, float] | None") -> Tuple[np.ndarray, Any, Any]:
    """``(bias, lo, hi)`` as the compiled epilogues take them: a float32 vector (empty for none) and
    float32 bounds (infinite for no clamp)."""
    b = _NO_BIAS if bias is None else bias if _is_vector32(bias) else np.ascontiguousarray(bias, np.float32).ravel()
    lo, hi = clamp if clamp is not None else _NO_CLAMP
    return b, np.float32(lo), np.float32(hi)


_NO_BIAS = np.zeros(0, np.float32)
_NO_RESIDUAL = np.zeros((0, 0, 0), np.float32)
_NO_RESIDUAL2 = np.zeros((0, 0), np.float32)
_NO_CLAMP = (-np.inf, np.inf)


def _is_vector32(a: Any) -> bool:
    """A C-contiguous 1-D float32 array (what the kernels take for a bias, as it is)."""
    return isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1 and a.flags.c_contiguous


def _bias_clamp_numpy(y3: np.ndarray, bias: "np.ndarray | None", clamp: "Tuple[float, float] | None",
                      res: "np.ndarray | None" = None) -> None:
    """numpy twin of the ``bias_clamp`` kernel."""
    if bias is not None:
        y3 += np.asarray(bias).reshape(1, -1, 1)
    if res is not None:
        y3 += res
    if clamp is not None:
        clamp_in_place(y3, clamp)


def _im2col_numpy(xp: np.ndarray, n0: int, n1: int, c0: int, cin: int, kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int], out: Sequence[int], r0: int,
                  r1: int) -> np.ndarray:
    """numpy twin of ``im2col2d`` (any number of spatial axes): ``[cin*k, nb*rows*inner]`` from the
    padded input ``xp``."""
    dims = len(kernel)
    extent = [(kk - 1) * d + 1 for kk, d in zip(kernel, dilations)]
    win = sliding_window_view(xp[n0:n1, c0:c0 + cin], extent, axis=tuple(range(2, 2 + dims)))
    # [n, c, *positions, *extent] -> strided positions, dilated taps: [n, c, *out, *kernel]
    win = win[(slice(None),) * 2 + tuple(slice(None, (o - 1) * s + 1, s) for o, s in zip(out, strides))
              + tuple(slice(None, None, d) for d in dilations)]
    win = win[:, :, r0:r1]
    # [n, c, *out, *kernel] -> [c, *kernel, n, *out]: a copy in this order reads rows of x
    order = (1,) + tuple(range(2 + dims, 2 + 2 * dims)) + (0,) + tuple(range(2, 2 + dims))
    return np.ascontiguousarray(win.transpose(order)).reshape(cin * math.prod(kernel), -1)


def _depthwise(k, x, w, bias, shape: _ConvShape, group, clamp) -> np.ndarray:
    """Depthwise convolution (one input channel per group, ``mult`` output channels each).

    The taps are used as float32: an array weight as it is; an indexed weight a tile of channels at
    a time (``expand_rows``: a quarter of the weight, or all of it up to 64 KB); any other weight
    kind is expanded once with ``dense`` (the weight is tiny: ``M * k`` values).
    """
    kernel, strides, dilations, pads, out = shape.kernel, shape.strides, shape.dilations, shape.pads, shape.out
    batch, dims = x.shape[0], len(kernel)
    channels = int(w.shape[0])
    mult = channels // group
    dtype = np.result_type(x.dtype, w.dtype)
    y = np.empty((batch, channels) + tuple(out), dtype=dtype)
    if isinstance(w, np.ndarray) or not hasattr(w, "expand_rows"):
        taps = [(0, channels, np.asarray(dense(w), dtype=dtype).reshape(channels, -1))]
    else:
        step = w.tile_rows()
        buf = np.empty((min(step, channels), math.prod(kernel)), np.float32)
        taps = ((a, min(channels, a + step), w.expand_rows(a, min(channels, a + step), buf[:min(channels, a + step) - a]))
                for a in range(0, channels, step))
    if k is not None and dtype == np.float32:
        b, lo, hi = _epilogue(bias, clamp)
        geometry = shape.geometry[:6]
        for a, b_, t in taps:
            t = np.ascontiguousarray(t, dtype=np.float32).reshape((b_ - a,) + tuple(kernel))
            launch(k, "depthwise2d", batch * t.size * math.prod(out), x, t, b, a, mult, geometry,
                   lo, hi, clamp is not None, y)
        return y
    for a, b_, t in taps:
        _depthwise_numpy(x, t, bias, a, b_, mult, kernel, strides, dilations, pads[:dims], out, y)
    _bias_clamp_numpy(y.reshape(batch, channels, -1), None, clamp)
    return y


def add_clamp(a: np.ndarray, b: np.ndarray, clamp: "Tuple[float, float] | None",
              out: "np.ndarray | None" = None) -> np.ndarray:
    """``a + b`` clamped to ``clamp`` (None: not clamped) for two arrays of one shape and float dtype
    (an Add with its Relu/Clip fused; ``out=a``: a residual added in place): one compiled pass for
    C-contiguous float32, else numpy (the sum, then the clamp in place: the twin)."""
    k = kernels()
    if (k is not None and a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape
            and a.flags.c_contiguous and b.flags.c_contiguous):
        out = np.empty_like(a) if out is None else out
        _, lo, hi = _epilogue(None, clamp)
        launch(k, "add_clamp", out.size, a, b, lo, hi, out)
        return out
    return finish(np.add(a, b, out=out), None, clamp)


def max_pool2d(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               pads: Sequence[int], out: Sequence[int]) -> "np.ndarray | None":
    """2-D max pooling of a float32 ``x [N, C, H, W]`` by the numba kernel (``pads``: the begin
    pads; ``out``: the output size), or None when numba is off or the input is not of that kind
    (the operator's numpy code, the kernel's twin, then serves)."""
    k = kernels()
    if k is None or x.dtype != np.float32 or x.ndim != 4:
        return None
    y = np.empty(x.shape[:2] + tuple(out), np.float32)
    geometry = (int(strides[0]), int(strides[1]), int(dilations[0]), int(dilations[1]), int(pads[0]), int(pads[1]))
    launch(k, "max_pool2d", y.size * kernel[0] * kernel[1], np.ascontiguousarray(x), int(kernel[0]),
           int(kernel[1]), geometry, y)
    return y


def _depthwise_numpy(x: np.ndarray, taps: np.ndarray, bias: "np.ndarray | None", m0: int, m1: int, mult: int,
                     kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int],
                     out: Sequence[int], y: np.ndarray) -> None:
    """numpy twin of ``depthwise2d`` (any number of spatial axes): output channels ``[m0, m1)`` of
    ``y`` from ``x`` with begin ``pads``: the bias, then one multiply and one add per tap.

    The input is copied once into zero-padded phases of the strides (one phase without strides), each
    as flat rows as long as the output's plus the kernel's reach. A tap then reads one contiguous run
    of its phase, offset by the tap's position, for every output at once: numpy's inner loops run over
    whole maps instead of rows of a few values (MobileNetV2's 17 depthwise layers without numba, one
    core: 22.4 -> 13.3-14.2 ms). Positions past an output row's end are computed and dropped.
    """
    src = np.arange(m0, m1) // mult
    xin = x[:, src[0]:src[-1] + 1] if mult == 1 else x[:, src]
    n, c = xin.shape[:2]
    reach = [(k - 1) * d // s for k, d, s in zip(kernel, dilations, strides)]     # in phase steps
    shape = [o + r for o, r in zip(out, reach)]
    shape[0] += 1       # the last taps' runs end past the last row (by less than a row)
    steps = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    length = out[0] * steps[0]
    phases: Dict[Tuple[int, ...], np.ndarray] = {}
    acc = np.empty((n, c, length), y.dtype)
    acc[...] = 0 if bias is None else np.asarray(bias).reshape(-1)[m0:m1].reshape(1, -1, 1)
    product = np.empty_like(acc)
    for t, offset in enumerate(itertools.product(*(range(kk) for kk in kernel))):
        at = [o * d for o, d in zip(offset, dilations)]
        key = tuple(a % s for a, s in zip(at, strides))
        if key not in phases:
            phases[key] = _phase(xin, key, strides, pads, shape).reshape(n, c, -1)
        start = sum(a // s * step for a, s, step in zip(at, strides, steps))
        np.multiply(phases[key][:, :, start:start + length], taps[:, t].reshape(1, -1, 1), out=product)
        np.add(acc, product, out=acc)
    y[:, m0:m1] = acc.reshape((n, c, out[0]) + tuple(shape[1:]))[(Ellipsis,) + tuple(slice(o) for o in out[1:])]


def _phase(x: np.ndarray, first: Sequence[int], strides: Sequence[int], pads: Sequence[int],
           shape: Sequence[int]) -> np.ndarray:
    """``[N, C, *shape]``: the zero-padded input's positions ``first + i * strides`` (``first`` counts
    from the padded input's start), zeros past its end."""
    phase = np.zeros(x.shape[:2] + tuple(shape), x.dtype)
    inside = [-(-(p - f) // s) if p > f else 0 for f, s, p in zip(first, strides, pads)]  # first phase index in x
    part = x[(Ellipsis,) + tuple(slice(f + i * s - p, None, s) for f, i, s, p in zip(first, inside, strides, pads))]
    part = part[(Ellipsis,) + tuple(slice(max(m - i, 0)) for m, i in zip(shape, inside))]
    phase[(Ellipsis,) + tuple(slice(i, i + m) for i, m in zip(inside, part.shape[2:]))] = part
    return phase


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
