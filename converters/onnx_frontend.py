"""ONNX frontend: an ``onnx.ModelProto`` (or ``.onnx`` file) to dcrt's graph IR.

Initializers become numpy arrays (external data files are read), top-level ``Constant`` nodes become
initializers (exporters often hold weights in them), initializers listed again as graph inputs are
dropped from the inputs, and attribute values become plain Python values.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Tuple, Union

import numpy as np

from dcrt.errors import ConversionError
from dcrt.format.dtypes import NUMPY_TO_ONNX
from dcrt.graph import Graph, Model, Node, ValueInfo

try:
    import onnx
    from onnx import helper, numpy_helper
except ImportError as e:  # pragma: no cover - the [convert] extra is missing
    raise ConversionError("converting ONNX models needs the onnx package: pip install 'dcrt[convert]'") from e

from .onnx_functions import expand_functions  # noqa: E402 - needs onnx, checked above


def load(path: str) -> onnx.ModelProto:
    """Read an ONNX file with its external data; ConversionError if it is unreadable."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ConversionError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    # a file cut at a field boundary still parses: what is left is missing its graph or its opsets
    if not model.HasField("graph"):
        raise ConversionError(f"{path} holds no graph: the file is empty, truncated or not an ONNX model")
    if not model.opset_import:
        raise ConversionError(f"{path} declares no opset (opset_import, stored after the graph): the file is "
                              "truncated or was not written by an ONNX exporter; export it again")
    folder = os.path.dirname(os.path.abspath(path))
    missing = sorted({_external_location(t) for t in _all_initializers(model.graph)
                      if t.data_location == onnx.TensorProto.EXTERNAL
                      and not os.path.exists(os.path.join(folder, _external_location(t)))})
    if missing:
        raise ConversionError(f"{path} keeps its weights in external data file(s) {', '.join(missing)} "
                              f"that are not in {folder}; put them next to the model file")
    try:
        onnx.load_external_data_for_model(model, folder)
    except Exception as e:
        raise ConversionError(f"{path}: cannot read external data ({e}); external data files must be in the "
                              "model's folder, complete") from None
    return model


def external_files(model: onnx.ModelProto, folder: str) -> list:
    """Paths of the external data files a model refers to (for size reports)."""
    names = {_external_location(t) for t in _all_initializers(model.graph)
             if t.data_location == onnx.TensorProto.EXTERNAL}
    return sorted(os.path.join(folder, n) for n in names if n)


def from_onnx(model: Union[onnx.ModelProto, str]) -> Model:
    """Translate an ONNX model (proto or path) into the dcrt IR."""
    where = ""
    if isinstance(model, (str, os.PathLike)):
        where = os.fspath(model)
        model = load(where)
    model = expand_functions(model, runtime_implements)
    opsets = {o.domain if o.domain != "ai.onnx" else "": int(o.version) for o in model.opset_import}
    try:
        graph = _graph(model.graph, top=True)
    except ConversionError as e:  # name the file in the messages of the checks below
        if not where or type(e) is not ConversionError:
            raise
        raise ConversionError(f"{where}: {e}") from None
    meta = {p.key: p.value for p in model.metadata_props}
    return Model(graph, opsets or {"": 17}, meta)


def runtime_implements(domain: str, op_type: str) -> bool:
    """Whether the runtime has a kernel for the operator (else its ONNX function body may stand in)."""
    from dcrt.runtime.ops import DEFAULT_DOMAINS, OPS
    return domain in DEFAULT_DOMAINS and op_type in OPS


def _external_location(t) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _all_initializers(g):
    yield from g.initializer
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _all_initializers(sub)


def _array(t: onnx.TensorProto) -> np.ndarray:
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise ConversionError(f"tensor {t.name!r} has negative dims {dims}: the file is damaged; export it again")
    # checked before numpy sees the dims: a damaged tensor must not claim terabytes
    size, dtype = math.prod(dims), _np_dtype(t.data_type)
    if t.HasField("raw_data") and dtype is not None and len(t.raw_data) != size * dtype.itemsize:
        raise ConversionError(f"tensor {t.name!r} has dims {dims} ({size} values) but {len(t.raw_data)} bytes "
                              f"of data ({dtype.itemsize} per value): the file is damaged or truncated; "
                              "export it again")
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:
        raise ConversionError(f"tensor {t.name!r} (dims {dims}) cannot be read ({e}): its data does not match its "
                              "dims or type; the file is damaged: export it again") from None
    if arr.dtype == object:
        raise ConversionError(f"tensor {t.name!r} holds strings, which dcrt does not support")
    if np.dtype(arr.dtype) not in NUMPY_TO_ONNX:    # bfloat16, float8, int4 (numpy has no such types)
        raise ConversionError(f"tensor {t.name!r} is {onnx.TensorProto.DataType.Name(t.data_type).lower()}, "
                              "a type dcrt does not store (it stores float16/32/64, integers and bool): "
                              "export the model with it as float16 or float32")
    return np.array(arr)  # own, writable, contiguous


def _np_dtype(elem_type: int) -> "np.dtype | None":
    """The numpy type of a fixed-size ONNX element type stored one value per item; None otherwise."""
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return None
    packed = elem_type in {getattr(onnx.TensorProto, n, -1)
                           for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")}  # two or four per byte
    return None if dtype == object or packed else dtype


def _value_info(vi: onnx.ValueInfoProto) -> ValueInfo:
    tt = vi.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.float32
    except Exception:
        raise ConversionError(f"value {vi.name!r} has an element type dcrt does not support "
                              f"({onnx.TensorProto.DataType.Name(tt.elem_type)})") from None
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return ValueInfo(vi.name, dtype, shape)


def _attr(a: onnx.AttributeProto) -> Any:
    kind = a.type
    if kind == onnx.AttributeProto.TENSOR:
        return _array(a.t)
    if kind == onnx.AttributeProto.TENSORS:
        return [_array(t) for t in a.tensors]
    if kind == onnx.AttributeProto.GRAPH:
        return _graph(a.g)
    if kind == onnx.AttributeProto.GRAPHS:
        return [_graph(g) for g in a.graphs]
    if kind in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS,
                onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS):
        raise ConversionError(f"attribute {a.name!r} has type {onnx.AttributeProto.AttributeType.Name(kind)}, "
                              "which dcrt does not support")
    value = helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in value]
    return value


def _constant_value(node: Node):
    """The tensor a Constant node produces, or None if it is not a plain constant."""
    a = node.attrs
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.array(a[key], dtype=dtype)
    return None


def _graph(g: onnx.GraphProto, top: bool = False) -> Graph:
    inits: Dict[str, np.ndarray] = {}
    for t in g.initializer:
        if t.name in inits:
            raise ConversionError(f"two initializers are named {t.name!r}: the file is damaged; export it again")
        inits[t.name] = _array(t)
    nodes = []
    outputs = {o.name for o in g.output}
    for n in g.node:
        node = Node(n.op_type, list(n.input), list(n.output), {a.name: _attr(a) for a in n.attribute},
                    n.name, n.domain if n.domain != "ai.onnx" else "")
        value = _constant_value(node) if (top and node.op_type == "Constant" and not node.domain) else None
        if value is not None and node.outputs and node.outputs[0] not in outputs:
            if node.outputs[0] in inits:  # would silently replace a weight
                raise ConversionError(f"Constant node {node.name!r} writes {node.outputs[0]!r}, which is also an "
                                      "initializer: the file is damaged; export it again")
            inits[node.outputs[0]] = np.asarray(value)
            continue
        nodes.append(node)
    inputs = [_value_info(v) for v in g.input if v.name not in inits]
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(g.input) + list(g.value_info) + list(g.output)}
    _check_conv_weights(nodes, inits, shapes)
    return Graph(nodes, inputs, [_value_info(v) for v in g.output], inits, g.name)


def _check_conv_weights(nodes, inits: Dict[str, np.ndarray], shapes: Dict[str, list]) -> None:
    """A Conv's weight against its bias and, where the file states the input's shape, its channels:
    a mismatch would otherwise be found only when the converted model first runs."""
    for node in nodes:
        if node.op_type != "Conv" or node.domain or len(node.inputs) < 2 or node.inputs[1] not in inits:
            continue
        w, group = inits[node.inputs[1]], node.attrs.get("group", 1)
        label = f"Conv node {node.name or node.outputs!r}: weight {node.inputs[1]!r} of shape {list(w.shape)}"
        if not isinstance(group, int) or group < 1:
            raise ConversionError(f"{label} has group {group!r}, not a positive integer: the file is damaged")
        if w.ndim < 3:
            raise ConversionError(f"{label} is not [out, in/group, *kernel]: the file is damaged; export it again")
        bias = inits.get(node.inputs[2]) if len(node.inputs) > 2 else None
        if bias is not None and bias.shape != w.shape[:1]:
            raise ConversionError(f"{label} has {w.shape[0]} outputs but its bias {node.inputs[2]!r} has shape "
                                  f"{list(bias.shape)}: the file is damaged; export it again")
        x = shapes.get(node.inputs[0])
        if x and len(x) == w.ndim and x[1] and x[1] != w.shape[1] * group:
            raise ConversionError(f"{label} (group {group}) reads {w.shape[1] * group} channels, but its input "
                                  f"{node.inputs[0]!r} has shape {x}: the weights do not belong to this graph; "
                                  "export the model again")
