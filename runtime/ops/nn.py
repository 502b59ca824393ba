"""Neural-network operators: convolutions, dense layers, pooling, normalisation, softmax.

Weight inputs (Conv/ConvTranspose ``W``, Gemm/MatMul ``B``) go through ``runtime.kernels`` only,
so they may be indexed weights (codebook + indices) as well as arrays.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcrt.errors import InputError

from .. import kernels
from . import bounded, register

Attrs = Dict[str, Any]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def resolve_pads(attrs: Attrs, insize: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> List[int]:
    """``[begin..., end...]`` pads from ``auto_pad`` (SAME_UPPER/SAME_LOWER/VALID) or ``pads``.

    SAME keeps ``ceil(in / stride)`` outputs; the odd pixel of padding goes at the end (UPPER) or
    the beginning (LOWER).
    """
    dims = len(kernel)
    mode = _text(attrs.get("auto_pad", "NOTSET"))
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(insize, kernel, strides, dilations):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
        return begin + end
    if mode == "VALID":
        return [0] * (2 * dims)
    pads = list(attrs.get("pads") or [0] * (2 * dims))
    return [int(p) for p in pads]


def _geometry(attrs: Attrs, x: np.ndarray, kernel: Sequence[int]) -> Tuple[List[int], List[int]]:
    dims = len(kernel)
    strides = [int(s) for s in attrs.get("strides") or [1] * dims]
    dilations = [int(d) for d in attrs.get("dilations") or [1] * dims]
    return strides, dilations


def _windows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
             pads: Sequence[int], ceil: bool = False, pool: bool = False) -> List[int]:
    """Output size per spatial axis of a sliding window (Conv, pooling).

    With ``ceil`` (pooling's ``ceil_mode``) the output may need windows that run past the end pad; a
    window must still start inside the input or its begin pad (the PyTorch/onnxruntime rule). A
    pooling window longer than its padded input by less than a stride gives one output over what it
    covers, as onnxruntime and ONNX's shape inference (they truncate ``span / stride`` toward zero).
    """
    dims = len(kernel)
    out = []
    for i, n in enumerate(x.shape[2:]):
        span = n + pads[i] + pads[i + dims] - ((kernel[i] - 1) * dilations[i] + 1)
        up = ceil or (pool and span < 0)
        o = (-(-span // strides[i]) if up else span // strides[i]) + 1
        if up and (o - 1) * strides[i] >= n + pads[i]:
            o -= 1
        if pool and o < 1:
            raise InputError(f"a pooling window of {kernel[i]} (dilation {dilations[i]}) is longer than "
                             f"spatial axis {i} of the input ({n}, pads {pads[i]} + {pads[i + dims]}) by a "
                             "stride or more: no output position")
        if o < 1:       # raised here, before a caller's shortcut for an empty batch would make no window
            padded = tuple(m + pads[j] + pads[j + dims] for j, m in enumerate(x.shape[2:]))
            raise InputError(f"a kernel of {tuple(kernel)} (dilations {tuple(dilations)}) does not fit "
                             f"the padded input {padded}: no output position")
        out.append(o)
    return out


def _bounded_windows(x: np.ndarray, channels: int, pads: Sequence[int], out: Sequence[int]) -> None:
    """Check the padded input and the ``[N, channels, *out]`` result of a sliding window fit the limit."""
    dims = len(out)
    bounded(list(x.shape[:2]) + [n + pads[i] + pads[i + dims] for i, n in enumerate(x.shape[2:])], x.itemsize)
    bounded([x.shape[0], channels] + list(out), x.itemsize)


# -- convolution and dense layers ------------------------------------------------------------------


@register("Conv", weights=(1,))
def conv(attrs: Attrs, x: np.ndarray, w: Any, b: Optional[np.ndarray] = None) -> np.ndarray:
    """N-D convolution with groups (depthwise included), dilations, strides, pads or auto_pad."""
    return _conv(attrs, x, w, b, None)


def _conv(attrs: Attrs, x: np.ndarray, w: Any, b: Optional[np.ndarray],
          clamp: Optional[Tuple[float, float]], res: Optional[np.ndarray] = None) -> np.ndarray:
    """The convolution, plus ``res`` when given (a residual of the output's shape and dtype, which is
    ``x``'s and ``w``'s), then clamped to ``clamp`` when given."""
    run = _last(attrs, x, w, b, clamp)
    if run is None:
        run = _remember(attrs, x, w, b, clamp, _conv_runner(attrs, x, w, b, clamp))
    if res is not None:
        return run(x, w, b, res)
    return run(x, w, b).astype(x.dtype, copy=False)


def _conv_runner(attrs: Attrs, x: np.ndarray, w: Any, b: Optional[np.ndarray],
                 clamp: Optional[Tuple[float, float]]) -> Callable[..., Any]:
    """The node's convolution prepared once per kind of inputs it sees (kernels.conv_runner)."""
    key = (x.shape, x.dtype, w.shape, w.dtype, type(w), b is None, clamp, kernels.kernels() is not None)
    runners = _runners(attrs)
    run = runners.get(key)
    if run is None:
        kernel = [int(k) for k in w.shape[2:]]
        strides, dilations = _geometry(attrs, x, kernel)
        pads = resolve_pads(attrs, x.shape[2:], kernel, strides, dilations)
        out = _windows(x, kernel, strides, dilations, pads)
        _bounded_windows(x, w.shape[0], pads, out)
        if x.shape[0] == 0:     # an empty batch: the kernels' reshapes by -1 are undefined on it
            shape = (0, w.shape[0], *out)
            return _keep(runners, key, lambda x, w, b, res=None: np.zeros(shape, x.dtype))
        run = _keep(runners, key, kernels.conv_runner(x, w, b, strides, dilations, pads,
                                                      int(attrs.get("group", 1)), clamp))
    return run


#: Runners a node keeps (one per kind of inputs: shapes, dtypes, weight kind, bias, clamp, numba);
#: an alternating batch size or sequence length finds its runner, an endless variety starts over.
RUNNERS_PER_NODE = 8


def _runners(attrs: Attrs) -> Dict[Any, Callable[..., Any]]:
    runners = attrs.get("_runners")
    if runners is None:
        runners = attrs["_runners"] = {}
    return runners


def _keep(runners: Dict[Any, Callable[..., Any]], key: Any, run: Callable[..., Any]) -> Callable[..., Any]:
    if len(runners) >= RUNNERS_PER_NODE:
        runners.clear()
    runners[key] = run
    return run


def _last(attrs: Attrs, x: np.ndarray, w: Any, b: Any, clamp: Any) -> Optional[Callable[..., Any]]:
    """The runner of the node's last call when this call looks the same (the shape and dtype of ``x``;
    the same weight and bias objects; the same clamp; numba on or off as then), else None.

    Identity checks instead of a runner key's hash: LeNet-300-100's Gemm steps ~0.2 us less each. The weight
    and bias are held weakly: stream mode drops a weight after its node (each call then misses).
    """
    last = attrs.get("_last")
    if (last is not None and last[0] == x.shape and last[1] is x.dtype and last[2]() is w
            and (b is None if last[3] is None else last[3]() is b) and last[4] == clamp
            and last[5] is kernels.kernels()):
        return last[6]
    return None


def _remember(attrs: Attrs, x: np.ndarray, w: Any, b: Any, clamp: Any, run: Callable[..., Any]) -> Callable[..., Any]:
    """Note ``run`` as the node's last runner (see :func:`_last`); returns it."""
    try:
        attrs["_last"] = (x.shape, x.dtype, weakref.ref(w), None if b is None else weakref.ref(b), clamp,
                          kernels.kernels(), run)
    except TypeError:       # an input without weak references (not an array or a dcrt weight)
        attrs.pop("_last", None)
    return run


# -- fusing an activation into the node that produces its input -----------------------------------

#: Activations that are a clamp: a producer computes them in its own pass over its output.
CLAMPS = ("Relu", "Clip")
#: A Conv with the residual Add that alone reads its output merged in (:func:`fuse_residual`).
CONV_ADD = "Conv+Add"
#: Producers an activation can be fused into: a Conv (with its residual Add or not) clamps inside its
#: kernel, the others return a fresh array that is clamped in place (no second array, no second pass
#: allocating one).
PRODUCERS = ("Conv", "Gemm", "Add", CONV_ADD)


def _bounds(op: str, attrs: Attrs, extra: Sequence[Any]) -> Tuple[float, float]:
    """``(lo, hi)`` of a Relu, or of a Clip (bounds from its inputs, or attributes before opset 11)."""
    if op == "Relu":
        return _RELU
    lo = extra[0] if len(extra) > 0 and extra[0] is not None else attrs.get("min")
    hi = extra[1] if len(extra) > 1 and extra[1] is not None else attrs.get("max")
    return (-np.inf if lo is None else float(np.asarray(lo).item()),
            np.inf if hi is None else float(np.asarray(hi).item()))


_RELU = (0.0, np.inf)


def fuse_clamp(producer: str, producer_fn: Callable[..., Any], inputs: int, activation: str,
               activation_attrs: Attrs, activation_fn: Callable[..., Any]) -> Optional[Callable[..., Any]]:
    """An operator function computing ``activation(producer(...))`` in one step, or None.

    It takes the producer's ``inputs`` inputs followed by the activation's other inputs (a Clip's
    min and max). The executor uses it when the activation is the only reader of the producer's
    output (see ``Executor``). Non-float results take the two functions one after the other.
    """
    if activation not in CLAMPS or producer not in PRODUCERS:
        return None
    inner = {"Conv": _conv, "Gemm": _gemm}.get(producer)
    relu = activation == "Relu"
    residual = producer == CONV_ADD

    def fused(attrs: Attrs, *args: Any) -> Any:
        if residual and args[0].dtype.kind == "f":
            bounds = _RELU if relu else _bounds(activation, activation_attrs, args[inputs:])
            return producer_fn(attrs, *args[:inputs], clamp=bounds)
        if inner is not None and args[0].dtype.kind == "f":     # decided here, not per call: ~0.3 us
            bounds = _RELU if relu else _bounds(activation, activation_attrs, args[inputs:])
            return inner(attrs, args[0], args[1], args[2] if inputs > 2 else None, bounds)
        own, extra = args[:inputs], args[inputs:]
        if (producer == "Add" and own[0].shape == own[1].shape and own[0].dtype == own[1].dtype
                and own[0].dtype.kind == "f"):     # a residual connection: no broadcast to bound
            return kernels.add_clamp(own[0], own[1], _bounds(activation, activation_attrs, extra))
        y = producer_fn(attrs, *own)
        if not isinstance(y, np.ndarray) or y.dtype.kind != "f":
            return activation_fn(activation_attrs, y, *extra)
        kernels.clamp_in_place(y, _bounds(activation, activation_attrs, extra))
        return y

    fused.__name__ = f"{producer.lower().replace('+', '_')}_{activation.lower()}"
    return fused


def fuse_residual(conv_inputs: int, conv_at: int, add_fn: Callable[..., Any], add_attrs: Attrs) -> Callable[..., Any]:
    """A Conv and the Add that alone reads its output (a residual connection) as one function:
    ``conv_add(attrs, x, w[, b], r, clamp=None)`` with the Conv's ``attrs`` and ``conv_inputs``
    inputs, then the Add's other input ``r`` (``conv_at``: the Conv's output is the Add's input 0 or
    1); ``clamp`` a fused activation's bounds (:func:`fuse_clamp`).

    When ``r`` has the convolution's output shape and dtype, it is added in the pass that adds the
    bias (and clamps): no pass of its own and no array for the sum, as onnxruntime fuses it. Other
    inputs take the two operators one after the other (the first call always does, and learns the
    output's shape from it).
    """
    def conv_add(attrs: Attrs, *args: Any, clamp: Optional[Tuple[float, float]] = None) -> Any:
        x, w, r = args[0], args[1], args[conv_inputs]
        b = args[2] if conv_inputs > 2 else None
        fits = attrs.get("_residual")
        if (fits is not None and fits[0] == x.shape and fits[1] == w.shape and fits[2] == x.dtype
                and w.dtype == x.dtype and isinstance(r, np.ndarray) and r.shape == fits[3] and r.dtype == x.dtype):
            return _conv(attrs, x, w, b, clamp, r)
        y = _conv(attrs, x, w, b, None)
        if x.dtype.kind == "f" and w.dtype == x.dtype and y.dtype == x.dtype:
            attrs["_residual"] = (x.shape, w.shape, x.dtype, y.shape)      # what fixes the output's shape
        z = add_fn(add_attrs, y, r) if conv_at == 0 else add_fn(add_attrs, r, y)
        if clamp is not None:
            kernels.clamp_in_place(z, clamp)
        return z

    return conv_add


# -- a chain of dense layers ---------------------------------------------------------------------

def chain_link(op_type: str, fused: str, inputs: int) -> Optional[Tuple[float, ...]]:
    """Whether a step may join a chain of dense layers (:func:`gemm_chain`): for a Gemm with its weight
    and bias or none, its bounds, ``()`` alone or the Relu's in its pass; None for any other step."""
    if op_type != "Gemm" or inputs not in (2, 3) or fused not in ("", "Relu"):
        return None
    return _RELU if fused else ()


def gemm_chain(links: Sequence[Tuple[Attrs, Callable[..., Any], Tuple[float, ...]]]) -> Callable[..., Any]:
    """Gemm layers, each reading only the last one's output, as one step: ``chain(attrs, x, w1, b1, w2,
    b2, ...)`` (None for a missing bias). ``links`` holds each layer's attributes, step function and
    :func:`chain_link` bounds.

    Each layer computes what its own step would. The chain saves the Python between the layers (the
    executor's bookkeeping, the step functions' checks): when ``x`` looks as in the last call (shape,
    dtype, numba on or off) and the weights are the same objects, the runners the layers used then
    run back to back (a runner depends on the kinds of its inputs, which these fix). LeNet-300-100 at
    batch 1, one core, in one process: index mode 23.4 -> 22.1 us (onnxruntime 23.2), on test digits
    15.4 -> 14.1 us, dense mode 32.5 -> 30.8 us.
    """
    def chain(attrs: Attrs, x: np.ndarray, *params: Any) -> np.ndarray:
        weights, biases = params[0::2], params[1::2]
        last = attrs.get("_last")
        if last is not None and last[0] == x.shape and last[1] is x.dtype and last[2] is kernels.kernels():
            for ref, w in zip(last[3], weights):
                if ref() is not w:
                    break
            else:
                for run, w, b in zip(last[4], weights, biases):
                    x = run(x, w, b)
                return x
        shape, dtype, runs = x.shape, x.dtype, []
        for (link_attrs, fn, clamp), w, b in zip(links, weights, biases):
            if x.dtype.kind == "f":     # as the layer's step: fuse_clamp's float path
                run = _gemm_prepared(link_attrs, x, w, b, clamp or None)
                x = run(x, w, b)
                runs.append(run)
            else:
                x = fn(link_attrs, x, w, b)
                runs.append(None)
        kept = None
        if None not in runs:        # an integer layer has no runner to keep
            try:
                kept = (shape, dtype, kernels.kernels(), tuple(map(weakref.ref, weights)), tuple(runs))
            except TypeError:       # a weight without weak references
                pass
        if kept is None:
            attrs.pop("_last", None)
        else:
            attrs["_last"] = kept
        return x

    return chain


@register("ConvTranspose", weights=(1,))
def conv_transpose(attrs: Attrs, x: np.ndarray, w: Any, b: Optional[np.ndarray] = None) -> np.ndarray:
    """Transposed convolution with output_padding, output_shape, pads or auto_pad, groups.

    The full result has ``stride * (in - 1) + output_padding + (k - 1) * dilation + 1`` pixels per
    axis; pads crop it. With SAME auto_pad the output is ``in * stride`` (or ``output_shape``) and
    the crop is split between both ends; an explicit ``output_shape`` replaces the pads.
    """
    kernel = [int(k) for k in w.shape[2:]]
    dims = len(kernel)
    strides, dilations = _geometry(attrs, x, kernel)
    group = int(attrs.get("group", 1))
    extra = [int(p) for p in attrs.get("output_padding") or [0] * dims]
    insize = x.shape[2:]
    full = [s * (n - 1) + e + (k - 1) * d + 1
            for n, s, e, k, d in zip(insize, strides, extra, kernel, dilations)]
    mode = _text(attrs.get("auto_pad", "NOTSET"))
    out_shape = attrs.get("output_shape")
    if out_shape is not None and len(out_shape) > dims:
        out_shape = out_shape[-dims:]  # a full [N, C, ...] shape is accepted too
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        # the output is in * stride (or output_shape); the odd pixel is cropped at the end for
        # SAME_UPPER, at the beginning for SAME_LOWER
        out = [int(o) for o in out_shape] if out_shape is not None else [n * s for n, s in zip(insize, strides)]
        total = [f - o for f, o in zip(full, out)]
        begin = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in total]
    elif out_shape is not None:
        # an explicit size overrides pads: crop max(0, full - size), the odd pixel at the beginning
        # (the spec's rule, as onnxruntime applies it); a larger size adds zeros at the end
        out = [int(o) for o in out_shape]
        total = [max(0, f - o) for f, o in zip(full, out)]
        begin = [t - t // 2 for t in total]
    else:
        pads = [int(p) for p in attrs.get("pads") or [0] * (2 * dims)] if mode != "VALID" else [0] * (2 * dims)
        begin = pads[:dims]
        out = [f - pads[i] - pads[i + dims] for i, f in enumerate(full)]
    for size in (full, out):
        bounded([x.shape[0], w.shape[1] * group] + list(size), x.itemsize)
    y = kernels.conv_transpose(x, w, b, strides, dilations, begin, out, group)
    return y.astype(x.dtype, copy=False)


@register("Gemm", weights=(1,))
def gemm(attrs: Attrs, a: np.ndarray, b: Any, c: Optional[np.ndarray] = None) -> np.ndarray:
    """``alpha * A' @ B' + beta * C`` with optional transposes; B is the weight."""
    return _gemm(attrs, a, b, c, None)


def _gemm(attrs: Attrs, a: np.ndarray, b: Any, c: Optional[np.ndarray],
          clamp: Optional[Tuple[float, float]]) -> np.ndarray:
    return _gemm_prepared(attrs, a, b, c, clamp)(a, b, c)


def _gemm_prepared(attrs: Attrs, a: np.ndarray, b: Any, c: Optional[np.ndarray],
                   clamp: Optional[Tuple[float, float]]) -> Callable[..., Any]:
    """The runner for this call, ``run(a, b, c)``: the node's last one if the call looks the same."""
    run = _last(attrs, a, b, c, clamp)
    if run is None:
        run = _remember(attrs, a, b, c, clamp, _gemm_runner(attrs, a, b, c, clamp))
    return run


def _gemm_runner(attrs: Attrs, a: np.ndarray, b: Any, c: Optional[np.ndarray],
                 clamp: Optional[Tuple[float, float]]) -> Callable[..., Any]:
    """The node's product prepared once per kind of inputs it sees (kernels.product_runner)."""
    key = (a.shape, a.dtype, b.shape, type(b), None if c is None else (c.shape, c.dtype), clamp,
           kernels.kernels() is not None)
    runners = _runners(attrs)
    run = runners.get(key)
    if run is None:
        trans_b = bool(attrs.get("transB", 0))
        if (not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and a.dtype == np.float32
                and (c is None or (attrs.get("beta", 1.0) == 1.0 and c.dtype == np.float32
                                   and c.shape == (b.shape[0 if trans_b else 1],)))):
            # the common dense layer: bias and activation in the product's own pass (kernels.matmul)
            run = kernels.product_runner(a, b, c, clamp, trans_b)
        else:
            run = functools.partial(_gemm_general, trans_a=bool(attrs.get("transA", 0)), trans_b=trans_b,
                                    alpha=attrs.get("alpha", 1.0), beta=attrs.get("beta", 1.0), clamp=clamp)
        _keep(runners, key, run)
    return run


def _gemm_general(a: np.ndarray, b: Any, c: Optional[np.ndarray], *, trans_a: bool, trans_b: bool, alpha: float,
                  beta: float, clamp: Optional[Tuple[float, float]]) -> np.ndarray:
    """Gemm's other forms (transA, alpha or beta, a bias of another shape or dtype), the plain way."""
    product = kernels.matmul_t if trans_b else kernels.matmul
    a = a.T if trans_a else a
    y = product(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    y = y.astype(a.dtype, copy=False)
    if clamp is not None:
        np.clip(y, clamp[0], clamp[1], out=y)
    return y


@register("MatMul", weights=(0, 1))
def matmul(attrs: Attrs, a: Any, b: Any) -> np.ndarray:
    """numpy ``matmul`` semantics; a 2-D ``B`` (the usual weight) goes through the kernel, and so does a
    2-D weight ``A`` on the left (``W @ x``), read as held: never expanded whole in index mode."""
    dtype = (a if isinstance(a, np.ndarray) else b).dtype
    if a.ndim > 2 and b.ndim > 2:       # the batch axes broadcast
        bounded(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), dtype.itemsize)
    if not isinstance(a, np.ndarray) and a.ndim == 2 and isinstance(b, np.ndarray) and 1 <= b.ndim <= 3:
        y = kernels.lmatmul(a, b[:, None]) if b.ndim == 1 else kernels.lmatmul(a, b)
        return np.asarray(y if b.ndim > 1 else y[:, 0]).astype(dtype, copy=False)
    a = kernels.dense(a)
    if b.ndim == 2:
        y = kernels.matmul(a, b)
    else:
        y = np.matmul(a, kernels.dense(b))
    return np.asarray(y).astype(dtype, copy=False)


@register("Einsum")
def einsum(attrs: Attrs, *xs: np.ndarray) -> np.ndarray:
    """Einstein summation (numpy's, which implements the ONNX equation grammar)."""
    equation = _text(attrs["equation"]).replace(" ", "")
    bounded(_einsum_shape(equation, xs), xs[0].itemsize)
    return np.asarray(np.einsum(equation, *xs, optimize=len(xs) > 2)).astype(xs[0].dtype, copy=False)


def _einsum_shape(equation: str, xs: Sequence[np.ndarray]) -> List[int]:
    """The result's shape (an outer product can be huge), from the labels' sizes; numpy checks the rest."""
    terms, arrow, output = equation.partition("->")
    sizes: Dict[str, int] = {}
    ellipsis: Tuple[int, ...] = ()
    for term, x in zip(terms.split(","), xs):
        before, dots, after = term.partition("...")
        spread = x.ndim - len(before) - len(after)
        if dots:
            ellipsis = np.broadcast_shapes(ellipsis, x.shape[len(before):len(before) + spread])
        for label, d in zip(before + after, x.shape[:len(before)] + x.shape[x.ndim - len(after):]):
            sizes[label] = max(sizes.get(label, 1), int(d))
    if not arrow:   # implicit output: the labels used once, in alphabetical order
        once = sorted(c for c in set(terms) if c.isalpha() and terms.count(c) == 1)
        output = ("..." if "..." in terms else "") + "".join(once)
    before, dots, after = output.partition("...")
    return [sizes.get(c, 1) for c in before] + (list(ellipsis) if dots else []) + [sizes.get(c, 1) for c in after]


# -- pooling ---------------------------------------------------------------------------------------


def _pool_layout(attrs: Attrs, x: np.ndarray) -> Tuple[List[int], List[int], List[int], List[int], List[int]]:
    """Kernel, strides, dilations, begin pads and output size of a pooling node: worked out once per
    input shape and dtype (the node's last), not on every call, where it took ~4 us (LeNet-5's MaxPool
    nodes, one core: 20 maps of 24x24 9.6 -> 5.0 us, 50 of 8x8 8.1 -> 3.8 us)."""
    last = attrs.get("_pool_layout")
    if last is not None and last[0] == x.shape and last[1] is x.dtype:
        return last[2]
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides, dilations = _geometry(attrs, x, kernel)
    pads = resolve_pads(attrs, x.shape[2:], kernel, strides, dilations)
    out = _windows(x, kernel, strides, dilations, pads, bool(attrs.get("ceil_mode", 0)), pool=True)
    _bounded_windows(x, x.shape[1], pads, out)
    attrs["_pool_layout"] = (x.shape, x.dtype, (kernel, strides, dilations, pads, out))
    return kernel, strides, dilations, pads, out


def _padded(x: np.ndarray, pads: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
            dilations: Sequence[int], out: Sequence[int], fill: Any) -> np.ndarray:
    """``x`` padded with ``fill`` so every window of the output lies inside it."""
    dims = len(kernel)
    widths = [(0, 0), (0, 0)]
    for i in range(dims):
        need = (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        widths.append((pads[i], max(0, need - x.shape[2 + i] - pads[i])))
    return np.pad(x, widths, constant_values=fill)


def _taps(kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], out: Sequence[int]):
    """For each kernel tap: its offsets and the slices of the padded input it reads."""
    for offset in itertools.product(*(range(k) for k in kernel)):
        yield offset, (slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in zip(offset, dilations, out, strides))


def _lowest(dtype: np.dtype) -> Any:
    return -np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min


@register("MaxPool")
def max_pool(attrs: Attrs, x: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Max pooling (ceil_mode, dilations, pads, auto_pad) with the optional flat ``Indices`` output
    (row-major, or column-major with ``storage_order=1``), computed only when the node asks for it.
    2-D float32 pooling without it runs in a numba kernel (``kernels.max_pool2d``); this code is its
    twin."""
    kernel, strides, dilations, pads, out = _pool_layout(attrs, x)
    want_indices = attrs.get("_nout", 2) > 1
    if not want_indices:
        y = kernels.max_pool2d(x, kernel, strides, dilations, pads, out)
        if y is not None:
            return y
    xp = _padded(x, pads, kernel, strides, dilations, out, _lowest(x.dtype))
    spatial = x.shape[2:]
    # flat-index strides of the input's spatial axes
    order = range(len(spatial)) if attrs.get("storage_order", 0) == 1 else reversed(range(len(spatial)))
    step, size = [0] * len(spatial), 1
    for i in order:
        step[i], size = size, size * spatial[i]
    y: Optional[np.ndarray] = None
    best: Optional[np.ndarray] = None
    for offset, region in _taps(kernel, strides, dilations, out):
        v = xp[region]
        take = None if y is None or not want_indices else v > y  # the first maximum wins ties
        y = v.copy() if y is None else np.maximum(y, v, out=y)
        if want_indices:
            flat = np.zeros(out, dtype=np.int64)
            for i in range(len(spatial)):
                coord = np.arange(out[i]) * strides[i] + offset[i] * dilations[i] - pads[i]
                flat = flat + (coord * step[i]).reshape([-1 if j == i else 1 for j in range(len(spatial))])
            best = np.broadcast_to(flat, v.shape).copy() if take is None else np.where(take, flat, best)
    assert y is not None
    if not want_indices:
        return y
    assert best is not None
    base = np.arange(x.shape[0] * x.shape[1], dtype=np.int64).reshape(x.shape[:2] + (1,) * len(spatial))
    return y, best + base * size


@register("AveragePool")
def average_pool(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Average pooling; the divisor counts the pad cells only with ``count_include_pad=1``.

    Cells added past the end pad for ``ceil_mode`` are never counted.
    """
    kernel, strides, dilations, pads, out = _pool_layout(attrs, x)
    dims = len(kernel)
    xp = _padded(x, pads, kernel, strides, dilations, out, 0)
    # a 0/1 map of the cells that count, pooled the same way, gives each window's divisor
    inside = np.ones((1, 1) + x.shape[2:], dtype=np.float64)
    if attrs.get("count_include_pad", 0):
        inside = np.pad(inside, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)],
                        constant_values=1)
        inside = _padded(inside, [0] * (2 * dims), kernel, strides, dilations, out, 0)
    else:
        inside = _padded(inside, pads, kernel, strides, dilations, out, 0)
    total = np.zeros(x.shape[:2] + tuple(out), dtype=np.float64 if x.dtype == np.float64 else np.float32)
    count = np.zeros((1, 1) + tuple(out))
    for _, region in _taps(kernel, strides, dilations, out):
        total += xp[region]
        count += inside[region]
    return (total / np.maximum(count, 1)).astype(x.dtype, copy=False)


@register("LpPool")
def lp_pool(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``(sum |x|^p) ** (1/p)`` over each window (pads contribute zeros)."""
    kernel, strides, dilations, pads, out = _pool_layout(attrs, x)
    p = float(attrs.get("p", 2))
    xp = _padded(np.abs(x) ** p, pads, kernel, strides, dilations, out, 0)
    total = sum(xp[region] for _, region in _taps(kernel, strides, dilations, out))
    return (total ** (1 / p)).astype(x.dtype, copy=False)


@register("GlobalAveragePool")
def global_average_pool(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Mean over all spatial axes, kept as size-1 axes. float32/float64: one BLAS product of the rows
    with ``1/n`` (numpy's mean over many short rows is ~5x slower: 37 against 8 us for MobileNetV2's
    1280 7x7 maps)."""
    n = math.prod(x.shape[2:])
    if x.dtype in (np.float32, np.float64) and n > 0:
        y = x.reshape(-1, n) @ np.full(n, 1.0 / n, x.dtype)
        return y.reshape(x.shape[:2] + (1,) * (x.ndim - 2))
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True).astype(x.dtype, copy=False)


@register("GlobalMaxPool")
def global_max_pool(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Max over all spatial axes, kept as size-1 axes."""
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


@register("GlobalLpPool")
def global_lp_pool(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """p-norm over all spatial axes."""
    p = float(attrs.get("p", 2))
    axes = tuple(range(2, x.ndim))
    return (np.sum(np.abs(x) ** p, axis=axes, keepdims=True) ** (1 / p)).astype(x.dtype, copy=False)


@register("MaxUnpool")
def max_unpool(attrs: Attrs, x: np.ndarray, indices: np.ndarray,
               output_shape: Optional[np.ndarray] = None) -> np.ndarray:
    """Scatter pooled values back to the positions MaxPool's ``Indices`` recorded."""
    kernel = [int(k) for k in attrs["kernel_shape"]]
    dims = len(kernel)
    strides = [int(s) for s in attrs.get("strides") or [1] * dims]
    pads = [int(p) for p in attrs.get("pads") or [0] * (2 * dims)]
    # the indices address the default unpooled shape; a larger output_shape adds zeros at the end
    shape = x.shape[:2] + tuple((n - 1) * s - pads[i] - pads[i + dims] + k
                                for i, (n, s, k) in enumerate(zip(x.shape[2:], strides, kernel)))
    y = np.zeros(math.prod(bounded(shape, x.itemsize)), dtype=x.dtype)
    y[indices.reshape(-1)] = x.reshape(-1)
    y = y.reshape(shape)
    if output_shape is not None:
        target = tuple(bounded(output_shape.reshape(-1), x.itemsize))
        y = np.pad(y, [(0, max(0, t - s)) for t, s in zip(target, shape)])[tuple(slice(0, t) for t in target)]
    return y


# -- normalisation ---------------------------------------------------------------------------------


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast over ``[N, C, *spatial]``."""
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


@register("BatchNormalization")
def batch_normalization(attrs: Attrs, x: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                        mean: np.ndarray, var: np.ndarray) -> Any:
    """Inference: normalise with the running statistics. ``training_mode=1``: with the batch's own,
    also returning the updated running mean and variance (momentum 0.9)."""
    eps = attrs.get("epsilon", 1e-5)
    if attrs.get("training_mode", 0):
        axes = (0,) + tuple(range(2, x.ndim))
        batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
        m = attrs.get("momentum", 0.9)
        y = (x - _channel(batch_mean, x.ndim)) / np.sqrt(_channel(batch_var, x.ndim) + eps)
        y = y * _channel(scale, x.ndim) + _channel(bias, x.ndim)
        return (y.astype(x.dtype, copy=False), (mean * m + batch_mean * (1 - m)).astype(mean.dtype),
                (var * m + batch_var * (1 - m)).astype(var.dtype))
    factor = scale / np.sqrt(var + eps)
    if attrs.get("spatial", 1) == 0:    # opsets 7-8: statistics per activation, [C, *spatial]
        y = x * factor.reshape((1,) + x.shape[1:]) + (bias - mean * factor).reshape((1,) + x.shape[1:])
    else:
        y = x * _channel(factor, x.ndim) + _channel(bias - mean * factor, x.ndim)
    return y.astype(x.dtype, copy=False)


@register("InstanceNormalization")
def instance_normalization(attrs: Attrs, x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Normalise each (sample, channel) over its spatial axes."""
    axes = tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + attrs.get("epsilon", 1e-5))
    return (y * _channel(scale, x.ndim) + _channel(bias, x.ndim)).astype(x.dtype, copy=False)


@register("LayerNormalization")
def layer_normalization(attrs: Attrs, x: np.ndarray, scale: np.ndarray,
                        bias: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
    """Normalise over the axes from ``axis`` (-1) on; also returns Mean and InvStdDev."""
    axis = attrs.get("axis", -1) % x.ndim
    axes = tuple(range(axis, x.ndim))
    xs = x.astype(np.float32) if attrs.get("stash_type", 1) == 1 and x.dtype != np.float64 else x
    mu = xs.mean(axis=axes, keepdims=True)
    inv = 1 / np.sqrt(((xs - mu) ** 2).mean(axis=axes, keepdims=True) + attrs.get("epsilon", 1e-5))
    y = (xs - mu) * inv * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False), mu, inv


@register("RMSNormalization")
def rms_normalization(attrs: Attrs, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``x / sqrt(mean(x^2) + epsilon) * scale`` over the axes from ``axis`` (-1) on."""
    axis = attrs.get("axis", -1) % x.ndim
    xs = x.astype(np.float32) if x.dtype != np.float64 else x
    ms = np.mean(xs * xs, axis=tuple(range(axis, x.ndim)), keepdims=True)
    return (xs / np.sqrt(ms + attrs.get("epsilon", 1e-5)) * scale).astype(x.dtype, copy=False)


@register("GroupNormalization")
def group_normalization(attrs: Attrs, x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Normalise channel groups; scale/bias per channel (opset 21) or per group (opset 18)."""
    groups = int(attrs["num_groups"])
    n, c = x.shape[:2]
    xs = x.reshape((n, groups, -1)).astype(np.float32 if x.dtype != np.float64 else x.dtype)
    mu = xs.mean(axis=2, keepdims=True)
    var = xs.var(axis=2, keepdims=True)
    y = ((xs - mu) / np.sqrt(var + attrs.get("epsilon", 1e-5))).reshape(x.shape)
    if scale.shape[0] != c:  # per-group parameters: repeat over each group's channels
        scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
    return (y * _channel(scale, x.ndim) + _channel(bias, x.ndim)).astype(x.dtype, copy=False)


@register("LpNormalization")
def lp_normalization(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Divide by the L1 or L2 norm along ``axis`` (zero vectors stay zero)."""
    axis, p = attrs.get("axis", -1), attrs.get("p", 2)
    norm = np.sum(np.abs(x), axis=axis, keepdims=True) if p == 1 else np.sqrt(
        np.sum(x * x, axis=axis, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm == 0, 0, x / norm).astype(x.dtype, copy=False)


@register("MeanVarianceNormalization")
def mean_variance_normalization(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``(x - mean) / (std + 1e-9)`` over ``axes`` ([0, 2, 3])."""
    axes = tuple(attrs.get("axes", [0, 2, 3]))
    mu = x.mean(axis=axes, keepdims=True)
    std = np.sqrt((x * x).mean(axis=axes, keepdims=True) - mu * mu)
    return ((x - mu) / (std + 1e-9)).astype(x.dtype, copy=False)


@register("LRN")
def lrn(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Local response normalisation across channels (AlexNet)."""
    size = int(attrs["size"])
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = np.pad(x * x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    c = x.shape[1]
    total = sum(sq[:, i:i + c] for i in range(size))
    return (x / (bias + alpha / size * total) ** beta).astype(x.dtype, copy=False)


# -- softmax family --------------------------------------------------------------------------------


def _softmax_axes(attrs: Attrs, x: np.ndarray) -> Tuple[np.ndarray, int]:
    """Before opset 13 softmax treats ``x`` as 2-D ``[prod(shape[:axis]), prod(shape[axis:])]``."""
    if attrs.get("_opset", 17) < 13:
        axis = attrs.get("axis", 1) % max(x.ndim, 1)
        rows, cols = (int(np.prod(x.shape[s], dtype=np.int64)) for s in (slice(axis), slice(axis, None)))
        return x.reshape(rows, cols), 1     # both given: an empty batch leaves -1 undefined
    return x, attrs.get("axis", -1)


#: Largest Softmax input for the compiled kernel: its exp is scalar, numpy's vectorised (a [1, 512]
#: input 4.0 against 5.0 us, [8, 1000] 35 against 14), but numpy's six calls cost ~4 us on any size.
SOFTMAX_COMPILED = 512


@register("Softmax")
def softmax(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``exp(x - max) / sum`` along ``axis`` (-1; opset < 13: 1, over the flattened tail)."""
    v, axis = _softmax_axes(attrs, x)
    k = kernels.kernels()
    if (k is not None and v.ndim and 0 < v.size <= SOFTMAX_COMPILED and axis % v.ndim == v.ndim - 1
            and v.dtype == np.float32 and v.flags.c_contiguous):    # along the last axis: one call
        if v.ndim != 2:
            v = v.reshape(-1, v.shape[-1])
        out = np.empty(v.shape, np.float32)
        k.softmax_rows(v, out)
        return out if out.shape == x.shape else out.reshape(x.shape)
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).reshape(x.shape).astype(x.dtype, copy=False)


@register("LogSoftmax")
def log_softmax(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``x - max - log(sum(exp(x - max)))`` along ``axis`` (semantics as Softmax)."""
    v, axis = _softmax_axes(attrs, x)
    shifted = v - v.max(axis=axis, keepdims=True)
    y = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return y.reshape(x.shape).astype(x.dtype, copy=False)


@register("Hardmax")
def hardmax(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """1 at the first maximum along ``axis``, 0 elsewhere (semantics as Softmax)."""
    v, axis = _softmax_axes(attrs, x)
    first = np.expand_dims(np.argmax(v, axis=axis), axis)
    y = np.zeros_like(v)
    np.put_along_axis(y, first, 1, axis=axis)
    return y.reshape(x.shape)


@register("DepthToSpace")
def depth_to_space(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Move channel blocks to ``blocksize x blocksize`` spatial tiles (DCR or CRD order)."""
    b = int(attrs["blocksize"])
    n, c, h, w = x.shape
    if _text(attrs.get("mode", "DCR")) == "CRD":
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("SpaceToDepth")
def space_to_depth(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Inverse of DepthToSpace (DCR order, or CRD)."""
    b = int(attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b)
    if _text(attrs.get("mode", "DCR")) == "CRD":
        y = y.transpose(0, 1, 3, 5, 2, 4)
    else:
        y = y.transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)

