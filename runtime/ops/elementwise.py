"""Elementwise operators: arithmetic, comparisons, logic and activations (numpy broadcasting).

Every result keeps the dtype ONNX gives it (the input type for arithmetic, ``bool`` for comparisons)
even where numpy's promotion would widen it, e.g. ``float32 ** int64``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional

import numpy as np

from . import bounded_broadcast, register

Attrs = Dict[str, Any]


def _same(x: np.ndarray, y: Any) -> np.ndarray:
    """``y`` as an array of ``x``'s dtype (numpy may have widened it)."""
    return np.asarray(y).astype(x.dtype, copy=False)


# -- arithmetic ------------------------------------------------------------------------------------


@register("Add")
def add(attrs: Attrs, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b``."""
    bounded_broadcast(a, b)
    return _same(a, a + b)


@register("Sub")
def sub(attrs: Attrs, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b``."""
    bounded_broadcast(a, b)
    return _same(a, a - b)


@register("Mul")
def mul(attrs: Attrs, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * b``."""
    bounded_broadcast(a, b)
    return _same(a, a * b)


@register("Div")
def div(attrs: Attrs, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b``; integer division truncates toward zero (C semantics), as onnxruntime does."""
    bounded_broadcast(a, b)
    if np.issubdtype(a.dtype, np.integer):
        q = np.floor_divide(a, b)
        # floor and truncation differ when the signs differ and the division is inexact
        fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
        return _same(a, q + fix)
    return _same(a, a / b)


@register("Pow")
def power(attrs: Attrs, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x ** y`` with the base's dtype (ONNX), computed without integer-power errors."""
    bounded_broadcast(x, y)
    if np.issubdtype(x.dtype, np.integer) and not np.issubdtype(y.dtype, np.integer):
        return _same(x, np.power(x.astype(np.float64), y))
    if np.issubdtype(x.dtype, np.integer):
        return _same(x, np.power(x, y.astype(x.dtype)))
    return _same(x, np.power(x, y.astype(x.dtype, copy=False)))


@register("Mod")
def mod(attrs: Attrs, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Remainder: sign of the divisor (Python ``%``) unless ``fmod=1`` (sign of the dividend, C)."""
    bounded_broadcast(a, b)
    if attrs.get("fmod", 0):
        return _same(a, np.fmod(a, b))
    return _same(a, np.mod(a, b))


def _variadic(ufunc: Any) -> Any:
    def run(attrs: Attrs, *xs: Optional[np.ndarray]) -> np.ndarray:
        arrays = [x for x in xs if x is not None]
        bounded_broadcast(*arrays)
        return _same(arrays[0], functools.reduce(ufunc, arrays))

    return run


register("Sum")(_variadic(np.add))
register("Max")(_variadic(np.maximum))
register("Min")(_variadic(np.minimum))


@register("Mean")
def mean(attrs: Attrs, *xs: np.ndarray) -> np.ndarray:
    """Elementwise mean of any number of broadcastable inputs."""
    arrays = [x for x in xs if x is not None]
    bounded_broadcast(*arrays)
    return _same(arrays[0], functools.reduce(np.add, arrays) / len(arrays))


# -- unary math ------------------------------------------------------------------------------------

_ERF_SERIES = [2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(10)]


def erf(x: np.ndarray) -> np.ndarray:
    """The error function to ~1e-7 relative accuracy with numpy alone (no scipy on the device).

    A Maclaurin series near zero (where ``1 - erfc`` would cancel) and the Chebyshev-fitted erfc
    of Numerical Recipes (fractional error < 1.2e-7) elsewhere.
    """
    v = np.asarray(x, dtype=np.float64)
    z = np.abs(v)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    far = np.sign(v) * (1.0 - t * np.exp(-z * z + poly))
    sq = v * v
    near = np.zeros_like(v)
    for c in reversed(_ERF_SERIES):
        near = near * sq + c
    near *= v
    return np.where(z < 0.5, near, far)


def _unary(name: str, fn: Any) -> None:
    def run(attrs: Attrs, x: np.ndarray) -> np.ndarray:
        return _same(x, fn(x))

    run.__name__ = name.lower()
    run.__doc__ = f"ONNX ``{name}``, elementwise."
    register(name)(run)


for _name, _fn in {
    "Abs": np.abs, "Neg": np.negative, "Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log,
    "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil, "Sign": np.sign,
    "Round": np.round,  # numpy rounds half to even, as ONNX specifies
    "Sin": np.sin, "Cos": np.cos, "Tan": np.tan, "Asin": np.arcsin, "Acos": np.arccos,
    "Atan": np.arctan, "Sinh": np.sinh, "Cosh": np.cosh, "Asinh": np.arcsinh, "Acosh": np.arccosh,
    "Atanh": np.arctanh, "Tanh": np.tanh, "Erf": erf, "Relu": lambda x: np.maximum(x, 0),
    "Softsign": lambda x: x / (1 + np.abs(x)), "Softplus": lambda x: np.logaddexp(0, x),
    "BitwiseNot": np.invert,
}.items():
    _unary(_name, _fn)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large negative inputs."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@register("Sigmoid")
def sigmoid_op(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))``."""
    return _same(x, sigmoid(x))


@register("LeakyRelu")
def leaky_relu(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``x`` if positive, else ``alpha * x`` (alpha 0.01)."""
    return _same(x, np.where(x >= 0, x, x * attrs.get("alpha", 0.01)))


@register("PRelu")
def prelu(attrs: Attrs, x: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Leaky ReLU with a learned slope broadcast to ``x``."""
    bounded_broadcast(x, slope)
    return _same(x, np.where(x >= 0, x, x * slope))


@register("ThresholdedRelu")
def thresholded_relu(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``x`` where ``x > alpha`` (1.0), else 0."""
    return _same(x, np.where(x > attrs.get("alpha", 1.0), x, 0))


@register("Elu")
def elu(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``x`` if positive, else ``alpha * (exp(x) - 1)``."""
    return _same(x, np.where(x > 0, x, attrs.get("alpha", 1.0) * np.expm1(np.minimum(x, 0))))


@register("Celu")
def celu(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``max(0, x) + min(0, alpha * (exp(x / alpha) - 1))``."""
    alpha = attrs.get("alpha", 1.0)
    return _same(x, np.maximum(x, 0) + np.minimum(0, alpha * np.expm1(np.minimum(x, 0) / alpha)))


@register("Selu")
def selu(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Scaled ELU with the self-normalising constants as defaults."""
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return _same(x, gamma * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))))


@register("HardSigmoid")
def hard_sigmoid(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``clip(alpha * x + beta, 0, 1)`` (alpha 0.2, beta 0.5)."""
    return _same(x, np.clip(x * attrs.get("alpha", 0.2) + attrs.get("beta", 0.5), 0, 1))


@register("HardSwish")
def hard_swish(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``x * clip(x / 6 + 0.5, 0, 1)``."""
    return _same(x, x * np.clip(x / 6 + 0.5, 0, 1))


@register("Swish")
def swish(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(alpha * x)``."""
    return _same(x, x * sigmoid(x * attrs.get("alpha", 1.0)))


@register("Mish")
def mish(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """``x * tanh(softplus(x))``."""
    return _same(x, x * np.tanh(np.logaddexp(0, x)))


@register("Gelu")
def gelu(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Gaussian error linear unit, exact (``erf``) or ``approximate="tanh"``."""
    if attrs.get("approximate", "none") == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        return _same(x, 0.5 * x * (1 + np.tanh(inner)))
    return _same(x, 0.5 * x * (1 + erf(x / math.sqrt(2))))


@register("Shrink")
def shrink(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Soft shrinkage: ``x -/+ bias`` outside ``[-lambd, lambd]``, else 0."""
    lambd, bias = attrs.get("lambd", 0.5), attrs.get("bias", 0.0)
    return _same(x, np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0)))


@register("Clip")
def clip(attrs: Attrs, x: np.ndarray, lo: Optional[np.ndarray] = None,
         hi: Optional[np.ndarray] = None) -> np.ndarray:
    """Clamp to ``[min, max]``: inputs since opset 11, attributes before. ``min > max`` gives max."""
    if lo is None:
        lo = attrs.get("min")
    if hi is None:
        hi = attrs.get("max")
    y = x
    if lo is not None:
        y = np.maximum(y, _same(x, lo))
    if hi is not None:
        y = np.minimum(y, _same(x, hi))
    return y


# -- comparisons and logic -------------------------------------------------------------------------


def _binary(name: str, fn: Any) -> None:
    def run(attrs: Attrs, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        bounded_broadcast(a, b)
        return np.asarray(fn(a, b))

    run.__name__ = name.lower()
    run.__doc__ = f"ONNX ``{name}``, elementwise with broadcasting."
    register(name)(run)


for _name, _fn in {
    "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
    "Xor": np.logical_xor, "BitwiseAnd": np.bitwise_and, "BitwiseOr": np.bitwise_or,
    "BitwiseXor": np.bitwise_xor,
}.items():
    _binary(_name, _fn)


@register("Not")
def logical_not(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Boolean negation."""
    return np.logical_not(x)


@register("IsNaN")
def isnan(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Where ``x`` is NaN."""
    return np.isnan(x)


@register("IsInf")
def isinf(attrs: Attrs, x: np.ndarray) -> np.ndarray:
    """Where ``x`` is infinite, optionally only one sign (``detect_negative``/``detect_positive``)."""
    neg, pos = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    return np.isinf(x) & (((x < 0) & bool(neg)) | ((x > 0) & bool(pos)))


@register("BitShift")
def bit_shift(attrs: Attrs, x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Shift unsigned integers ``LEFT`` or ``RIGHT``."""
    fn = np.left_shift if attrs["direction"] == "LEFT" else np.right_shift
    bounded_broadcast(x, n)
    return _same(x, fn(x, n.astype(x.dtype)))


@register("Where")
def where(attrs: Attrs, cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` where ``cond`` else ``b``, broadcasting all three."""
    bounded_broadcast(cond, a, b)
    return _same(a, np.where(cond, a, b))
