"""Linear (de)quantization: the QDQ operators of quantized exports (int8/uint8/int16/int32).

Scales and zero points are per tensor, per axis (``axis``, default 1) or per block of
``block_size`` elements along that axis.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from dcrt.errors import UnsupportedOperatorError

from . import register
from .tensor import onnx_dtype

Attrs = Dict[str, Any]


def _spread(value: np.ndarray, shape: Tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A scale or zero point shaped to broadcast against a tensor of ``shape``."""
    if value.size == 1:
        return value.reshape(())
    axis %= len(shape)
    if not block:
        return value.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    # blocked: each entry covers ``block`` consecutive elements along the axis (the last may be short)
    return np.repeat(value, block, axis=axis).take(range(shape[axis]), axis=axis)


@register("DequantizeLinear")
def dequantize_linear(attrs: Attrs, x: np.ndarray, scale: np.ndarray,
                      zero_point: Optional[np.ndarray] = None) -> np.ndarray:
    """``(x - zero_point) * scale`` in the scale's float type (or ``output_dtype``)."""
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    s = _spread(scale, x.shape, axis, block)
    v = x.astype(np.float32 if scale.dtype != np.float64 else np.float64)
    if zero_point is not None:
        v = v - _spread(zero_point, x.shape, axis, block).astype(v.dtype)
    out = onnx_dtype(attrs["output_dtype"]) if attrs.get("output_dtype") else scale.dtype
    return (v * s).astype(out)


_RANGES = {np.dtype(t): (np.iinfo(t).min, np.iinfo(t).max)
           for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)}


@register("QuantizeLinear")
def quantize_linear(attrs: Attrs, x: np.ndarray, scale: np.ndarray,
                    zero_point: Optional[np.ndarray] = None) -> np.ndarray:
    """``saturate(round_half_even(x / scale) + zero_point)``; uint8 unless a zero point or
    ``output_dtype`` says otherwise."""
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    if zero_point is not None:
        out = zero_point.dtype
    elif attrs.get("output_dtype"):
        out = onnx_dtype(attrs["output_dtype"])
    else:
        out = np.dtype(np.uint8)
    if out not in _RANGES:
        raise UnsupportedOperatorError(f"QuantizeLinear to {out}")
    precision = onnx_dtype(attrs["precision"]) if attrs.get("precision") else None
    v = x.astype(precision) if precision is not None else x
    q = np.rint(v / _spread(scale, x.shape, axis, block).astype(v.dtype)).astype(np.int64)
    if zero_point is not None:
        q = q + _spread(zero_point, x.shape, axis, block).astype(np.int64)
    lo, hi = _RANGES[out]
    return np.clip(q, lo, hi).astype(out)


@register("DynamicQuantizeLinear")
def dynamic_quantize_linear(attrs: Attrs, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 quantization with a scale and zero point covering ``[min(x, 0), max(x, 0)]``."""
    lo, hi = min(float(x.min(initial=0)), 0.0), max(float(x.max(initial=0)), 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.uint8(np.clip(np.rint(-lo / scale), 0, 255)) if scale else np.uint8(0)
    safe = scale if scale else np.float32(1)
    y = np.clip(np.rint(x / safe) + int(zero), 0, 255).astype(np.uint8)
    return y, np.asarray(scale, dtype=np.float32), np.asarray(zero, dtype=np.uint8)
