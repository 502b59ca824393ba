"""Test helper: dcrt's graph IR back to an ONNX model, to run a converted graph with onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dcrt.graph import Graph, Model


def _attr(name, value):
    if isinstance(value, Graph):
        return helper.make_attribute(name, to_graph(value))
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    return helper.make_attribute(name, value)


def _vi(v):
    return helper.make_tensor_value_info(v.name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)


def to_graph(g: Graph, weights=None) -> onnx.GraphProto:
    weights = weights or {}
    nodes = [helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, domain=n.domain or None,
                              **{}) for n in g.nodes]
    for proto, n in zip(nodes, g.nodes):
        proto.attribute.extend(_attr(k, v) for k, v in sorted(n.attrs.items()))
    inits = [numpy_helper.from_array(np.asarray(weights.get(k, v)), k) for k, v in g.initializers.items()]
    return helper.make_graph(nodes, g.name or "g", [_vi(v) for v in g.inputs], [_vi(v) for v in g.outputs], inits)


def to_onnx(model: Model, weights=None) -> onnx.ModelProto:
    """``model`` as ONNX, with initializers replaced by ``weights[name]`` where given."""
    m = helper.make_model(to_graph(model.graph, weights),
                          opset_imports=[helper.make_opsetid(d, v) for d, v in model.opsets.items()])
    m.ir_version = 8
    return m


def run_ort(model: onnx.ModelProto, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
