"""Tensor and shape operators: reshaping, indexing, reductions, casts, resizing.

Shape arithmetic runs on int64 arrays as in ONNX; every operator accepts both the opset-13+ form
(axes, split, pads... as inputs) and the older attribute form.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import kernels
from dcrt.errors import InputError, UnsupportedOperatorError

from . import bounded, register

Attrs = Dict[str, Any]

#: ONNX ``TensorProto.DataType`` -> numpy dtype (those numpy has).
ONNX_DTYPES: Dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16),
    5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64), 8: np.dtype(object),
    9: np.dtype(np.bool_), 10: np.dtype(np.float16), 11: np.dtype(np.float64),
    12: np.dtype(np.uint32), 13: np.dtype(np.uint64), 14: np.dtype(np.complex64),
    15: np.dtype(np.complex128),
}


def onnx_dtype(code: int) -> np.dtype:
    """The numpy dtype of an ONNX element type code (``UnsupportedOperatorError`` for bfloat16, float8...)."""
    try:
        return ONNX_DTYPES[int(code)]
    except KeyError:
        raise UnsupportedOperatorError(f"ONNX element type {code} has no numpy equivalent") from None


def _ints(v: Any) -> List[int]:
    if type(v) is np.ndarray and v.ndim == 1 and v.dtype.kind in "iu":
        return v.tolist()       # Python ints already (a Squeeze's axes: 1.1 -> 0.2 us)
    return [int(i) for i in np.asarray(v).reshape(-1).tolist()]     # Python numbers: ~5x faster to int()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _from(attrs: Attrs, value: Optional[np.ndarray], name: str) -> Optional[List[int]]:
    """An int list given as an input (opset 13+ style) or, failing that, as an attribute."""
    if value is not None:
        return _ints(value)
    got = attrs.get(name)
    return None if got is None else [int(i) for i in got]


# -- plain data movement ---------------------------------------------------------------------------


@register("Identity")
def identity(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """The input itself (values are never modified in place, so no copy is needed)."""
    return x


@register("Dropout")
def dropout(attrs: Attrs, x: np.ndarray, ratio: Optional[np.ndarray] = None,
            training: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Inference: the input unchanged, and an all-true mask."""
    rate = float(ratio) if ratio is not None else attrs.get("ratio", 0.5)
    if training is not None and bool(training) and rate > 0:
        raise UnsupportedOperatorError("Dropout in training mode is random; dcrt only runs inference")
    return x, np.ones(x.shape, dtype=bool)


@register("Constant")
def constant(attrs: Attrs) -> np.ndarray:
    """The constant held in whichever ``value*`` attribute is present."""
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key in ("value_string", "value_strings"):
        if key in attrs:
            return np.asarray(attrs[key], dtype=object)
    raise UnsupportedOperatorError(f"Constant with attributes {sorted(k for k in attrs if k[0] != '_')}")


@register("Cast")
def cast(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Convert to the element type ``to`` (an ONNX type code)."""
    return x.astype(onnx_dtype(attrs["to"]))


@register("CastLike")
def cast_like(attrs: Attrs, x: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Convert to the element type of the second input."""
    return x.astype(like.dtype)


@register("Shape")
def shape(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """The shape as int64, optionally the ``[start:end]`` part (clamped, negative allowed)."""
    start, end = attrs.get("start", 0), attrs.get("end")
    return np.asarray(x.shape[start:end], dtype=np.int64)


@register("Size")
def size(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """The element count as an int64 scalar."""
    return np.asarray(x.size, dtype=np.int64)


@register("Reshape")
def reshape(attrs: Attrs, x: np.ndarray, target: Optional[np.ndarray] = None) -> np.ndarray:
    """Reshape; 0 copies the input's dim (unless ``allowzero``) and one -1 is inferred."""
    dims = _from(attrs, target, "shape") or []
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@register("Flatten")
def flatten(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """2-D ``[prod(shape[:axis]), prod(shape[axis:])]`` (axis 1, may be negative)."""
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose")
def transpose(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Permute axes by ``perm`` (default: reverse)."""
    perm = attrs.get("perm")
    return np.transpose(x, perm if perm is not None else None)


@register("Squeeze")
def squeeze(attrs: Attrs, x: np.ndarray, axes: Optional[np.ndarray] = None) -> np.ndarray:
    """Drop the given size-1 axes (all size-1 axes when none are given)."""
    picked = _from(attrs, axes, "axes")
    if picked is None:
        return np.squeeze(x)
    return x.squeeze(axis=tuple(a % x.ndim for a in picked)) if picked else x


@register("Unsqueeze")
def unsqueeze(attrs: Attrs, x: np.ndarray, axes: Optional[np.ndarray] = None) -> np.ndarray:
    """Insert size-1 axes at the given positions of the output."""
    picked = _from(attrs, axes, "axes") or []
    rank = x.ndim + len(picked)
    shape_out = list(x.shape)
    for a in sorted(a % rank for a in picked):
        shape_out.insert(a, 1)
    return x.reshape(shape_out)


@register("Concat")
def concat(attrs: Attrs, *xs: np.ndarray) -> np.ndarray:
    """Join along ``axis``."""
    return np.concatenate([x for x in xs if x is not None], axis=attrs["axis"])


@register("Split")
def split(attrs: Attrs, x: np.ndarray, sizes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
    """Split along ``axis`` by ``split`` sizes (input or attribute), ``num_outputs``, or evenly."""
    axis = attrs.get("axis", 0) % x.ndim
    dim = x.shape[axis]
    parts = _from(attrs, sizes, "split")
    if parts is None:
        count = int(attrs.get("num_outputs", attrs.get("_nout", 1)))
        chunk = -(-dim // count)  # the last part may be smaller
        parts = [min(chunk, dim - i * chunk) for i in range(count)]
    bounds = np.cumsum(parts)[:-1]
    return tuple(np.split(x, bounds, axis=axis))


@register("Slice")
def slice_(attrs: Attrs, x: np.ndarray, starts: Optional[np.ndarray] = None,
           ends: Optional[np.ndarray] = None, axes: Optional[np.ndarray] = None,
           steps: Optional[np.ndarray] = None) -> np.ndarray:
    """Strided slice; out-of-range bounds are clamped, negative ones count from the end."""
    begin = _from(attrs, starts, "starts") or []
    stop = _from(attrs, ends, "ends") or []
    axis_list = _from(attrs, axes, "axes") or list(range(len(begin)))
    step_list = _ints(steps) if steps is not None else [1] * len(begin)
    index = [slice(None)] * x.ndim
    for b, e, a, s in zip(begin, stop, axis_list, step_list):
        dim = x.shape[a]
        b = b + dim if b < 0 else b
        e = e + dim if e < 0 else e
        if s > 0:
            b, e = min(max(b, 0), dim), min(max(e, 0), dim)
            index[a % x.ndim] = slice(b, e, s)
        else:
            b, e = min(max(b, 0), dim - 1), min(max(e, -1), dim - 1)
            index[a % x.ndim] = slice(b, e if e >= 0 else None, s)
    return x[tuple(index)]


@register("Pad")
def pad(attrs: Attrs, x: np.ndarray, pads: Optional[np.ndarray] = None,
        value: Optional[np.ndarray] = None, axes: Optional[np.ndarray] = None) -> np.ndarray:
    """Pad (negative pads crop) in ``constant``, ``reflect``, ``edge`` or ``wrap`` mode."""
    amounts = _from(attrs, pads, "pads") or []
    picked = _ints(axes) if axes is not None else list(range(x.ndim))
    n = len(picked)
    widths = [[0, 0] for _ in range(x.ndim)]
    for i, a in enumerate(picked):
        widths[a % x.ndim] = [amounts[i], amounts[i + n]]
    # crop first (negative pads), then pad what remains
    x = x[tuple(slice(-b if b < 0 else 0, x.shape[i] + e if e < 0 else None)
                for i, (b, e) in enumerate(widths))]
    widths = [(max(b, 0), max(e, 0)) for b, e in widths]
    bounded([n + b + e for n, (b, e) in zip(x.shape, widths)], x.itemsize)
    mode = _text(attrs.get("mode", "constant"))
    if mode == "constant":
        fill = value.reshape(-1)[0] if value is not None and value.size else attrs.get("value", 0)
        return np.pad(x, widths, mode="constant", constant_values=fill)
    return np.pad(x, widths, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])


@register("Tile")
def tile(attrs: Attrs, x: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    """Repeat the whole tensor ``repeats[i]`` times along axis ``i``."""
    times = _ints(repeats)
    bounded([n * t for n, t in zip(x.shape, times)] + times[x.ndim:], x.itemsize)
    return np.tile(x, times)


@register("Expand")
def expand(attrs: Attrs, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Broadcast to ``np.broadcast_shapes(x.shape, shape)`` (shape may be smaller than x's)."""
    out = tuple(bounded(np.broadcast_shapes(x.shape, tuple(_ints(target))), x.itemsize))
    return np.broadcast_to(x, out).copy()


@register("ConstantOfShape")
def constant_of_shape(attrs: Attrs, target: np.ndarray) -> np.ndarray:
    """A tensor of the given shape filled with ``value`` (float32 zero by default)."""
    value = attrs.get("value")
    value = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value)
    return np.full(bounded(_ints(target), value.itemsize), value.reshape(-1)[0], dtype=value.dtype)


@register("Range")
def range_(attrs: Attrs, start: np.ndarray, limit: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``start, start + delta, ...`` below ``limit``: ``max(ceil((limit - start) / delta), 0)`` items."""
    start, limit, delta = (np.asarray(v).reshape(-1)[0] for v in (start, limit, delta))
    count = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
    bounded([count], 8)
    return (start + np.arange(count, dtype=np.float64 if start.dtype.kind == "f" else np.int64)
            * delta).astype(start.dtype)


@register("EyeLike")
def eye_like(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """An identity-like 2-D tensor, the diagonal shifted by ``k``."""
    dtype = onnx_dtype(attrs["dtype"]) if "dtype" in attrs else x.dtype
    return np.eye(x.shape[0], x.shape[1], k=attrs.get("k", 0), dtype=dtype)


@register("Trilu")
def trilu(attrs: Attrs, x: np.ndarray, k: Optional[np.ndarray] = None) -> np.ndarray:
    """Upper (default) or lower triangle of the last two axes, offset ``k``."""
    shift = int(k) if k is not None else 0
    return np.triu(x, shift) if attrs.get("upper", 1) else np.tril(x, shift)


# -- indexing --------------------------------------------------------------------------------------


@register("Gather", weights=(0,))
def gather(attrs: Attrs, data: Any, indices: np.ndarray) -> np.ndarray:
    """``take`` along ``axis``; along axis 0 (an embedding lookup) through ``kernels.take_rows``."""
    axis = attrs.get("axis", 0) % data.ndim
    if axis == 0:
        return kernels.take_rows(data, indices)
    return np.take(kernels.dense(data), kernels.wrap_indices(indices, data.shape[axis], axis), axis=axis)


@register("GatherElements")
def gather_elements(attrs: Attrs, data: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``take_along_axis`` with negative indices."""
    axis = attrs.get("axis", 0) % data.ndim
    return np.take_along_axis(data, kernels.wrap_indices(indices, data.shape[axis], axis), axis=axis)


@register("GatherND")
def gather_nd(attrs: Attrs, data: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Gather slices addressed by the last axis of ``indices``, after ``batch_dims`` shared axes."""
    b = attrs.get("batch_dims", 0)
    depth = indices.shape[-1]
    batch = int(np.prod(data.shape[:b], dtype=np.int64))
    flat_data = data.reshape((batch,) + data.shape[b:])
    flat_idx = indices.reshape(batch, -1, depth).astype(np.int64)
    flat_idx = np.where(flat_idx < 0, flat_idx + np.asarray(data.shape[b:b + depth]), flat_idx)
    rows = [flat_data[i][tuple(flat_idx[i].T)] for i in range(batch)]
    return np.asarray(rows).reshape(indices.shape[:-1] + data.shape[b + depth:])


_REDUCERS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


@register("ScatterND")
def scatter_nd(attrs: Attrs, data: np.ndarray, indices: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """Copy of ``data`` with the slices at ``indices`` replaced (or reduced) by ``updates``."""
    out = data.copy()
    depth = indices.shape[-1]
    idx = indices.reshape(-1, depth)
    idx = np.where(idx < 0, idx + np.asarray(data.shape[:depth]), idx)
    upd = updates.reshape((idx.shape[0],) + data.shape[depth:])
    reduction = _text(attrs.get("reduction", "none"))
    if reduction == "none":
        out[tuple(idx.T)] = upd
    else:
        _REDUCERS[reduction].at(out, tuple(idx.T), upd)
    return out


@register("ScatterElements", "Scatter")
def scatter_elements(attrs: Attrs, data: np.ndarray, indices: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """Copy of ``data`` with ``updates`` written at ``indices`` along ``axis``."""
    axis = attrs.get("axis", 0) % data.ndim
    out = data.copy()
    where = list(np.indices(indices.shape, sparse=True))
    where[axis] = kernels.wrap_indices(indices, data.shape[axis], axis)
    reduction = _text(attrs.get("reduction", "none"))
    if reduction == "none":
        out[tuple(where)] = updates
    else:
        _REDUCERS[reduction].at(out, tuple(where), updates)
    return out


@register("Compress")
def compress(attrs: Attrs, x: np.ndarray, condition: np.ndarray) -> np.ndarray:
    """Keep the slices where ``condition`` is true (along ``axis``, or of the flattened input)."""
    return np.compress(condition.astype(bool), x, axis=attrs.get("axis"))


@register("OneHot")
def one_hot(attrs: Attrs, indices: np.ndarray, depth: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values[1]`` at each index along a new ``axis`` of size ``depth``, ``values[0]`` elsewhere."""
    d = int(np.asarray(depth).reshape(-1)[0])
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)
    axis = attrs.get("axis", -1)
    axis = axis + idx.ndim + 1 if axis < 0 else axis
    bounded(idx.shape + (d,), max(values.itemsize, 1))
    hot = np.expand_dims(idx, axis) == np.arange(d).reshape([-1 if i == axis else 1 for i in range(idx.ndim + 1)])
    return np.where(hot, values[1], values[0]).astype(values.dtype)


@register("NonZero")
def non_zero(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Indices of the non-zero elements, ``[rank, count]`` int64."""
    return np.asarray(np.nonzero(np.atleast_1d(x) if x.ndim == 0 else x), dtype=np.int64).reshape(
        max(x.ndim, 1), -1)


@register("TopK")
def top_k(attrs: Attrs, x: np.ndarray, k: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest (or smallest) along ``axis``; ties keep the lower index first."""
    count = int(np.asarray(k).reshape(-1)[0]) if k is not None else int(attrs["k"])
    axis = attrs.get("axis", -1) % x.ndim
    n = x.shape[axis]
    if attrs.get("largest", 1):
        # a stable ascending sort of the reversed axis, read backwards: descending, ties by index
        order = np.argsort(np.flip(x, axis), axis=axis, kind="stable")
        order = (n - 1 - np.flip(order, axis)).take(range(count), axis=axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable").take(range(count), axis=axis)
    return np.take_along_axis(x, order, axis=axis), order.astype(np.int64)


@register("CumSum")
def cum_sum(attrs: Attrs, x: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Running sum along ``axis``, optionally ``exclusive`` and/or ``reverse``."""
    return _cumulative(attrs, x, int(np.asarray(axis).reshape(-1)[0]), np.cumsum, 0)


@register("CumProd")
def cum_prod(attrs: Attrs, x: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Running product along ``axis``, optionally ``exclusive`` and/or ``reverse``."""
    return _cumulative(attrs, x, int(np.asarray(axis).reshape(-1)[0]), np.cumprod, 1)


def _cumulative(attrs: Attrs, x: np.ndarray, axis: int, fn: Any, unit: int) -> np.ndarray:
    axis %= x.ndim
    v = np.flip(x, axis) if attrs.get("reverse", 0) else x
    y = fn(v, axis=axis, dtype=x.dtype)
    if attrs.get("exclusive", 0):
        head = np.full_like(y.take([0], axis=axis), unit)
        y = np.concatenate([head, y.take(range(y.shape[axis] - 1), axis=axis)], axis=axis)
    return np.flip(y, axis) if attrs.get("reverse", 0) else y


@register("ReverseSequence")
def reverse_sequence(attrs: Attrs, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Reverse the first ``lengths[b]`` steps of each batch entry along the time axis."""
    batch_axis, time_axis = attrs.get("batch_axis", 1), attrs.get("time_axis", 0)
    y = x.copy()
    for b, n in enumerate(_ints(lengths)):
        src = [slice(None)] * x.ndim
        src[batch_axis], src[time_axis] = b, slice(None, n)
        dst = list(src)
        dst[time_axis] = slice(n - 1, None, -1) if n > 0 else slice(0, 0)
        y[tuple(src)] = x[tuple(dst)]
    return y


@register("Det")
def det(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Determinant of the trailing square matrices."""
    return np.linalg.det(x).astype(x.dtype, copy=False)


@register("Unique")
def unique(attrs: Attrs, x: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Unique values (or slices along ``axis``), sorted or in order of first occurrence,
    with first indices, inverse indices and counts."""
    axis = attrs.get("axis")
    values, first, inverse, counts = np.unique(x if axis is not None else x.reshape(-1), axis=axis,
                                               return_index=True, return_inverse=True,
                                               return_counts=True)
    inverse = inverse.reshape(-1)
    if not attrs.get("sorted", 1):
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        values = np.take(values, order, axis=axis if axis is not None else 0)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    return (values, first.astype(np.int64), inverse.astype(np.int64), counts.astype(np.int64))


# -- reductions ------------------------------------------------------------------------------------


def _reduce_axes(attrs: Attrs, x: np.ndarray, axes: Optional[np.ndarray]) -> Optional[Tuple[int, ...]]:
    """The axes to reduce; ``None`` means all. Empty axes with ``noop_with_empty_axes``: ``()``."""
    picked = _from(attrs, axes, "axes")
    if not picked:
        return () if attrs.get("noop_with_empty_axes", 0) else None
    return tuple(a % x.ndim for a in picked)


def _reduction(name: str, fn: Any, pre: Any = None, post: Any = None) -> None:
    def run(attrs: Attrs, x: np.ndarray, axes: Optional[np.ndarray] = None) -> np.ndarray:
        # picked == () (no axes, noop_with_empty_axes): numpy reduces over no axis, so an element-wise
        # part is still applied (ReduceL1 gives |x|, ReduceLogSum log x), as onnxruntime does
        picked = _reduce_axes(attrs, x, axes)
        keep = bool(attrs.get("keepdims", 1))
        v = pre(x) if pre else x
        y = fn(v, picked, keep)
        y = post(y) if post else y
        return np.asarray(y).astype(x.dtype, copy=False)

    run.__name__ = name.lower()
    run.__doc__ = f"ONNX ``{name}`` over ``axes`` (input or attribute; all by default)."
    register(name)(run)


def _extreme(ufunc: Any, empty: float) -> Any:
    def fn(v: np.ndarray, axes: Any, keep: bool) -> np.ndarray:
        if v.size == 0:  # the identity of max/min over an empty set
            if v.dtype.kind == "f":
                fill = empty
            elif v.dtype.kind == "b":
                fill = empty > 0  # max of nothing is False, min is True
            else:
                fill = np.iinfo(v.dtype).min if empty < 0 else np.iinfo(v.dtype).max
            return ufunc.reduce(v, axis=axes, keepdims=keep, initial=fill)
        return ufunc.reduce(v, axis=axes, keepdims=keep)

    return fn


_reduction("ReduceSum", lambda v, a, k: np.sum(v, axis=a, keepdims=k))
_reduction("ReduceMean", lambda v, a, k: np.mean(v, axis=a, keepdims=k))
_reduction("ReduceProd", lambda v, a, k: np.prod(v, axis=a, keepdims=k))
_reduction("ReduceMax", _extreme(np.maximum, -np.inf))
_reduction("ReduceMin", _extreme(np.minimum, np.inf))
_reduction("ReduceL1", lambda v, a, k: np.sum(np.abs(v), axis=a, keepdims=k))
_reduction("ReduceL2", lambda v, a, k: np.sqrt(np.sum(v * v, axis=a, keepdims=k)))
_reduction("ReduceSumSquare", lambda v, a, k: np.sum(v * v, axis=a, keepdims=k))
_reduction("ReduceLogSum", lambda v, a, k: np.log(np.sum(v, axis=a, keepdims=k)))
_reduction("ReduceLogSumExp", lambda v, a, k: _logsumexp(v, a, k))


def _logsumexp(v: np.ndarray, axes: Any, keep: bool) -> np.ndarray:
    if v.size == 0:
        return np.log(np.sum(np.exp(v), axis=axes, keepdims=keep))
    top = np.max(v, axis=axes, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    y = np.log(np.sum(np.exp(v - top), axis=axes, keepdims=True)) + top
    return y if keep else np.squeeze(y, axis=axes)


def _arg(name: str, fn: Any) -> None:
    def run(attrs: Attrs, x: np.ndarray) -> np.ndarray:
        axis = attrs.get("axis", 0) % x.ndim
        if attrs.get("select_last_index", 0):
            idx = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis)
        else:
            idx = fn(x, axis=axis)
        if attrs.get("keepdims", 1):
            idx = np.expand_dims(idx, axis)
        return np.asarray(idx, dtype=np.int64)

    run.__name__ = name.lower()
    run.__doc__ = f"ONNX ``{name}``: int64 position along ``axis`` (first, or last with select_last_index)."
    register(name)(run)


_arg("ArgMax", np.argmax)
_arg("ArgMin", np.argmin)


# -- resizing --------------------------------------------------------------------------------------


def _source_coords(mode: str, out: int, length: int, scale: float, roi: Tuple[float, float],
                   sized: bool = False) -> np.ndarray:
    """Input coordinate of every output index along one axis (``coordinate_transformation_mode``).

    ``scale * length`` (a float, not the rounded output size) is the "resized length", as in the
    ONNX reference. The arithmetic is float32, as in onnxruntime: with a float32 scale such as 0.6,
    float64 would put some coordinates a hair below an integer that nearest ``floor`` then misses.
    ``sized``: the output size was given (``sizes``), so the ratio is exact, ``length / out``: float64
    products of whole numbers then one division, exact wherever the coordinate is (13 -> 7 rows with
    align_corners reads 0, 2, ..., 12; a float32 scale 7/13 made it 0, 1, 3, ...).
    """
    if sized:
        x, resized = np.arange(out, dtype=np.float64), float(out)

        def unscale(v: np.ndarray) -> np.ndarray:
            return v * length / out
    else:
        x, scale = np.arange(out, dtype=np.float32), np.float32(scale)
        resized = scale * np.float32(length)

        def unscale(v: np.ndarray) -> np.ndarray:
            return v / scale
    if mode == "half_pixel":
        return unscale(x + 0.5) - 0.5
    if mode == "half_pixel_symmetric":
        offset = length / 2 * (1 - out / resized)
        return offset + unscale(x + 0.5) - 0.5
    if mode == "pytorch_half_pixel":
        return unscale(x + 0.5) - 0.5 if resized > 1 else np.full(out, -0.5)
    if mode == "align_corners":
        return x * (length - 1) / (resized - 1) if resized != 1 else np.zeros(out)
    if mode == "asymmetric":
        return unscale(x)
    if mode == "tf_half_pixel_for_nn":
        return unscale(x + 0.5)
    if mode == "tf_crop_and_resize":
        start, end = roi
        if resized == 1:
            return np.full(out, (end - start) * (length - 1) / 2 + start * (length - 1))
        return start * (length - 1) + x * (end - start) * (length - 1) / (resized - 1)
    raise UnsupportedOperatorError(f"Resize coordinate_transformation_mode '{mode}'")


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel at distance ``t``."""
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def _resize_taps(attrs: Attrs, src: np.ndarray, length: int, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """Per output index: the input indices it reads (``[out, taps]``) and their weights."""
    mode = _text(attrs.get("mode", "nearest"))
    if mode == "nearest":
        rounding = _text(attrs.get("nearest_mode", "round_prefer_floor"))
        if rounding == "simple":
            rounding = "ceil" if scale < 1 else "floor"
        pick = {"round_prefer_floor": lambda v: np.ceil(v - 0.5),
                "round_prefer_ceil": lambda v: np.floor(v + 0.5),
                "floor": np.floor, "ceil": np.ceil}[rounding](src)
        return np.clip(pick, 0, length - 1).astype(np.int64)[:, None], np.ones((src.size, 1))
    # base index f with the fraction r = src - f in (0, 1], as the ONNX reference picks neighbours
    base = np.ceil(src) - 1
    r = (src - base)[:, None]
    shrink = min(scale, 1.0) if attrs.get("antialias", 0) else 1.0
    if mode == "linear":
        start = int(math.floor(-1 / shrink) + 1)
        offsets = np.arange(start, 2 - start)
        weights = np.clip(1 - np.abs(offsets - r) * shrink, 0, 1)
    elif mode == "cubic":
        start = int(math.floor(-2 / shrink) + 1)
        offsets = np.arange(start, 2 - start)
        weights = _cubic((offsets - r) * shrink, attrs.get("cubic_coeff_a", -0.75))
    else:
        raise UnsupportedOperatorError(f"Resize mode '{mode}'")
    index = base[:, None] + offsets
    if attrs.get("exclude_outside", 0):
        weights = np.where((index < 0) | (index > length - 1), 0.0, weights)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return np.clip(index, 0, length - 1).astype(np.int64), weights


def _resize_axis(attrs: Attrs, x: np.ndarray, axis: int, out: int, scale: float,
                 roi: Tuple[float, float], sized: bool = False) -> np.ndarray:
    """Resample one axis (resizing is separable, so N-D is a sequence of these); ``sized``: see
    :func:`_source_coords`."""
    length = x.shape[axis]
    coord_mode = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    src = _source_coords(coord_mode, out, length, scale, roi, sized)
    index, weights = _resize_taps(attrs, src, length, scale)
    shape = [1] * x.ndim
    shape[axis] = out
    y = None
    for t in range(index.shape[1]):
        term = np.take(x, index[:, t].astype(np.intp, copy=False), axis=axis)
        if weights.shape[1] > 1 or _text(attrs.get("mode", "nearest")) != "nearest":
            term = term * weights[:, t].reshape(shape).astype(x.dtype if x.dtype.kind == "f" else np.float64)
        y = term if y is None else y + term
    if coord_mode == "tf_crop_and_resize":
        outside = ((src < 0) | (src > length - 1)).reshape(shape)
        y = np.where(outside, attrs.get("extrapolation_value", 0.0), y)
    return y


def resize_nd(attrs: Attrs, x: np.ndarray, scales: Optional[Sequence[float]],
              sizes: Optional[Sequence[int]], roi: Optional[Sequence[float]]) -> np.ndarray:
    """Resize ``x`` by ``scales`` or to ``sizes`` (on ``axes``), axis by axis."""
    rank = x.ndim
    axes = [a % rank for a in attrs.get("axes") or range(rank)]
    full_scale = [1.0] * rank
    full_size = list(x.shape)
    policy = _text(attrs.get("keep_aspect_ratio_policy", "stretch"))
    sized = sizes is not None and len(sizes) > 0 and policy == "stretch"
    if sizes is not None and len(sizes):
        for a, s in zip(axes, sizes):
            full_size[a] = int(s)
            full_scale[a] = int(s) / x.shape[a] if x.shape[a] else 1.0     # an empty axis: checked below
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            common = pick(full_scale[a] for a in axes)
            for a in axes:
                full_scale[a] = common
                full_size[a] = int(common * x.shape[a] + 0.5)
    else:
        assert scales is not None
        for a, s in zip(axes, scales):
            full_scale[a] = float(s)
            full_size[a] = int(float(s) * x.shape[a])
    bounded(full_size, 8 if x.dtype.kind != "f" else x.itemsize)
    if x.size == 0:     # an empty batch (or map): nothing to interpolate, but nothing from nothing either
        grown = [a for a in range(rank) if x.shape[a] == 0 and full_size[a] > 0]
        if grown:
            raise InputError(f"Resize cannot make axis {grown[0]} of {full_size[grown[0]]} from an empty one "
                             f"(input shape {list(x.shape)})")
        return np.zeros(full_size, x.dtype)
    boxes = [(0.0, 1.0)] * rank
    if roi is not None and len(roi):
        n = len(roi) // 2
        for i, a in enumerate(axes if n == len(axes) else range(rank)):
            boxes[a] = (float(roi[i]), float(roi[i + n]))
    crop = _text(attrs.get("coordinate_transformation_mode", "half_pixel")) == "tf_crop_and_resize"
    work = x if x.dtype.kind == "f" else x.astype(np.float64)
    for a in range(rank):
        if full_size[a] == x.shape[a] and full_scale[a] == 1.0 and (not crop or boxes[a] == (0.0, 1.0)):
            continue
        work = _resize_axis(attrs, work, a, full_size[a], full_scale[a], boxes[a], sized)
    if x.dtype.kind in "iu":    # rounded, and a cubic's overshoot saturated (not wrapped: 256 -> 0)
        info = np.iinfo(x.dtype)
        work = np.clip(np.round(work), info.min, info.max)
    return work.astype(x.dtype, copy=False)


@register("Resize")
def resize(attrs: Attrs, x: np.ndarray, roi: Optional[np.ndarray] = None,
           scales: Optional[np.ndarray] = None, sizes: Optional[np.ndarray] = None) -> np.ndarray:
    """Nearest (4 rounding modes), linear or cubic resize with every coordinate transformation
    mode, scales or sizes, antialias, axes and keep_aspect_ratio_policy."""
    if attrs.get("_opset", 17) < 11:
        # Resize-10: inputs (X, scales), asymmetric coordinates, and nearest rounds down when
        # upsampling an axis, up when downsampling it (onnxruntime's rule for this version)
        scales, roi = roi, None
        attrs = dict(attrs, coordinate_transformation_mode="asymmetric",
                     nearest_mode="simple")
    scale_list = None if scales is None or scales.size == 0 else [float(s) for s in scales.reshape(-1)]
    size_list = None if sizes is None or sizes.size == 0 else _ints(sizes)
    roi_list = None if roi is None or roi.size == 0 else [float(v) for v in roi.reshape(-1)]
    return resize_nd(attrs, x, scale_list, size_list, roi_list)


@register("Upsample")
def upsample(attrs: Attrs, x: np.ndarray, scales: Optional[np.ndarray] = None) -> np.ndarray:
    """Deprecated Resize: ``nearest`` (floor) or ``linear`` with asymmetric coordinates."""
    factors = [float(s) for s in (scales.reshape(-1) if scales is not None else attrs["scales"])]
    mode = _text(attrs.get("mode", "nearest"))
    settings = dict(attrs, mode="linear" if mode in ("linear", "bilinear") else "nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    settings.pop("axes", None)
    return resize_nd(settings, x, factors, None, None)
