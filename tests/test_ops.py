"""Operator tests against onnxruntime, and executor behaviour (ordering, memory, threads, weights).

Each operator case builds a one-node ONNX model with ``onnx.helper``, runs it with onnxruntime and
with dcrt's executor (through ``dcrt.converters.onnx_frontend.from_onnx``), and compares the outputs
(rtol 1e-5). Weight inputs are given as initializers so they take the weight path of the runtime.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dcrt import sparse  # noqa: E402
from dcrt.converters.onnx_frontend import from_onnx  # noqa: E402
from dcrt.errors import DcrtError, FormatError, InputError, UnsupportedOperatorError  # noqa: E402
from dcrt.graph import Graph, Node, ValueInfo  # noqa: E402
from dcrt.runtime import kernels  # noqa: E402
from dcrt.runtime.executor import Executor  # noqa: E402
from dcrt.runtime.indexed import ByInput, IndexedWeight, SparseWeight  # noqa: E402
from dcrt.runtime.ops import OPS, WEIGHT_INPUTS, supported  # noqa: E402
from runtime_helpers import random_weight  # noqa: E402

RNG = np.random.default_rng(0)


def rand(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _elem(dtype: Any) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def one_node_model(op: str, inputs: Dict[str, Optional[np.ndarray]], attrs: Dict[str, Any],
                   outputs: Sequence[str] = ("y",), weights: Sequence[str] = (),
                   opset: int = 17, out_types: Optional[Dict[str, Any]] = None) -> "onnx.ModelProto":
    """A model with one ``op`` node; ``inputs`` in order (``None`` = omitted), ``weights`` as
    initializers, the others as graph inputs."""
    out_types = out_types or {}
    first = next(v for v in inputs.values() if v is not None)
    names = [name if value is not None else "" for name, value in inputs.items()]
    node = helper.make_node(op, names, list(outputs), **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, _elem(v.dtype), v.shape)
                    for n, v in inputs.items() if v is not None and n not in weights]
    inits = [numpy_helper.from_array(v, n) for n, v in inputs.items() if v is not None and n in weights]
    graph_outputs = [helper.make_tensor_value_info(o, _elem(out_types.get(o, first.dtype)), None)
                     for o in outputs]
    graph = helper.make_graph([node], "one", graph_inputs, graph_outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def run_both(model: "onnx.ModelProto", feeds: Dict[str, np.ndarray]) -> List[tuple]:
    """(dcrt output, onnxruntime output) pairs in graph output order."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, feeds)
    ir = from_onnx(model)
    got = Executor(ir.graph, ir.opsets).run(feeds)
    return [(got[o.name], e) for o, e in zip(model.graph.output, expected)]


def check(op: str, inputs: Dict[str, Optional[np.ndarray]], attrs: Optional[Dict[str, Any]] = None,
          weights: Sequence[str] = (), outputs: Sequence[str] = ("y",), opset: int = 17,
          out_types: Optional[Dict[str, Any]] = None, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    model = one_node_model(op, inputs, attrs or {}, outputs, weights, opset, out_types)
    feeds = {n: v for n, v in inputs.items() if v is not None and n not in weights}
    for got, expected in run_both(model, feeds):
        assert got.shape == expected.shape, (got.shape, expected.shape)
        assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


# -- convolutions ----------------------------------------------------------------------------------

CONV_CASES = [
    dict(x=(1, 3, 9, 9), w=(4, 3, 3, 3), attrs={}),
    dict(x=(2, 3, 10, 8), w=(5, 3, 3, 2), attrs=dict(pads=[1, 0, 2, 1], strides=[2, 1])),
    dict(x=(1, 4, 11, 11), w=(6, 4, 3, 3), attrs=dict(dilations=[2, 3], pads=[2, 2, 2, 2])),
    dict(x=(1, 6, 8, 8), w=(9, 2, 3, 3), attrs=dict(group=3, pads=[1, 1, 1, 1])),
    dict(x=(2, 8, 9, 9), w=(8, 1, 3, 3), attrs=dict(group=8, pads=[1, 1, 1, 1], strides=[2, 2])),
    dict(x=(1, 4, 9, 7), w=(8, 1, 3, 3), attrs=dict(group=4, dilations=[2, 1])),  # depthwise x2
    dict(x=(1, 3, 9, 10), w=(4, 3, 3, 3), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    dict(x=(1, 3, 9, 10), w=(4, 3, 4, 4), attrs=dict(auto_pad="SAME_LOWER", strides=[2, 3])),
    dict(x=(1, 3, 9, 10), w=(4, 3, 3, 3), attrs=dict(auto_pad="VALID", strides=[2, 2])),
    dict(x=(2, 3, 17), w=(4, 3, 5), attrs=dict(pads=[2, 1], strides=[3])),  # 1-D
    dict(x=(1, 2, 5, 6, 7), w=(3, 2, 2, 3, 2), attrs=dict(pads=[1, 0, 1, 0, 1, 1])),  # 3-D
    dict(x=(2, 4, 19), w=(8, 1, 5), attrs=dict(group=4, pads=[3, 1], strides=[2], dilations=[2])),  # depthwise, 1-D
    dict(x=(1, 3, 6, 7, 5), w=(3, 1, 3, 2, 3),
         attrs=dict(group=3, pads=[1, 0, 2, 1, 1, 0], strides=[2, 1, 2])),  # ... 3-D
    dict(x=(1, 16, 7, 7), w=(32, 16, 1, 1), attrs={}),  # pointwise
    dict(x=(3, 16, 7, 7), w=(32, 16, 1, 1), attrs={}),  # ... samples side by side
    dict(x=(3, 16, 12, 12), w=(32, 16, 1, 1), attrs={}),  # ... one product per sample
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c['x']}-{c['w']}-{c['attrs']}")
@pytest.mark.parametrize("bias", [False, True])
def test_conv(case: Dict[str, Any], bias: bool) -> None:
    x, w = rand(*case["x"]), rand(*case["w"])
    inputs = {"x": x, "w": w, "b": rand(case["w"][0]) if bias else None}
    check("Conv", inputs, case["attrs"], weights=("w",))


def test_conv_blocks_of_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny im2col budget forces the per-row blocking path; results must not change."""
    monkeypatch.setattr(kernels, "IM2COL_BLOCK_BYTES", 512)
    check("Conv", {"x": rand(2, 3, 12, 10), "w": rand(4, 3, 3, 3), "b": rand(4)},
          dict(pads=[1, 1, 1, 1], strides=[1, 2]), weights=("w",))


def test_conv_weight_computed_at_run_time() -> None:
    """A weight that is a graph input (not an initializer) arrives as an ndarray."""
    check("Conv", {"x": rand(1, 2, 6, 6), "w": rand(3, 2, 3, 3)}, {})


CONV_T_CASES = [
    dict(x=(1, 2, 4, 4), w=(2, 3, 3, 3), attrs={}),
    dict(x=(2, 2, 3, 5), w=(2, 3, 3, 3), attrs=dict(strides=[2, 3], pads=[1, 0, 1, 2])),
    dict(x=(1, 2, 4, 4), w=(2, 3, 3, 3), attrs=dict(strides=[2, 2], output_padding=[1, 1])),
    dict(x=(1, 4, 3, 3), w=(4, 2, 3, 3), attrs=dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1])),
    dict(x=(1, 2, 4, 4), w=(2, 2, 3, 3), attrs=dict(dilations=[2, 2], strides=[2, 1])),
    dict(x=(1, 2, 3, 3), w=(2, 2, 3, 3), attrs=dict(strides=[3, 2], output_shape=[10, 8])),
    dict(x=(1, 2, 3, 3), w=(2, 2, 3, 3), attrs=dict(strides=[2, 2], output_shape=[6, 6])),
    dict(x=(1, 2, 3, 3), w=(2, 2, 3, 3), attrs=dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    dict(x=(1, 2, 3, 3), w=(2, 2, 4, 4), attrs=dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    dict(x=(1, 2, 7), w=(2, 3, 3), attrs=dict(strides=[2], pads=[1, 0])),  # 1-D
    dict(x=(1, 6, 5, 5), w=(6, 1, 3, 3), attrs=dict(group=6, strides=[2, 2])),  # depthwise
]


@pytest.mark.parametrize("case", CONV_T_CASES, ids=lambda c: f"{c['x']}-{c['w']}-{c['attrs']}")
def test_conv_transpose(case: Dict[str, Any]) -> None:
    x, w = rand(*case["x"]), rand(*case["w"])
    cout = case["w"][1] * case["attrs"].get("group", 1)
    check("ConvTranspose", {"x": x, "w": w, "b": rand(cout)}, case["attrs"], weights=("w",))


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm(trans_a: int, trans_b: int) -> None:
    a = rand(5, 4) if trans_a else rand(4, 5)
    b = rand(3, 5) if trans_b else rand(5, 3)
    check("Gemm", {"a": a, "b": b, "c": rand(3)},
          dict(transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0), weights=("b",))


@pytest.mark.parametrize("a_shape,b_shape", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4, 5)),
                                             ((2, 3, 4), (2, 4, 5)), ((3, 4), (4,))])
def test_matmul(a_shape: tuple, b_shape: tuple) -> None:
    check("MatMul", {"a": rand(*a_shape), "b": rand(*b_shape)}, weights=("b",))


# -- pooling ---------------------------------------------------------------------------------------

POOL_CASES = [
    dict(kernel_shape=[3, 3]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(kernel_shape=[4, 4], strides=[3, 3], pads=[2, 2, 2, 2], ceil_mode=1),
]


@pytest.mark.parametrize("attrs", POOL_CASES, ids=str)
def test_max_pool(attrs: Dict[str, Any]) -> None:
    check("MaxPool", {"x": rand(2, 3, 9, 8)}, attrs, outputs=("y", "i"), out_types={"i": np.int64})


def test_max_pool_dilated() -> None:
    check("MaxPool", {"x": rand(1, 2, 10, 10)}, dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[1, 1, 1, 1]))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool"])
def test_pooling_node_follows_its_input_shape(op: str) -> None:
    """A pooling node works its layout out once per input shape and dtype (and keeps the last): fed
    inputs of changing shapes and dtypes, each result is what a node seeing that input first gives."""
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", _nout=1)
    node = dict(attrs)        # one node's attributes, as its executor step keeps them across calls
    for x in (rand(1, 3, 9, 8), rand(2, 3, 9, 8), rand(2, 3, 16, 5), rand(2, 3, 16, 5).astype(np.float64),
              rand(1, 3, 9, 8)):
        got = OPS[op](node, x)
        np.testing.assert_array_equal(got, OPS[op](dict(attrs), x))
        assert got.dtype == x.dtype and got.shape[2:] == (-(-x.shape[2] // 2), -(-x.shape[3] // 2))


@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("attrs", POOL_CASES, ids=str)
def test_average_pool(attrs: Dict[str, Any], include: int) -> None:
    check("AveragePool", {"x": rand(2, 3, 9, 8)}, dict(attrs, count_include_pad=include))


def test_global_pools_and_lrn() -> None:
    x = rand(2, 5, 6, 7)
    check("GlobalAveragePool", {"x": x})
    check("GlobalMaxPool", {"x": x})
    check("LRN", {"x": x}, dict(size=3, alpha=1e-3, beta=0.75, bias=2.0))
    check("LRN", {"x": x}, dict(size=5))


def test_batch_and_instance_normalization() -> None:
    x = rand(2, 4, 5, 5)
    var = np.abs(rand(4)) + 0.5
    check("BatchNormalization", {"x": x, "s": rand(4), "b": rand(4), "m": rand(4), "v": var},
          dict(epsilon=1e-3))
    check("InstanceNormalization", {"x": x, "s": rand(4), "b": rand(4)})


# -- resize ----------------------------------------------------------------------------------------

COORD_MODES = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"]


def _skip_fractional_align_corners(coord: str, shape: Sequence[int], scales: Sequence[float]) -> None:
    """align_corners divides by the resized length minus one: onnxruntime uses the rounded output
    length, the ONNX spec (and its conformance tests, which dcrt follows) ``scale * length``. They
    agree whenever ``scale * length`` is whole."""
    if coord == "align_corners" and any(not float(np.float32(s) * n).is_integer() for s, n in zip(scales, shape)):
        pytest.skip("onnxruntime and the ONNX spec differ here; dcrt follows the spec")


@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("coord", COORD_MODES + ["tf_half_pixel_for_nn"])
@pytest.mark.parametrize("scales", [[1, 1, 2.0, 3.0], [1, 1, 0.6, 1.5], [1, 1, 0.6, 1.7]])
def test_resize_nearest(nearest_mode: str, coord: str, scales: List[float]) -> None:
    _skip_fractional_align_corners(coord, (1, 2, 5, 4), scales)
    check("Resize", {"x": rand(1, 2, 5, 4), "roi": None, "scales": np.array(scales, np.float32)},
          dict(mode="nearest", nearest_mode=nearest_mode, coordinate_transformation_mode=coord))


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("coord", COORD_MODES)
@pytest.mark.parametrize("scales", [[1, 1, 2.0, 2.0], [1, 1, 0.5, 1.6], [1, 1, 0.5, 1.5], [1, 1, 1.7, 0.8]])
def test_resize_scales(mode: str, coord: str, scales: List[float]) -> None:
    _skip_fractional_align_corners(coord, (2, 3, 6, 5), scales)
    check("Resize", {"x": rand(2, 3, 6, 5), "roi": None, "scales": np.array(scales, np.float32)},
          dict(mode=mode, coordinate_transformation_mode=coord), rtol=1e-4)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("sizes", [[2, 3, 9, 13], [2, 3, 3, 4], [2, 3, 1, 1]])
def test_resize_sizes(mode: str, sizes: List[int]) -> None:
    check("Resize", {"x": rand(2, 3, 6, 5), "roi": None, "scales": None,
                     "sizes": np.array(sizes, np.int64)},
          dict(mode=mode, coordinate_transformation_mode="half_pixel"), rtol=1e-4)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_an_empty_batch(mode: str) -> None:
    """An empty batch resized to sizes (``F.interpolate(size=...)`` exports so): an empty result as
    onnxruntime's (was a division by the batch's size, 0); an empty axis made larger is an InputError."""
    from dcrt.errors import InputError
    from dcrt.runtime.ops import OPS
    for sizes in ([0, 3, 9, 13], [3, 9, 13]):
        attrs = dict(mode=mode) if len(sizes) == 4 else dict(mode=mode, axes=[1, 2, 3])
        check("Resize", {"x": rand(0, 3, 6, 5), "roi": None, "scales": None, "sizes": np.array(sizes, np.int64)},
              attrs, opset=18)
    with pytest.raises(InputError, match="cannot make axis 0 of 2 from an empty one"):
        OPS["Resize"]({"mode": mode, "_opset": 18}, rand(0, 3, 6, 5), None, None, np.array([2, 3, 9, 13]))


@pytest.mark.parametrize("coord, nearest_mode, length, out", [
    ("align_corners", "floor", 13, 7), ("align_corners", "floor", 13, 14), ("align_corners", "ceil", 11, 13),
    ("align_corners", "round_prefer_floor", 11, 13), ("asymmetric", "round_prefer_ceil", 7, 2),
    ("half_pixel", "round_prefer_ceil", 14, 1)])
def test_resize_nearest_to_sizes_reads_the_exact_rows(coord: str, nearest_mode: str, length: int, out: int) -> None:
    """With ``sizes`` the ratio is exact: 13 rows to 7 with align_corners read rows 0, 2, ..., 12 (a
    float32 scale 7/13 put coordinates a hair below whole numbers, so floor took 0, 1, 3, ...)."""
    x = np.arange(length, dtype=np.float32).reshape(1, 1, length, 1)
    check("Resize", {"x": x, "roi": None, "scales": None, "sizes": np.array([1, 1, out, 1], np.int64)},
          dict(mode="nearest", nearest_mode=nearest_mode, coordinate_transformation_mode=coord), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceProd", "ReduceMax", "ReduceMin", "ReduceL1",
                                "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"])
def test_reductions_over_no_axes_keep_their_elementwise_part(op: str) -> None:
    """``noop_with_empty_axes=1`` and no axes: nothing is summed, but ReduceL1 still gives ``|x|``,
    ReduceSumSquare ``x * x``, ReduceLogSum ``log x`` (onnxruntime and onnx's reference agree; dcrt gave
    ``x`` back)."""
    check(op, {"x": np.abs(rand(2, 3)) + 0.1, "axes": None}, dict(noop_with_empty_axes=1), opset=18)


def test_resize_cubic_exclude_outside_and_tf_crop() -> None:
    x = rand(1, 1, 6, 6)
    check("Resize", {"x": x, "roi": None, "scales": np.array([1, 1, 0.7, 1.6], np.float32)},
          dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5), rtol=1e-4)
    check("Resize", {"x": x, "roi": np.array([0, 0, 0.2, 0.3, 1, 1, 1.2, 0.9], np.float32),
                     "scales": None, "sizes": np.array([1, 1, 4, 5], np.int64)},
          dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize",
               extrapolation_value=7.0), rtol=1e-4)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 1.5, 0.6], [1, 1, 0.7, 2.5]])
def test_resize_opset10(mode: str, scales: List[float]) -> None:
    check("Resize", {"x": rand(1, 2, 5, 4), "s": np.array(scales, np.float32)}, dict(mode=mode), opset=10)


def test_upsample_deprecated() -> None:
    x = rand(1, 2, 3, 4)
    check("Upsample", {"x": x, "s": np.array([1, 1, 2, 3], np.float32)}, dict(mode="nearest"), opset=9)


@pytest.mark.parametrize("batch", [1, 0])
@pytest.mark.parametrize("size", [0, 2])
def test_conv_kernel_larger_than_its_padded_input(batch: int, size: int) -> None:
    """A kernel that fits no window of the padded input is an InputError, for an empty batch too
    (its shortcut returned an empty map for 2x2, or failed in numpy for 0x0)."""
    from dcrt.errors import InputError
    from dcrt.runtime.ops import OPS
    with pytest.raises(InputError, match=rf"kernel of \(3, 3\) .* padded input \({size}, {size}\): no output"):
        OPS["Conv"]({}, rand(batch, 4, size, size), rand(4, 4, 3, 3))


# -- recurrent layers ------------------------------------------------------------------------------

def _rnn_inputs(gates: int, direction: str, hidden: int = 5, batch: int = 3, steps: int = 4,
                features: int = 6, peephole: bool = False, lengths: bool = False, cell: bool = False):
    d = 2 if direction == "bidirectional" else 1
    inputs = {
        "x": rand(steps, batch, features),
        "w": rand(d, gates * hidden, features) * 0.5,
        "r": rand(d, gates * hidden, hidden) * 0.5,
        "b": rand(d, 2 * gates * hidden),
        "lens": np.array([4, 2, 3], np.int32) if lengths else None,
        "h0": rand(d, batch, hidden),
    }
    if cell:
        inputs["c0"] = rand(d, batch, hidden)
        inputs["p"] = rand(d, 3 * hidden) if peephole else None
    return inputs


DIRECTIONS = ["forward", "reverse", "bidirectional"]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lengths", [False, True])
def test_lstm(direction: str, lengths: bool) -> None:
    inputs = _rnn_inputs(4, direction, peephole=True, lengths=lengths, cell=True)
    check("LSTM", inputs, dict(hidden_size=5, direction=direction), weights=("w", "r"),
          outputs=("y", "yh", "yc"))


def test_lstm_clip_input_forget_and_activations() -> None:
    inputs = _rnn_inputs(4, "bidirectional", cell=True)
    check("LSTM", inputs, dict(hidden_size=5, direction="bidirectional", clip=0.8,
                               activations=["HardSigmoid", "Tanh", "Relu"] * 2,
                               activation_alpha=[0.3, 0.3], activation_beta=[0.4, 0.4]),
          weights=("w", "r"), outputs=("y", "yh", "yc"))
    check("LSTM", _rnn_inputs(4, "forward", cell=True), dict(hidden_size=5, input_forget=1),
          weights=("w", "r"), outputs=("y", "yh", "yc"))


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_outputs_never_share_an_input(op: str, gates: int) -> None:
    """With no steps the final states are the initial ones: copies, not views of the caller's arrays
    (one direction's outputs are otherwise given as views of arrays the operator made)."""
    from dcrt.runtime.ops import OPS
    inputs = _rnn_inputs(gates, "forward", steps=0, cell=op == "LSTM")
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    args = [inputs[k] for k in ("x", "w", "r", "b", "lens", "h0")] + ([inputs["c0"]] if op == "LSTM" else [])
    y, *finals = OPS[op]({"hidden_size": 5, "_opset": 14, "_nout": 1 + len(states)}, *args)
    assert y.shape == (0, 1, 3, 5)
    for got, name in zip(finals, states):
        np.testing.assert_array_equal(got, inputs[name])
        assert not np.shares_memory(got, inputs[name])


@pytest.mark.parametrize("op, gates, outputs", [("LSTM", 4, ("y", "yh", "yc")), ("GRU", 3, ("y", "yh")),
                                                ("RNN", 1, ("y", "yh"))])
def test_recurrent_empty_sequence_has_zero_final_states(op: str, gates: int, outputs: Tuple[str, ...]) -> None:
    """A batch entry of sequence length 0: Y_h (and Y_c) zeros, as onnxruntime's (not the initial state)."""
    inputs = _rnn_inputs(gates, "bidirectional", lengths=True, cell=op == "LSTM")
    inputs["lens"] = np.array([0, 4, 2], np.int32)
    check(op, inputs, dict(hidden_size=5, direction="bidirectional"), weights=("w", "r"), outputs=outputs)


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("lens", [[5, 2, 3], [4, -1, 3], [3], [4, 2, 3, 1]])
def test_recurrent_sequence_lens_out_of_range(op: str, gates: int, direction: str, lens: List[int]) -> None:
    """Lengths past the steps, negative or not one per batch entry are an InputError, as onnxruntime
    refuses them (forward: taken silently, a single length broadcast; reverse: an IndexError)."""
    from dcrt.errors import InputError
    from dcrt.runtime.ops import OPS
    inputs = _rnn_inputs(gates, direction, cell=op == "LSTM")
    args = [inputs[k] for k in ("x", "w", "r", "b")] + [np.array(lens, np.int32), inputs["h0"]]
    with pytest.raises(InputError, match=r"one length in 0\.\.4 .* each of the 3 batch entries"):
        OPS[op]({"hidden_size": 5, "direction": direction, "_opset": 14, "_nout": 2}, *args)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("before_reset", [0, 1])
@pytest.mark.parametrize("lengths", [False, True])
def test_gru(direction: str, before_reset: int, lengths: bool) -> None:
    inputs = _rnn_inputs(3, direction, lengths=lengths)
    check("GRU", inputs, dict(hidden_size=5, direction=direction, linear_before_reset=before_reset),
          weights=("w", "r"), outputs=("y", "yh"))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lengths", [False, True])
def test_rnn(direction: str, lengths: bool) -> None:
    inputs = _rnn_inputs(1, direction, lengths=lengths)
    check("RNN", inputs, dict(hidden_size=5, direction=direction), weights=("w", "r"),
          outputs=("y", "yh"))


def test_rnn_without_optional_inputs() -> None:
    inputs = _rnn_inputs(1, "forward")
    inputs.update(b=None, h0=None)
    check("RNN", inputs, dict(hidden_size=5, activations=["Relu"]), weights=("w", "r"), outputs=("y", "yh"))


# -- softmax and shape glue ------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_axes(op: str, axis: int, opset: int) -> None:
    check(op, {"x": rand(2, 3, 4)}, dict(axis=axis), opset=opset)


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([-1], [-100], [1], [-1]),
    ([0, 5], [3, -1], [0, 1], [1, -2]),
    ([10, -3], [-10, 100], [1, 0], [-3, 1]),
    ([1], [2 ** 62], [-1], [2]),
    ([-2], [0], [2], [-1]),
])
def test_slice(starts: list, ends: list, axes: list, steps: list) -> None:
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    check("Slice", {"x": rand(4, 8, 5), "s": i64(starts), "e": i64(ends), "a": i64(axes), "t": i64(steps)})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode: str) -> None:
    check("Pad", {"x": rand(2, 3, 4, 5), "p": np.array([0, 1, 2, 1, 0, 2, 1, 3], np.int64),
                  "v": np.array(1.5, np.float32) if mode == "constant" else None}, dict(mode=mode))


def test_pad_negative_and_axes() -> None:
    check("Pad", {"x": rand(3, 6), "p": np.array([1, -2, -1, 2], np.int64)}, dict(mode="constant"))
    check("Pad", {"x": rand(3, 4, 5), "p": np.array([2, 1, 0, 2], np.int64), "v": None,
                  "axes": np.array([-1, 0], np.int64)}, dict(mode="reflect"), opset=18)


def test_gather_negative_indices() -> None:
    idx = np.array([[0, -1], [2, -3]], np.int64)
    check("Gather", {"d": rand(5, 4), "i": idx}, weights=("d",))  # embedding path
    check("Gather", {"d": rand(3, 5, 4), "i": idx}, dict(axis=1))
    check("Gather", {"d": rand(3, 4), "i": np.array(-2, np.int64)}, dict(axis=0), weights=("d",))


@pytest.mark.parametrize("op, axis", [("Gather", 0), ("Gather", 1), ("GatherElements", 1), ("ScatterElements", 1)])
def test_index_out_of_range_is_refused(op: str, axis: int) -> None:
    """An index outside [-size, size) is an IndexError naming it and the axis, also one below -size
    (numpy's take/take_along_axis alone would wrap it into range a second time)."""
    from dcrt.runtime.ops import OPS
    data = rand(4, 4)
    for bad in (4, -5):
        idx = np.array([[0, bad]], np.int64)
        args = (data, idx, rand(1, 2)) if op == "ScatterElements" else (data, idx)
        with pytest.raises(IndexError, match=f"index {bad} is out of bounds for axis {axis} with size 4"):
            OPS[op]({"axis": axis, "_opset": 13, "_nout": 1}, *args)


def test_reshape_zero_and_minus_one() -> None:
    check("Reshape", {"x": rand(2, 3, 4), "s": np.array([0, -1], np.int64)})
    check("Reshape", {"x": rand(2, 3, 4), "s": np.array([-1, 0, 2], np.int64)})
    check("Reshape", {"x": rand(2, 0, 4), "s": np.array([0, 4, 0], np.int64)}, dict(allowzero=1))


@pytest.mark.parametrize("equation,shapes", [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("...ii->...i", [(2, 3, 3)]),
    ("i,j", [(3,), (4,)]),
    ("ij->", [(3, 4)]),
])
def test_einsum(equation: str, shapes: list) -> None:
    check("Einsum", {f"x{i}": rand(*s) for i, s in enumerate(shapes)}, dict(equation=equation))


def test_split_and_squeeze_forms() -> None:
    x = rand(6, 4)
    check("Split", {"x": x, "s": np.array([2, 4], np.int64)}, dict(axis=0), outputs=("a", "b"))
    check("Split", {"x": x}, dict(axis=0), outputs=("a", "b", "c"), opset=11)
    check("Split", {"x": rand(7, 2)}, dict(axis=0, num_outputs=3), outputs=("a", "b", "c"), opset=18)
    check("Squeeze", {"x": rand(1, 3, 1), "a": np.array([-1], np.int64)})
    check("Unsqueeze", {"x": rand(3, 4), "a": np.array([0, -1], np.int64)})
    check("Squeeze", {"x": rand(1, 3, 1)}, dict(axes=[0]), opset=11)


def test_reductions_and_argmax() -> None:
    x = rand(3, 4, 5)
    axes = np.array([0, -1], np.int64)
    for op in ("ReduceSum",):
        check(op, {"x": x, "a": axes}, dict(keepdims=0))
    for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"):
        check(op, {"x": x, "a": axes}, dict(keepdims=1), opset=18)
        check(op, {"x": x}, dict(axes=[1], keepdims=0), opset=13)
    check("ArgMax", {"x": np.array([[1, 3, 3], [2, 2, 0]], np.float32)},
          dict(axis=1, select_last_index=1), out_types={"y": np.int64})
    check("ArgMin", {"x": x}, dict(axis=-1, keepdims=0), out_types={"y": np.int64})


def test_clip_forms() -> None:
    x = rand(3, 4)
    check("Clip", {"x": x, "lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)})
    check("Clip", {"x": x, "lo": None, "hi": np.array(0.1, np.float32)})
    check("Clip", {"x": x}, dict(min=-0.2, max=0.3), opset=6)


def test_activations() -> None:
    x = rand(4, 5) * 3
    for op, attrs in [("Relu", {}), ("LeakyRelu", dict(alpha=0.2)), ("Elu", {}), ("Selu", {}),
                      ("Sigmoid", {}), ("HardSigmoid", {}), ("HardSwish", {}), ("Tanh", {}),
                      ("Softplus", {}), ("Erf", {}), ("Celu", {}), ("Softsign", {})]:
        check(op, {"x": x}, attrs)
    check("PRelu", {"x": x, "s": rand(5)})
    check("Gelu", {"x": x}, opset=20)
    check("Gelu", {"x": x}, dict(approximate="tanh"), opset=20)


def test_if_reads_outer_scope() -> None:
    then_g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Mul", ["a", "w"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([2, 3, 4], np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for cond in (True, False):
        feeds = {"c": np.array(cond), "a": rand(3), "b": rand(3)}
        for got, expected in run_both(model, feeds):
            np.testing.assert_allclose(got, expected, rtol=1e-6)


# -- the executor ----------------------------------------------------------------------------------


def _chain_graph(n: int, op: str = "Relu") -> Graph:
    nodes = [Node(op, ["x" if i == 0 else f"v{i - 1}"], [f"v{i}" if i < n - 1 else "y"], name=f"n{i}")
             for i in range(n)]
    return Graph(nodes, [ValueInfo("x", np.float32, [None, 4])], [ValueInfo("y", np.float32, [None, 4])])


def test_unsorted_graph_runs_in_dependency_order() -> None:
    graph = _chain_graph(5)
    graph.nodes.reverse()
    x = rand(3, 4)
    np.testing.assert_array_equal(Executor(graph).run({"x": x})["y"], np.maximum(x, 0))


def test_cycle_is_a_format_error() -> None:
    nodes = [Node("Relu", ["b"], ["a"]), Node("Relu", ["a"], ["b"]), Node("Relu", ["b"], ["y"])]
    graph = Graph(nodes, [], [ValueInfo("y", np.float32)])
    with pytest.raises(FormatError, match="cycle"):
        Executor(graph)


def test_undefined_value_is_a_format_error() -> None:
    graph = Graph([Node("Relu", ["nowhere"], ["y"])], [], [ValueInfo("y", np.float32)])
    with pytest.raises(FormatError, match="nowhere"):
        Executor(graph)


def test_all_unsupported_operators_reported_at_once() -> None:
    sub = Graph([Node("FancyInner", ["a"], ["t"])], [], [ValueInfo("t", np.float32)])
    nodes = [Node("Relu", ["x"], ["a"]), Node("Frobnicate", ["a"], ["b"]),
             Node("If", ["c"], ["d"], {"then_branch": sub, "else_branch": sub}),
             Node("Thing", ["b"], ["y"], domain="com.example")]
    graph = Graph(nodes, [ValueInfo("x", np.float32), ValueInfo("c", np.bool_)], [ValueInfo("y", np.float32)])
    assert supported(graph) == ["FancyInner", "Frobnicate", "com.example.Thing"]
    with pytest.raises(UnsupportedOperatorError) as err:
        Executor(graph)
    assert err.value.ops == ["FancyInner", "Frobnicate", "com.example.Thing"]


def test_missing_input_and_unknown_output() -> None:
    ex = Executor(_chain_graph(2))
    with pytest.raises(InputError, match="missing input 'x'"):
        ex.run({})
    with pytest.raises(InputError, match="not a value"):
        ex.run({"x": rand(2, 4)}, outputs=["nope"])


def test_intermediate_outputs_can_be_requested() -> None:
    x = rand(2, 4)
    out = Executor(_chain_graph(4, "Neg")).run({"x": x}, outputs=["v0", "v2"])
    np.testing.assert_array_equal(out["v0"], -x)
    np.testing.assert_array_equal(out["v2"], -x)


def test_intermediates_are_freed_after_their_last_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a node runs, the input of the node before it (only read there) is already gone."""
    seen: List[weakref.ref] = []
    dead_on_arrival: List[bool] = []

    def tracking_relu(attrs: Dict[str, Any], x: np.ndarray) -> np.ndarray:
        if len(seen) >= 2:  # seen[-1] is the previous node's input; it had no reader after it
            dead_on_arrival.append(seen[-1]() is None)
        seen.append(weakref.ref(x))
        return np.maximum(x, 0)

    monkeypatch.setitem(OPS, "Relu", tracking_relu)
    x = rand(64, 4)
    Executor(_chain_graph(6)).run({"x": x})
    assert dead_on_arrival == [True] * 4


def test_value_read_twice_lives_until_its_second_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = [Node("Relu", ["x"], ["a"]), Node("Neg", ["a"], ["b"]), Node("Neg", ["b"], ["c"]),
             Node("Add", ["a", "c"], ["y"])]
    graph = Graph(nodes, [ValueInfo("x", np.float32)], [ValueInfo("y", np.float32)])
    x = rand(3, 4)
    np.testing.assert_allclose(Executor(graph).run({"x": x})["y"], 2 * np.maximum(x, 0))


def _small_cnn() -> "onnx.ModelProto":
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], group=8, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    inits = {"w1": rand(8, 3, 3, 3), "b1": rand(8), "w2": rand(8, 1, 3, 3), "w3": rand(10, 8), "b3": rand(10)}
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_small_cnn_matches_onnxruntime_with_dynamic_batch() -> None:
    model = _small_cnn()
    for batch in (1, 3):
        for got, expected in run_both(model, {"x": rand(batch, 3, 16, 16)}):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _mlp(dtype: Any = np.float32, extra_reader: bool = False) -> "onnx.ModelProto":
    """x [n, 20] -> Gemm(transB=1, bias) + Relu -> Gemm(transB=0, bias) + Relu -> Gemm(transB=1, no bias);
    ``extra_reader``: the first layer's output is also read by a Neg, a second graph output."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], transB=1, name="fc1"),
             helper.make_node("Relu", ["g1"], ["h1"]),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["g2"], name="fc2"),
             helper.make_node("Relu", ["g2"], ["h2"]),
             helper.make_node("Gemm", ["h2", "w3"], ["y"], transB=1, name="fc3")]
    outputs = [helper.make_tensor_value_info("y", elem, None)]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["h1"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", elem, None))
    inits = {"w1": rand(16, 20), "b1": rand(16), "w2": rand(16, 12), "b2": rand(12), "w3": rand(5, 12)}
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["n", 20])], outputs,
                              [numpy_helper.from_array(v.astype(dtype), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dense_layers_run_as_one_step() -> None:
    """Gemm layers that feed each other (each output read only by the next layer, and not wanted) run
    as one step; it computes exactly what the layers' own steps do (which ``profile`` times, one by
    one), for any batch, float32 or float64, and stops at a value read twice or asked for."""
    for dtype in (np.float32, np.float64):
        model = _mlp(dtype)
        ir = from_onnx(model)
        ex = Executor(ir.graph, ir.opsets)
        assert [(s.node.name, s.fused) for s in ex.steps()] == [("fc1", "Relu"), ("fc2", "Relu"), ("fc3", "")]
        assert [s.node.name for s in ex._default_plan.steps] == ["fc1 > fc2 > fc3"]
        for batch in (1, 3, 1, 40, 40):      # a runner per shape; the second 40 reuses the first's
            x = rand(batch, 20, dtype=dtype)
            y = ex.run({"x": x})["y"]
            np.testing.assert_array_equal(y, ex.run({"x": x}, times=[0.0] * 3)["y"])
            (_, expected), = run_both(model, {"x": x})
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        both = ex.run({"x": x}, outputs=["h1", "y"])
        w1, b1 = ir.graph.initializers["w1"], ir.graph.initializers["b1"]
        np.testing.assert_array_equal(both["h1"], np.maximum(x @ w1.T + b1, 0))
        np.testing.assert_array_equal(both["y"], y)
    model = _mlp(extra_reader=True)
    ex = Executor(from_onnx(model).graph)
    assert [s.node.name for s in ex._default_plan.steps if s.node.op_type == "Gemm"] == ["fc1", "fc2 > fc3"]
    x = rand(2, 20)
    for got, expected in run_both(model, {"x": x}):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    shapes = r"\[\(2, 16\), \(16, 12\), \(12,\), \(5, 13\), None\]"
    with pytest.raises(DcrtError, match=r"node 'fc2 > fc3' \(Gemm\) failed on inputs of shape " + shapes):
        ex.run({"x": x}, {**ex.graph.initializers, "w3": rand(5, 13)}.__getitem__)


@pytest.mark.parametrize("model, shapes", [
    (_small_cnn, [(2, 3, 16, 16)] * 8),
    (_mlp, [(batch, 20) for batch in (1, 3, 8) * 2]),      # a chain of dense layers, batches in turn
])
def test_four_threads_share_one_executor(model, shapes) -> None:
    """Four threads run one executor at once, each from its own place in the inputs, and each gets the
    serial result (a chain of dense layers keeps the runners of the call it prepared them for, with
    that call's batch)."""
    ir = from_onnx(model())
    ex = Executor(ir.graph, ir.opsets)
    xs = [rand(*shape) for shape in shapes]
    serial = [ex.run({"x": x})["y"] for x in xs]
    results: Dict[int, np.ndarray] = {}
    errors: List[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(5):
                for i in range(len(xs)):
                    j = (i + k) % len(xs)
                    results[j] = ex.run({"x": xs[j]})["y"]
                    np.testing.assert_array_equal(results[j], serial[j])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == len(xs)


def test_dense_chain_follows_its_weights_kinds() -> None:
    """A chain reuses its layers' runners only while the weights are the objects it saw: weights of
    another kind from the weight source (as a session in another mode, or stream mode's new
    objects each run) get their own runners, and integer layers run as their steps do."""
    ir = from_onnx(_mlp())
    ex = Executor(ir.graph, ir.opsets)
    kinds: Dict[str, List[Any]] = {}
    for i, name in enumerate(("w1", "w2", "w3")):
        shape = ir.graph.initializers[name].shape
        codebook, symbols = random_weight(shape, 0.3, seed=i)
        dense = np.concatenate([[0], codebook]).astype(np.float32)[symbols]
        csr = SparseWeight.from_entries(codebook, *sparse.encode_csc(symbols, 3), shape)
        by_input = ByInput(SparseWeight.from_entries(codebook, *sparse.encode_csc(symbols.T.copy(), 3), shape[::-1]))
        kinds[name] = [dense, IndexedWeight(np.concatenate([[0], codebook]), symbols), csr, by_input]
    x = rand(1, 20)
    b1, b2 = ir.graph.initializers["b1"], ir.graph.initializers["b2"]
    dense = {name: forms[0] for name, forms in kinds.items()}
    expected = np.maximum(np.maximum(x @ dense["w1"].T + b1, 0) @ dense["w2"] + b2, 0) @ dense["w3"].T
    for k in (1, 2, 3, 0, 2, 2):
        weights = {**ir.graph.initializers, **{name: forms[k] for name, forms in kinds.items()}}
        np.testing.assert_allclose(ex.run({"x": x}, weights.__getitem__)["y"], expected, rtol=1e-4, atol=1e-4)
    ints = {name: np.rint(4 * v).astype(np.int32) for name, v in ir.graph.initializers.items()}
    xi = np.rint(4 * x).astype(np.int32)
    yi = np.maximum(np.maximum(xi @ ints["w1"].T + ints["b1"], 0) @ ints["w2"] + ints["b2"], 0) @ ints["w3"].T
    got = ex.run({"x": xi}, ints.__getitem__)["y"]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, yi)


class IndexedStandIn:
    """A weight that, like the lead's indexed weight, refuses to be turned into an array by numpy.

    It supports exactly what operators may use: shape/ndim/dtype, leading-axis indexing,
    ``reshape(rows, -1)``, and the kernel methods; ``dense`` calls are counted.
    """

    def __init__(self, array: np.ndarray, log: List[str]):
        self._array, self._log = array, log
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("numpy was called directly on an indexed weight")

    def __getitem__(self, key: Any) -> "IndexedStandIn":
        assert isinstance(key, (int, np.integer, slice)), f"only leading-axis indexing, got {key!r}"
        return IndexedStandIn(self._array[key], self._log)

    def reshape(self, rows: int, rest: int) -> "IndexedStandIn":
        assert rest == -1 and rows == self.shape[0], "reshape(rows, -1) only"
        return IndexedStandIn(self._array.reshape(rows, -1), self._log)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        assert self.ndim == 2
        return np.matmul(x, self._array)

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        assert self.ndim == 2
        return np.matmul(x, self._array.T)

    def take_rows(self, idx: np.ndarray) -> np.ndarray:
        return np.take(self._array, idx, axis=0)

    def dense(self) -> np.ndarray:
        self._log.append("dense")
        return self._array.copy()


@pytest.mark.parametrize("op,inputs,attrs,outputs", [
    ("Conv", {"x": rand(1, 3, 7, 7), "w": rand(4, 3, 3, 3), "b": rand(4)}, dict(pads=[1, 1, 1, 1]), ["y"]),
    ("Conv", {"x": rand(1, 4, 7, 7), "w": rand(8, 2, 3, 3)}, dict(group=2), ["y"]),
    ("ConvTranspose", {"x": rand(1, 4, 5, 5), "w": rand(4, 3, 3, 3)}, dict(strides=[2, 2], group=2), ["y"]),
    ("Gemm", {"a": rand(3, 5), "w": rand(4, 5)}, dict(transB=1), ["y"]),
    ("Gemm", {"a": rand(3, 5), "w": rand(5, 4)}, {}, ["y"]),
    ("MatMul", {"a": rand(2, 3, 5), "w": rand(5, 4)}, {}, ["y"]),
    ("MatMul", {"w": rand(4, 5), "x": rand(5, 3)}, {}, ["y"]),          # a weight on the left: W @ x
    ("MatMul", {"w": rand(4, 5), "x": rand(2, 5, 3)}, {}, ["y"]),
    ("MatMul", {"w": rand(4, 5), "x": rand(5)}, {}, ["y"]),
    ("Gather", {"w": rand(10, 4), "i": np.array([[1, -1], [3, 0]], np.int64)}, {}, ["y"]),
    ("LSTM", {"x": rand(3, 2, 4), "w": rand(2, 12, 4), "r": rand(2, 12, 3)},
     dict(hidden_size=3, direction="bidirectional"), ["y", "h", "c"]),
    ("GRU", {"x": rand(3, 2, 4), "w": rand(1, 9, 4), "r": rand(1, 9, 3)}, dict(hidden_size=3), ["y", "h"]),
    ("GRU", {"x": rand(3, 2, 4), "w": rand(1, 9, 4), "r": rand(1, 9, 3)},
     dict(hidden_size=3, linear_before_reset=1), ["y", "h"]),
    ("RNN", {"x": rand(3, 2, 4), "w": rand(1, 3, 4), "r": rand(1, 3, 3)}, dict(hidden_size=3), ["y", "h"]),
])
def test_weights_are_only_used_through_kernels(op: str, inputs: Dict[str, np.ndarray],
                                               attrs: Dict[str, Any], outputs: List[str]) -> None:
    """Weight inputs (at an operator's weight slots, named w or r here) given as indexed-weight stand-ins
    give the same results as arrays, and are never expanded (``dense``) except for a depthwise kernel."""
    names = list(inputs)
    weight_positions = WEIGHT_INPUTS[op]
    weight_names = [n for i, n in enumerate(names) if i in weight_positions and n[0] in "wr"]
    graph = Graph([Node(op, names, outputs, attrs)],
                  [ValueInfo(n, inputs[n].dtype) for n in names if n not in weight_names],
                  [ValueInfo(o, np.float32) for o in outputs],
                  {n: inputs[n] for n in weight_names})
    ex = Executor(graph)
    feeds = {n: inputs[n] for n in names if n not in weight_names}
    reference = ex.run(feeds)
    log: List[str] = []
    standins = {n: IndexedStandIn(inputs[n], log) for n in weight_names}
    got = ex.run(feeds, weights=standins.__getitem__)
    for o in outputs:
        np.testing.assert_allclose(got[o], reference[o], rtol=1e-6, atol=1e-6)
    assert log == []


def test_depthwise_conv_may_expand_its_small_weight() -> None:
    log: List[str] = []
    w = rand(6, 1, 3, 3)
    graph = Graph([Node("Conv", ["x", "w"], ["y"], {"group": 6})], [ValueInfo("x", np.float32)],
                  [ValueInfo("y", np.float32)], {"w": w})
    x = rand(1, 6, 5, 5)
    got = Executor(graph).run({"x": x}, weights=lambda n: IndexedStandIn(w, log))["y"]
    np.testing.assert_allclose(got, Executor(graph).run({"x": x})["y"], rtol=1e-6)
    assert log == ["dense"]


def test_non_weight_input_holding_an_indexed_weight_is_expanded() -> None:
    """An initializer read by an op without a weight slot (here Add) is expanded with dense()."""
    log: List[str] = []
    b = rand(4)
    graph = Graph([Node("Add", ["x", "b"], ["y"])], [ValueInfo("x", np.float32)],
                  [ValueInfo("y", np.float32)], {"b": b})
    x = rand(2, 4)
    got = Executor(graph).run({"x": x}, weights=lambda n: IndexedStandIn(b, log))["y"]
    np.testing.assert_allclose(got, x + b)
    assert log == ["dense"]


def test_indexed_weight_captured_by_a_subgraph_is_expanded_where_read_as_a_value() -> None:
    """An If branch reads an outer initializer (captured, passed as it is held) with Add: dense()."""
    log: List[str] = []
    b = rand(4)
    branch = Graph([Node("Add", ["x", "b"], ["z"])], [], [ValueInfo("z", np.float32)])
    other = Graph([Node("Neg", ["x"], ["z2"])], [], [ValueInfo("z2", np.float32)])
    graph = Graph([Node("If", ["c"], ["y"], attrs={"then_branch": branch, "else_branch": other})],
                  [ValueInfo("x", np.float32), ValueInfo("c", np.bool_)], [ValueInfo("y", np.float32)], {"b": b})
    x = rand(2, 4)
    got = Executor(graph).run({"x": x, "c": np.array(True)}, weights=lambda n: IndexedStandIn(b, log))["y"]
    np.testing.assert_allclose(got, x + b)
    assert log == ["dense"]


def test_op_failure_names_the_node() -> None:
    graph = Graph([Node("MatMul", ["a", "b"], ["y"], name="proj")],
                  [ValueInfo("a", np.float32), ValueInfo("b", np.float32)], [ValueInfo("y", np.float32)])
    with pytest.raises(DcrtError, match="proj"):
        Executor(graph).run({"a": rand(2, 3), "b": rand(4, 5)})


def test_non_max_suppression() -> None:
    boxes = np.abs(rand(2, 12, 4)) * 10
    boxes[..., 2:] += boxes[..., :2]  # valid corner boxes
    check("NonMaxSuppression", {"b": boxes, "s": np.abs(rand(2, 3, 12)),
                                "m": np.array([4], np.int64), "i": np.array([0.3], np.float32),
                                "t": np.array([0.2], np.float32)}, out_types={"y": np.int64})


def test_quantize_dequantize_per_axis() -> None:
    x = rand(2, 3, 4) * 10
    scale = np.array([0.1, 0.2, 0.05], np.float32)
    check("QuantizeLinear", {"x": x, "s": scale, "z": np.array([3, -2, 0], np.int8)}, dict(axis=1),
          out_types={"y": np.int8})
    q = (RNG.integers(0, 255, (2, 3, 4))).astype(np.uint8)
    check("DequantizeLinear", {"q": q, "s": scale, "z": np.array([128, 120, 3], np.uint8)}, dict(axis=1),
          out_types={"y": np.float32})


def test_runtime_imports_without_converter_packages(tmp_path: Any) -> None:
    """The device side needs numpy only: the executor runs with onnx, onnxruntime, protobuf and
    h5py made unimportable."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "for name in ('onnx', 'onnxruntime', 'google', 'google.protobuf', 'h5py'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np\n"
        "from dcrt.graph import Graph, Node, ValueInfo\n"
        "from dcrt.runtime.executor import Executor\n"
        "g = Graph([Node('Conv', ['x', 'w'], ['y'], {'pads': [1, 1, 1, 1]})], [ValueInfo('x', np.float32)],\n"
        "          [ValueInfo('y', np.float32)], {'w': np.ones((2, 1, 3, 3), np.float32)})\n"
        "y = Executor(g).run({'x': np.ones((1, 1, 4, 4), np.float32)})['y']\n"
        "assert y.shape == (1, 2, 4, 4) and y[0, 0, 1, 1] == 9\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- limits: a node that asks for a huge array is refused before allocating ------------------------

_I64 = lambda *v: np.array(v, np.int64)  # noqa: E731
HUGE = [  # (op, inputs, attrs, weights): each asks for far more than 1 GiB from small inputs
    ("Conv", dict(x=rand(1, 1, 4, 4), w=rand(1, 1, 1, 1)), dict(pads=[2**26, 2**26, 0, 0]), ("w",)),
    ("MaxPool", dict(x=rand(1, 1, 4, 4)), dict(kernel_shape=[1, 1], pads=[2**26, 0, 2**26, 0]), ()),
    ("AveragePool", dict(x=rand(1, 1, 4, 4)), dict(kernel_shape=[1, 1], pads=[0, 2**26, 0, 2**26]), ()),
    ("ConvTranspose", dict(x=rand(1, 1, 4, 4), w=rand(1, 1, 1, 1)), dict(strides=[2**15, 2**15]), ("w",)),
    ("Pad", dict(x=rand(2, 2), pads=_I64(0, 0, 2**20, 2**20)), {}, ("pads",)),
    ("Tile", dict(x=rand(2, 2), repeats=_I64(2**16, 2**16)), {}, ("repeats",)),
    ("Expand", dict(x=rand(1, 1), shape=_I64(2**16, 2**16)), {}, ("shape",)),
    ("ConstantOfShape", dict(shape=_I64(2**20, 2**20)), {}, ("shape",)),
    ("Range", dict(start=np.array(0, np.int64), limit=np.array(2**40, np.int64), delta=np.array(1, np.int64)),
     {}, ("start", "limit", "delta")),
    ("OneHot", dict(indices=_I64(1, 2), depth=_I64(2**31), values=np.array([0, 1], np.float32)), {},
     ("depth", "values")),
    ("Resize", dict(x=rand(1, 1, 2, 2), roi=np.zeros(0, np.float32),
                    scales=np.array([1, 1, 2**15, 2**15], np.float32)), {}, ("roi", "scales")),
    ("Add", dict(a=rand(2**15, 1), b=rand(1, 2**15)), {}, ()),
    ("Where", dict(c=np.ones((2**15, 1), bool), a=rand(1, 2**15), b=rand(1)), {}, ()),
    ("MatMul", dict(a=rand(2**10, 1, 1, 8), b=rand(1, 2**10, 8, 2**9)), {}, ()),
    ("CenterCropPad", dict(x=rand(2, 2), shape=_I64(2**20, 2**20)), {}, ("shape",)),
    ("Einsum", dict(a=rand(2**16), b=rand(2**16)), dict(equation="i,j->ij"), ()),
]


@pytest.mark.parametrize("op, inputs, attrs, weights", HUGE, ids=[c[0] for c in HUGE])
def test_huge_results_are_refused_before_allocating(op: str, inputs: Dict[str, np.ndarray],
                                                    attrs: Dict[str, Any], weights: Sequence[str]) -> None:
    """A LimitError naming the node, raised before the array exists (no allocation near its size)."""
    import tracemalloc

    from dcrt.errors import LimitError
    model = one_node_model(op, inputs, attrs, weights=weights, opset=18)
    model.graph.node[0].name = "greedy"
    ir = from_onnx(model)
    feeds = {n: v for n, v in inputs.items() if n not in weights}
    tracemalloc.start()
    try:
        with pytest.raises(LimitError, match=r"node 'greedy' \(" + op + r"\).*GiB.*DCRT_MAX_TENSOR_BYTES"):
            Executor(ir.graph, ir.opsets).run(feeds, ir.graph.initializers.__getitem__)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


def test_tensor_limit_is_configurable(tmp_path: Any) -> None:
    """DCRT_MAX_TENSOR_BYTES lowers (or raises) the limit for a process."""
    import subprocess
    import sys
    script = ("import numpy as np; from dcrt.runtime.ops import tensor; from dcrt.errors import LimitError\n"
              "tensor.tile({}, np.zeros((4, 4), np.float32), np.array([8, 8]))\n"
              "try:\n    tensor.tile({}, np.zeros((4, 4), np.float32), np.array([9, 8])); print('allocated')\n"
              "except LimitError as e:\n    print('refused', e)\n")
    env = dict(__import__("os").environ, DCRT_MAX_TENSOR_BYTES=str(32 * 32 * 4))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("refused") and "[36, 32]" in out


def test_a_loop_run_zero_times_gives_scan_outputs_as_declared() -> None:
    """Zero iterations: each scan output is empty along its new first axis with the type and element
    shape the body declares (they came back as float32 of shape (0,))."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond2"]), helper.make_node("Add", ["acc", "i"], ["acc2"]),
         helper.make_node("Unsqueeze", ["i", "zero"], ["iu"]), helper.make_node("Identity", ["h"], ["hs"])],
        "body", [vi("i", TensorProto.INT64, []), vi("cond", TensorProto.BOOL, []), vi("acc", TensorProto.INT64, [])],
        [vi("cond2", TensorProto.BOOL, []), vi("acc2", TensorProto.INT64, []), vi("iu", TensorProto.INT64, [1]),
         vi("hs", TensorProto.FLOAT, [2, 16])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "a0"], ["accf", "idx", "hseq"], body=body)], "g",
        [vi("trip", TensorProto.INT64, []), vi("a0", TensorProto.INT64, []), vi("h", TensorProto.FLOAT, [2, 16])],
        [vi("accf", TensorProto.INT64, []), vi("idx", TensorProto.INT64, ["T", 1]),
         vi("hseq", TensorProto.FLOAT, ["T", 2, 16])], [numpy_helper.from_array(np.array([0], np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    for trip in (0, 3):
        feeds = {"trip": np.array(trip, np.int64), "a0": np.array(5, np.int64), "h": rand(2, 16)}
        for got, expected in run_both(model, feeds):
            assert got.shape == expected.shape and got.dtype == expected.dtype, (trip, got.shape, expected.shape)
            np.testing.assert_array_equal(got, expected)


def test_endless_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Loop whose condition never turns false (no trip count) stops at the iteration limit."""
    from dcrt.errors import LimitError
    from dcrt.runtime.ops import control

    def run(trip: Optional[int]) -> np.ndarray:
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
            [numpy_helper.from_array(np.ones(1, np.float32), "one")])
        inits = [numpy_helper.from_array(np.array(True), "cond")]
        if trip is not None:
            inits.append(numpy_helper.from_array(np.array(trip, np.int64), "n"))
        node = helper.make_node("Loop", ["n" if trip is not None else "", "cond", "v0"], ["v"], name="forever", body=body)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("v0", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])], inits)
        ir = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        feeds = {"v0": np.zeros(1, np.float32)}
        return Executor(ir.graph, ir.opsets).run(feeds, ir.graph.initializers.__getitem__)["v"]

    monkeypatch.setattr(control, "MAX_LOOP_ITERATIONS", 50)
    with pytest.raises(LimitError, match=r"node 'forever' \(Loop\).*after 50 iterations.*DCRT_MAX_LOOP_ITERATIONS"):
        run(None)
    assert run(50)[0] == 50             # a loop that ends within the limit runs


@pytest.mark.parametrize("op, opset, shape, attrs", [
    ("MaxPool", 13, [1, 1, 2], dict(kernel_shape=[3], strides=[2])),
    ("AveragePool", 13, [1, 1, 2, 4, 4], dict(kernel_shape=[2, 3, 5], strides=[2, 2, 2])),
    ("LpPool", 18, [1, 1, 2, 2, 4], dict(kernel_shape=[1, 1, 5], strides=[2, 2, 2], auto_pad="VALID")),
    ("MaxPool", 13, [1, 1, 4, 4], dict(kernel_shape=[5, 5], strides=[3, 3])),
])
def test_pooling_window_longer_than_the_input(op, opset, shape, attrs, tmp_path):
    """A window longer than its input by less than a stride: one output over what it covers, as
    onnxruntime (dcrt failed with numpy's broadcast error, or gave none); a stride more is a message."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    import dcrt
    from dcrt.errors import InputError

    def model(shape):
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.save(m, str(tmp_path / "m.onnx"))
        dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"), force=True)
    model(shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for mode in ("index", "dense", "stream"):
        np.testing.assert_allclose(dcrt.Session(str(tmp_path / "m.dcm"), mode=mode).run(x), want, rtol=1e-5, atol=1e-6)
    short = shape[:-1] + [1]
    model(short)
    with pytest.raises(InputError, match="no output position"):
        dcrt.Session(str(tmp_path / "m.dcm")).run(np.zeros(short, np.float32))


def test_an_integer_resize_saturates_a_cubic_overshoot() -> None:
    """uint8 through a cubic resize: the kernel's overshoot past 255 (or below 0) saturates, as onnx's
    reference computes it (it wrapped: 256 -> 0); onnxruntime does not take uint8 cubic."""
    from onnx.reference import ReferenceEvaluator
    x = np.array([[[[0, 0, 0, 0, 255, 255, 255, 255]]]], np.uint8)
    model = one_node_model("Resize", {"x": x, "roi": None, "scales": np.array([1, 1, 1, 2], np.float32)},
                           dict(mode="cubic"), weights=("scales",))
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = Executor(from_onnx(model).graph, {"": 17}).run({"x": x})["y"]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8 and int(got.max()) == 255 and int(got.min()) == 0
