"""Caffe frontend: a ``deploy.prototxt`` + ``.caffemodel`` pair to dcrt's graph IR.

The network definition is read with protobuf's text format, the weights from the binary
NetParameter in the caffemodel (matched to the definition's layers by name), both through
``caffe_pb2``, generated from dcrt's own minimal ``caffe.proto`` (BVLC Caffe's field numbers; see
``regen_caffe.sh``). Caffe is not needed.

Caffe blobs are NCHW like ONNX, so layers map onto ONNX operators one to one and weights keep their
layout (InnerProduct is ``Gemm`` with ``transB=1``). What needs care:

* In-place layers (``top == bottom``, e.g. ReLU, BatchNorm, Scale) are renamed into SSA form: the
  last definition of a blob keeps the blob's name, earlier ones become ``<blob>/<layer>``.
* BatchNorm stores ``mean * s``, ``variance * s`` and ``s``; it has no scale or shift of its own, so a
  Scale that follows it is merged into one ONNX BatchNormalization.
* Pooling rounds the output size up (ceil) and drops a last window that would start in the padding;
  average pooling divides by the window clipped to the padded input (``count_include_pad=1``).
* The batch dimension of the inputs is left free.

Supported layers: Input (and the net-level input / input_shape / input_dim), Convolution (group,
pad/stride/kernel_size incl. _h/_w, dilation, bias_term), Deconvolution, InnerProduct (axis,
transpose), Pooling (MAX/AVE, global_pooling, CEIL/FLOOR rounding), ReLU (negative_slope), PReLU,
ELU, Sigmoid, TanH, AbsVal, BNLL, Power, Softmax, LRN (ACROSS_CHANNELS, WITHIN_CHANNEL), Dropout,
BatchNorm, Scale (bias_term), Eltwise (SUM with coeffs, PROD, MAX), Concat, Flatten, Reshape,
Split, Silence. The old V1 format (``layers { type: CONVOLUTION }``) is refused with the command
that upgrades it; an old V1 caffemodel's weights are read as they are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcrt.errors import ConversionError, UnsupportedOperatorError
from dcrt.graph import Graph, Model, Node, ValueInfo

try:
    from google.protobuf import text_format
    from google.protobuf.message import DecodeError
except ImportError as e:  # pragma: no cover - the [convert] extra is missing
    raise ConversionError("converting Caffe models needs the protobuf package: "
                          "pip install 'dcrt[convert]'") from e

from . import caffe_pb2
from .builder import GraphBuilder
from .passes import check_shape

OPSET = 17
Shape = List[int]

UPGRADE_HINT = ("upgrade it with Caffe's tools: upgrade_net_proto_text old.prototxt new.prototxt "
                "(and upgrade_net_proto_binary old.caffemodel new.caffemodel)")


# ---------------------------------------------------------------------------------------------------
# reading the files
# ---------------------------------------------------------------------------------------------------


def parse_prototxt(source: str) -> "caffe_pb2.NetParameter":
    """A network definition from a ``.prototxt`` path or from its text.

    Strict: a field this minimal ``caffe.proto`` does not declare is an error here (use
    :func:`from_caffe`, which reports unsupported layers by type first).
    """
    net, strict_error = _parse_prototxt(source)
    if strict_error:
        raise ConversionError(f"not a network definition dcrt can read: {strict_error}")
    return net


def _parse_prototxt(source: str) -> Tuple["caffe_pb2.NetParameter", Optional[str]]:
    """(network, error of the strict parse or None).

    When the strict parse fails, the text is parsed again skipping unknown fields (a fork's layer
    parameters, data-layer settings) so that the layers can still be listed by type.
    """
    text = source
    if "\n" not in source and "{" not in source:
        if not os.path.exists(source):
            raise ConversionError(f"{source}: no such file")
        with open(source, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
        strict_error = None
    except text_format.ParseError as e:
        strict_error = str(e)
        net = caffe_pb2.NetParameter()
        try:
            text_format.Parse(text, net, allow_unknown_field=True)
        except text_format.ParseError as e2:
            raise ConversionError(f"not a Caffe network definition: {e2}") from None
    if net.layers and not net.layer:
        raise ConversionError("the network definition uses Caffe's old V1 layer format "
                              f"(layers {{ type: CONVOLUTION ... }}); {UPGRADE_HINT}")
    return net, strict_error


def _read_weights(path: str) -> "caffe_pb2.NetParameter":
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable .caffemodel (a binary NetParameter): {e}") from None
    if not net.layer and not net.layers:
        raise ConversionError(f"{path} holds no layers: not a .caffemodel")
    return net


def _blob_array(blob) -> np.ndarray:
    """A BlobProto's values with its shape (the legacy 4-D fields when ``shape`` is unset)."""
    values = np.asarray(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = [int(d) for d in blob.shape.dim]
    else:
        shape = [int(blob.num), int(blob.channels), int(blob.height), int(blob.width)]
    if int(np.prod(shape, dtype=np.int64)) != values.size:
        shape = [values.size]
    return values.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# the graph being built
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Value:
    """A blob version: its IR name and (concrete, batch included) shape."""

    name: str
    shape: Shape


class _Builder(GraphBuilder):
    def __init__(self) -> None:
        super().__init__()
        self.bn_nodes: Dict[str, Node] = {}  # BatchNorm output value -> its node (for Scale merging)

    def node(self, op: str, inputs: List[str], name: str, out: Optional[str] = None, **attrs: Any) -> str:
        """Add a node named after ``name``; its output is ``out`` as given (a top), else a new value."""
        node_name = self.node_name(name)
        output = out if out is not None else self.fresh(f"{node_name}.out")
        self.append(op, inputs, [output], node_name, attrs)
        return output


class _Unsupported(Exception):
    """A layer setting dcrt cannot translate."""


@dataclass
class _Layer:
    """What a layer translation gets: the layer, its inputs, its weights and where to write."""

    param: Any                      # caffe_pb2.LayerParameter
    inputs: List[_Value]
    blobs: List[np.ndarray]
    outs: List[str]                 # IR names for the tops
    input_readers: int = 1          # how many layers read the first bottom (this one included)

    @property
    def name(self) -> str:
        return self.param.name


def _spatial(repeated: Sequence[int], h: int, w: int, default: int, dims: int, what: str) -> List[int]:
    """Caffe's kernel/stride/pad/dilation: a repeated value (one or per axis) or _h/_w, or default."""
    if h or w:
        if dims != 2:
            raise _Unsupported(f"{what}_h/{what}_w on a {dims}-D input")
        return [int(h), int(w)]
    values = [int(v) for v in repeated]
    if not values:
        return [default] * dims
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise _Unsupported(f"{len(values)} {what} values for {dims} spatial axes")
    return values


def _conv_geometry(p, rank: int) -> Tuple[List[int], List[int], List[int], List[int]]:
    dims = rank - 2
    kernel = _spatial(p.kernel_size, p.kernel_h, p.kernel_w, 0, dims, "kernel")
    if any(k <= 0 for k in kernel):
        raise _Unsupported("no kernel_size")
    stride = _spatial(p.stride, p.stride_h, p.stride_w, 1, dims, "stride")
    pad = _spatial(p.pad, p.pad_h, p.pad_w, 0, dims, "pad")
    dilation = _spatial(p.dilation, 0, 0, 1, dims, "dilation")
    return kernel, stride, pad, dilation


def _check_count(layer: _Layer, want: int, shapes: List[Shape]) -> List[np.ndarray]:
    """The layer's first ``want`` blobs, reshaped to ``shapes`` (old caffemodels store 4-D blobs)."""
    if len(layer.blobs) < want:
        raise ConversionError(f"layer {layer.name!r} ({layer.param.type}) needs {want} weight blob(s), "
                              f"the caffemodel has {len(layer.blobs)}")
    out = []
    for blob, shape in zip(layer.blobs[:want], shapes):
        # Caffe itself insists on the exact shape; 1s are ignored here for old 4-D blobs ([1, 1, n, k]),
        # and a flat blob (or one whose stated shape was unusable) only needs the right size
        squeeze = [d for d in blob.shape if d != 1] != [int(d) for d in shape if d != 1]
        if blob.size != int(np.prod(shape, dtype=np.int64)) or (blob.ndim > 1 and squeeze):
            raise ConversionError(f"layer {layer.name!r} ({layer.param.type}): a weight blob of shape "
                                  f"{list(blob.shape)} where {shape} is expected: the caffemodel does not "
                                  "belong to this prototxt, or it is damaged")
        out.append(blob.reshape(shape))
    return out


def _zero_params(layer) -> List[str]:
    """The settings of a layer that Caffe requires to be >= 1 but are 0 (they would divide by zero)."""
    kind, zero = layer.type, []
    if kind in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        zero = ([n for n in ("num_output", "group") if getattr(p, n) == 0]
                + [n for n in ("stride", "dilation") if 0 in getattr(p, n)]
                + ["stride_h/stride_w"] * bool((p.stride_h or p.stride_w) and not (p.stride_h and p.stride_w)))
    elif kind == "Pooling" and not layer.pooling_param.global_pooling:
        p = layer.pooling_param
        hw = p.stride_h or p.stride_w
        zero = ["stride_h/stride_w"] if hw and not (p.stride_h and p.stride_w) else ["stride"] * (p.stride == 0)
    elif kind == "InnerProduct":
        zero = ["num_output"] * (layer.inner_product_param.num_output == 0)
    return zero


# -- one function per layer type: fn(builder, layer) -> output values -------------------------------


def param_shapes(kind: str, param: Any, in_shapes: List[Shape]) -> List[Shape]:
    """The shapes of the weight blobs Caffe gives a layer of type ``kind`` with these inputs."""
    if kind in ("Convolution", "Deconvolution"):
        p = param.convolution_param
        channels = in_shapes[0][1]
        kernel, _, _, _ = _conv_geometry(p, len(in_shapes[0]))
        group = int(p.group)
        if kind == "Convolution":
            weight = [int(p.num_output), channels // group] + kernel
        else:
            weight = [channels, int(p.num_output) // group] + kernel
        return [weight] + ([[int(p.num_output)]] if p.bias_term else [])
    if kind == "InnerProduct":
        p = param.inner_product_param
        axis = p.axis % len(in_shapes[0])
        k = int(np.prod(in_shapes[0][axis:], dtype=np.int64))
        weight = [k, int(p.num_output)] if p.transpose else [int(p.num_output), k]
        return [weight] + ([[int(p.num_output)]] if p.bias_term else [])
    if kind == "BatchNorm":
        c = in_shapes[0][1] if len(in_shapes[0]) > 1 else 1
        return [[c], [c], [1]]
    if kind == "Scale":
        p = param.scale_param
        shape = in_shapes[0]
        axis = p.axis % len(shape)
        if len(in_shapes) > 1:  # the scale is the second bottom; only the bias is a blob
            return [list(in_shapes[1])] if p.bias_term else []
        end = len(shape) if p.num_axes == -1 else axis + p.num_axes
        scale = [int(s) for s in shape[axis:end]]
        return [scale] + ([scale] if p.bias_term else [])
    if kind == "PReLU":
        return [[1] if param.prelu_param.channel_shared else [in_shapes[0][1]]]
    return []


def _convolution(b: _Builder, layer: _Layer) -> List[_Value]:
    """Convolution and Deconvolution (ONNX ConvTranspose): the same parameters, blobs and attributes."""
    p = layer.param.convolution_param
    x = layer.inputs[0]
    transposed = layer.param.type == "Deconvolution"
    if p.axis not in (1, 1 - len(x.shape)):
        raise _Unsupported(f"axis={p.axis}")
    kernel, stride, pad, dilation = _conv_geometry(p, len(x.shape))
    shapes = param_shapes(layer.param.type, layer.param, [x.shape])
    blobs = _check_count(layer, len(shapes), shapes)
    if x.shape[1] % p.group or p.num_output % p.group:     # Caffe checks both, for Deconvolution too
        raise ConversionError(f"layer {layer.name!r}: group {p.group} does not divide the channels")
    inputs = [x.name, b.const(f"{layer.name}.weight", blobs[0])]
    if p.bias_term:
        inputs.append(b.const(f"{layer.name}.bias", blobs[1]))
    y = b.node("ConvTranspose" if transposed else "Conv", inputs, layer.name, out=layer.outs[0],
               kernel_shape=kernel, strides=stride, pads=pad + pad, dilations=dilation, group=int(p.group))
    geometry = zip(x.shape[2:], kernel, stride, pad, dilation)
    if transposed:
        spatial = [s * (n - 1) + d * (k - 1) + 1 - 2 * q for n, k, s, q, d in geometry]
    else:
        spatial = [(n + 2 * q - (d * (k - 1) + 1)) // s + 1 for n, k, s, q, d in geometry]
    return [_Value(y, [x.shape[0], int(p.num_output)] + spatial)]


def _inner_product(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.inner_product_param
    x = layer.inputs[0]
    axis = p.axis % len(x.shape)
    shapes = param_shapes("InnerProduct", layer.param, [x.shape])
    blobs = _check_count(layer, len(shapes), shapes)
    n = int(p.num_output)
    bias = b.const(f"{layer.name}.bias", blobs[1]) if p.bias_term else None
    out_shape = list(x.shape[:axis]) + [n]
    if axis == 1:
        src = x.name
        if len(x.shape) > 2:
            src = b.node("Flatten", [x.name], f"{layer.name}/flatten", axis=1)
        weight = b.const(f"{layer.name}.weight", blobs[0])
        y = b.node("Gemm", [src, weight] + ([bias] if bias else []), layer.name, out=layer.outs[0],
                   transB=0 if p.transpose else 1)
        return [_Value(y, out_shape)]
    # the leading axes are kept: a batched product with the [K, N] matrix over the trailing axes
    matrix = b.const(f"{layer.name}.weight", blobs[0] if p.transpose else blobs[0].T)
    src = x.name
    if len(x.shape) > axis + 1:
        src = b.node("Reshape", [x.name, b.const(f"{layer.name}.shape", [0] * axis + [-1], np.int64)],
                     f"{layer.name}/flatten")
    y = b.node("MatMul", [src, matrix], layer.name, out=layer.outs[0] if bias is None else None)
    if bias:
        y = b.node("Add", [y, bias], f"{layer.name}/bias", out=layer.outs[0])
    return [_Value(y, out_shape)]


def _pooling(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.pooling_param
    x = layer.inputs[0]
    if len(x.shape) != 4:
        raise _Unsupported(f"a {len(x.shape)}-D input")
    if p.pool == caffe_pb2.PoolingParameter.STOCHASTIC:
        raise _Unsupported("pool: STOCHASTIC")
    is_max = p.pool == caffe_pb2.PoolingParameter.MAX
    if p.global_pooling:
        y = b.node("GlobalMaxPool" if is_max else "GlobalAveragePool", [x.name], layer.name, out=layer.outs[0])
        return [_Value(y, x.shape[:2] + [1, 1])]
    kernel = [p.kernel_h, p.kernel_w] if p.kernel_h or p.kernel_w else [p.kernel_size] * 2
    stride = [p.stride_h, p.stride_w] if p.stride_h or p.stride_w else [p.stride] * 2
    pad = [p.pad_h, p.pad_w] if p.pad_h or p.pad_w else [p.pad] * 2
    kernel, stride, pad = [int(v) for v in kernel], [int(v) for v in stride], [int(v) for v in pad]
    if not all(kernel):
        raise _Unsupported("no kernel_size")
    ceil = p.round_mode == caffe_pb2.PoolingParameter.CEIL
    out = []
    for n, k, s, q in zip(x.shape[2:], kernel, stride, pad):
        span = n + 2 * q - k
        o = (-(-span // s) if ceil else span // s) + 1
        if q and (o - 1) * s >= n + q:  # Caffe: the last window must start inside the image
            o -= 1
        out.append(o)
    attrs: Dict[str, Any] = dict(kernel_shape=kernel, strides=stride, pads=pad + pad, ceil_mode=int(ceil))
    if not is_max:
        attrs["count_include_pad"] = 1  # Caffe divides by the window clipped to the padded image
    y = b.node("MaxPool" if is_max else "AveragePool", [x.name], layer.name, out=layer.outs[0], **attrs)
    return [_Value(y, x.shape[:2] + out)]


def _unary(op: str, **attrs: Any) -> Callable[[_Builder, _Layer], List[_Value]]:
    def run(b: _Builder, layer: _Layer) -> List[_Value]:
        x = layer.inputs[0]
        return [_Value(b.node(op, [x.name], layer.name, out=layer.outs[0], **attrs), list(x.shape))]
    return run


def _relu(b: _Builder, layer: _Layer) -> List[_Value]:
    x = layer.inputs[0]
    slope = float(layer.param.relu_param.negative_slope)
    if slope:
        y = b.node("LeakyRelu", [x.name], layer.name, out=layer.outs[0], alpha=slope)
    else:
        y = b.node("Relu", [x.name], layer.name, out=layer.outs[0])
    return [_Value(y, list(x.shape))]


def _elu(b: _Builder, layer: _Layer) -> List[_Value]:
    return _unary("Elu", alpha=float(layer.param.elu_param.alpha))(b, layer)


def _prelu(b: _Builder, layer: _Layer) -> List[_Value]:
    x = layer.inputs[0]
    shapes = param_shapes("PReLU", layer.param, [x.shape])
    (slope,) = _check_count(layer, 1, shapes)
    slope = slope.reshape([-1] + [1] * (len(x.shape) - 2)) if slope.size > 1 else slope.reshape([1])
    y = b.node("PRelu", [x.name, b.const(f"{layer.name}.weight", slope)], layer.name, out=layer.outs[0])
    return [_Value(y, list(x.shape))]


def _power(b: _Builder, layer: _Layer) -> List[_Value]:
    """``(shift + scale * x) ** power``, leaving out the parts that are identities."""
    p = layer.param.power_param
    x = layer.inputs[0]
    steps = []
    if p.scale != 1.0:
        steps.append(("Mul", "scale", p.scale))
    if p.shift != 0.0:
        steps.append(("Add", "shift", p.shift))
    if p.power != 1.0:
        steps.append(("Pow", "power", p.power))
    if not steps:
        return [_Value(b.node("Identity", [x.name], layer.name, out=layer.outs[0]), list(x.shape))]
    y = x.name
    for i, (op, what, value) in enumerate(steps):
        last = i == len(steps) - 1
        y = b.node(op, [y, b.const(f"{layer.name}.{what}", np.float32(value))],
                   layer.name if last else f"{layer.name}/{what}", out=layer.outs[0] if last else None)
    return [_Value(y, list(x.shape))]


def _softmax(b: _Builder, layer: _Layer) -> List[_Value]:
    x = layer.inputs[0]
    axis = layer.param.softmax_param.axis % len(x.shape)
    return [_Value(b.node("Softmax", [x.name], layer.name, out=layer.outs[0], axis=axis), list(x.shape))]


def _lrn(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.lrn_param
    x = layer.inputs[0]
    size, alpha, beta = int(p.local_size), float(p.alpha), float(p.beta)
    if size % 2 == 0:
        raise _Unsupported(f"an even local_size ({size})")
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        y = b.node("LRN", [x.name], layer.name, out=layer.outs[0], size=size, alpha=alpha, beta=beta,
                   bias=float(p.k))
        return [_Value(y, list(x.shape))]
    # WITHIN_CHANNEL: x / (1 + alpha * mean of x^2 over a size x size window) ** beta (Caffe adds 1, not k)
    half = (size - 1) // 2
    sq = b.node("Mul", [x.name, x.name], f"{layer.name}/square")
    mean = b.node("AveragePool", [sq], f"{layer.name}/window", kernel_shape=[size, size], strides=[1, 1],
                  pads=[half] * 4, count_include_pad=1)
    scaled = b.node("Mul", [mean, b.const(f"{layer.name}.alpha", np.float32(alpha))], f"{layer.name}/alpha")
    shifted = b.node("Add", [scaled, b.const(f"{layer.name}.one", np.float32(1.0))], f"{layer.name}/shift")
    denom = b.node("Pow", [shifted, b.const(f"{layer.name}.beta", np.float32(-beta))], f"{layer.name}/power")
    y = b.node("Mul", [x.name, denom], layer.name, out=layer.outs[0])
    return [_Value(y, list(x.shape))]


def _batchnorm(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.batch_norm_param
    x = layer.inputs[0]
    if p.HasField("use_global_stats") and not p.use_global_stats:
        # Caffe would normalise each batch with its own statistics, even when deployed
        raise _Unsupported("use_global_stats: false (batch statistics at inference)")
    shapes = param_shapes("BatchNorm", layer.param, [x.shape])
    mean, var, factor = _check_count(layer, 3, shapes)
    # Caffe keeps running sums; the third blob is the normaliser (0 means: no statistics yet)
    s = float(factor.reshape(-1)[0])
    s = 0.0 if s == 0 else 1.0 / s
    c = mean.size
    inputs = [x.name, b.const(f"{layer.name}.weight", np.ones(c)), b.const(f"{layer.name}.bias", np.zeros(c)),
              b.const(f"{layer.name}.mean", mean * s), b.const(f"{layer.name}.var", var * s)]
    y = b.node("BatchNormalization", inputs, layer.name, out=layer.outs[0], epsilon=float(p.eps))
    b.bn_nodes[y] = b.nodes[-1]
    return [_Value(y, list(x.shape))]


def _broadcast(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """Per-axis parameters starting at ``axis``, shaped to broadcast against a rank-``rank`` blob."""
    return values.reshape(list(values.shape) + [1] * (rank - axis - values.ndim))


def _scale(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.scale_param
    x = layer.inputs[0]
    rank = len(x.shape)
    axis = p.axis % rank
    if len(layer.inputs) > 1:  # the scale is the second input
        s = layer.inputs[1]
        # 0 copies a dimension of s at run time: its batch may differ from the prototxt's
        shape = [0] * len(s.shape) + [1] * (rank - axis - len(s.shape))
        factor = b.node("Reshape", [s.name, b.const(f"{layer.name}.shape", shape, np.int64)],
                        f"{layer.name}/reshape")
        y = b.node("Mul", [x.name, factor], layer.name if not p.bias_term else f"{layer.name}/scale",
                   out=layer.outs[0] if not p.bias_term else None)
        if p.bias_term:
            (bias,) = _check_count(layer, 1, [s.shape])
            y = b.node("Add", [y, b.const(f"{layer.name}.bias", _broadcast(bias, axis, rank))], layer.name,
                       out=layer.outs[0])
        return [_Value(y, list(x.shape))]
    shapes = param_shapes("Scale", layer.param, [x.shape])
    blobs = _check_count(layer, len(shapes), shapes)
    gamma, beta = blobs[0], (blobs[1] if p.bias_term else None)
    bn = b.bn_nodes.get(x.name)
    if bn is not None and axis == 1 and gamma.ndim == 1 and layer.input_readers == 1:
        # BatchNorm followed by its Scale: one ONNX BatchNormalization whose scale and bias take the
        # Scale's in: (xhat * g + b) * gamma + beta, so that a second Scale composes with the first
        g, bias = b.inits.pop(bn.inputs[1]), b.inits.pop(bn.inputs[2])
        bn.inputs[1] = b.const(f"{layer.name}.weight", g * gamma)
        bn.inputs[2] = b.const(f"{layer.name}.bias", bias * gamma + (0.0 if beta is None else beta))
        bn.outputs[0] = layer.outs[0]
        del b.bn_nodes[x.name]
        b.bn_nodes[layer.outs[0]] = bn
        return [_Value(layer.outs[0], list(x.shape))]
    last = beta is None
    y = b.node("Mul", [x.name, b.const(f"{layer.name}.weight", _broadcast(gamma, axis, rank))],
               layer.name if last else f"{layer.name}/scale", out=layer.outs[0] if last else None)
    if beta is not None:
        y = b.node("Add", [y, b.const(f"{layer.name}.bias", _broadcast(beta, axis, rank))], layer.name,
                   out=layer.outs[0])
    return [_Value(y, list(x.shape))]


def _eltwise(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.eltwise_param
    xs = layer.inputs
    names = [x.name for x in xs]
    ops = {caffe_pb2.EltwiseParameter.SUM: "Add", caffe_pb2.EltwiseParameter.PROD: "Mul",
           caffe_pb2.EltwiseParameter.MAX: "Max"}
    op = ops[p.operation]
    if len(p.coeff):
        if op != "Add":
            raise _Unsupported("coeff with an operation other than SUM")
        if len(p.coeff) != len(xs):
            raise ConversionError(f"layer {layer.name!r}: {len(p.coeff)} coeff for {len(xs)} bottoms")
        scaled = []
        for i, (name, c) in enumerate(zip(names, p.coeff)):
            if c == 1.0:
                scaled.append(name)
            else:
                scaled.append(b.node("Mul", [name, b.const(f"{layer.name}.coeff{i}", np.float32(c))],
                                     f"{layer.name}/coeff{i}"))
        names = scaled
    y = names[0]
    for i, other in enumerate(names[1:]):
        last = i == len(names) - 2
        y = b.node(op, [y, other], layer.name if last else f"{layer.name}/{i}",
                   out=layer.outs[0] if last else None)
    if len(names) == 1:
        y = b.node("Identity", [y], layer.name, out=layer.outs[0])
    return [_Value(y, list(xs[0].shape))]


def _concat(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.concat_param
    rank = len(layer.inputs[0].shape)
    axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
    axis %= rank
    y = b.node("Concat", [x.name for x in layer.inputs], layer.name, out=layer.outs[0], axis=axis)
    shape = list(layer.inputs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in layer.inputs)
    return [_Value(y, shape)]


def _flatten(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.flatten_param
    x = layer.inputs[0]
    rank = len(x.shape)
    start, end = p.axis % rank, p.end_axis % rank
    merged = int(np.prod(x.shape[start:end + 1], dtype=np.int64))
    shape = list(x.shape[:start]) + [merged] + list(x.shape[end + 1:])
    if start == 1 and end == rank - 1:
        y = b.node("Flatten", [x.name], layer.name, out=layer.outs[0], axis=1)
    else:  # keep the leading axes (0: copy, so the batch stays free), merge, keep the trailing ones
        target = [0] * start + [-1] + list(x.shape[end + 1:])
        y = b.node("Reshape", [x.name, b.const(f"{layer.name}.shape", target, np.int64)], layer.name,
                   out=layer.outs[0])
    return [_Value(y, shape)]


def _reshape(b: _Builder, layer: _Layer) -> List[_Value]:
    p = layer.param.reshape_param
    x = layer.inputs[0]
    rank = len(x.shape)
    spec = [int(d) for d in p.shape.dim]
    start = p.axis if p.axis >= 0 else rank + 1 + p.axis
    end = rank if p.num_axes == -1 else start + p.num_axes
    if not 0 <= start <= end <= rank:
        raise ConversionError(f"layer {layer.name!r}: reshape axis {p.axis} / num_axes {p.num_axes} "
                              f"out of range for a {rank}-D blob")
    # Caffe's 0 copies the input axis at the same position inside the reshaped range
    target = [0] * start + spec + list(x.shape[end:])
    shape = list(x.shape[:start]) + [x.shape[start + i] if d == 0 else d for i, d in enumerate(spec)] + list(
        x.shape[end:])
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        shape[shape.index(-1)] = int(np.prod(x.shape, dtype=np.int64)) // max(known, 1)
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(x.shape, dtype=np.int64)):
        raise ConversionError(f"layer {layer.name!r}: cannot reshape {x.shape} to {shape}")
    y = b.node("Reshape", [x.name, b.const(f"{layer.name}.shape", target, np.int64)], layer.name,
               out=layer.outs[0])
    return [_Value(y, shape)]


_LAYERS: Dict[str, Callable[[_Builder, _Layer], List[_Value]]] = {
    "Convolution": _convolution, "Deconvolution": _convolution, "InnerProduct": _inner_product,
    "Pooling": _pooling, "ReLU": _relu, "PReLU": _prelu, "ELU": _elu, "Sigmoid": _unary("Sigmoid"),
    "TanH": _unary("Tanh"), "AbsVal": _unary("Abs"), "BNLL": _unary("Softplus"), "Power": _power,
    "Softmax": _softmax, "LRN": _lrn, "BatchNorm": _batchnorm, "Scale": _scale, "Eltwise": _eltwise,
    "Concat": _concat, "Flatten": _flatten, "Reshape": _reshape,
}
_ALIASES = {"Dropout", "Split"}  # their tops are their bottom at inference time
_IGNORED = {"Silence"}
_TRAINING = {"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "SoftmaxWithLoss",
             "EuclideanLoss", "HingeLoss", "SigmoidCrossEntropyLoss", "InfogainLoss", "ContrastiveLoss",
             "MultinomialLogisticLoss", "Accuracy", "HDF5Output"}


# ---------------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------------


def _included(layer) -> bool:
    """Whether a layer belongs to the TEST-phase (deploy) network."""
    def meets(rule) -> bool:
        if rule.HasField("phase") and rule.phase != caffe_pb2.TEST:
            return False
        return not rule.stage  # the deploy state has no stages
    if layer.include:
        return any(meets(r) for r in layer.include)
    if layer.HasField("phase") and layer.phase != caffe_pb2.TEST:
        return False
    return not any(meets(r) for r in layer.exclude)


def _net_inputs(net) -> List[Tuple[str, Shape]]:
    """Net-level inputs (``input`` + ``input_shape`` or 4 ``input_dim`` values each)."""
    inputs = []
    for i, name in enumerate(net.input):
        if i < len(net.input_shape):
            shape = [int(d) for d in net.input_shape[i].dim]
        elif len(net.input_dim) >= 4 * (i + 1):
            shape = [int(d) for d in net.input_dim[4 * i:4 * i + 4]]
        else:
            raise ConversionError(f"net input {name!r} has no input_shape or input_dim")
        check_shape(shape, f"net input {name!r}")
        inputs.append((name, shape))
    return inputs


class _Converter:
    """Walks the deploy network once, translating each layer (or, with ``weights=None``, only
    inferring shapes and recording each layer's parameter-blob shapes)."""

    def __init__(self, net, weights: Optional[Dict[str, List[np.ndarray]]], where: str,
                 strict_error: Optional[str] = None):
        self.net = net
        self.weights = weights
        self.where = where
        self.strict_error = strict_error
        self.param_shapes: Dict[str, List[Tuple[int, ...]]] = {}

    def run(self) -> Model:
        net = self.net
        layers = [l for l in net.layer if _included(l)]
        problems, kinds = [], []
        for layer in layers:
            kind = layer.type
            if kind in _LAYERS or kind in _ALIASES or kind in _IGNORED or kind == "Input":
                continue
            hint = " (a training layer: convert the deploy prototxt)" if kind in _TRAINING else ""
            problems.append(f"{kind} {layer.name!r}{hint}")
            kinds.append(kind)
        if problems:
            raise UnsupportedOperatorError(f"{self.where}: unsupported Caffe layer(s): {'; '.join(problems)}",
                                           sorted(set(kinds)))
        if self.strict_error:
            raise ConversionError(f"{self.where}: {self.strict_error} (a field dcrt's caffe.proto does not "
                                  "declare: Caffe forks add their own)")

        b = _Builder()
        # SSA names: the last definition of a blob keeps its name
        last_def: Dict[str, int] = {}
        inputs = _net_inputs(net)
        for name, _ in inputs:
            last_def[name] = -1
        for i, layer in enumerate(layers):
            for top in layer.top:
                last_def[top] = i
        b.used.update(last_def)
        # an input keeps its name: a layer writing its blob in place (preprocessing) gets a fresh one
        input_names = {name for name, _ in inputs} | {t for layer in layers if layer.type == "Input" for t in layer.top}
        # how many layers read each blob version (Scale merges into a BatchNorm read by it alone)
        readers: Dict[Tuple[str, int], int] = {}
        current: Dict[str, int] = {name: -1 for name, _ in inputs}
        for i, layer in enumerate(layers):
            for bottom in layer.bottom:
                if bottom in current:
                    key = (bottom, current[bottom])
                    readers[key] = readers.get(key, 0) + 1
            for top in layer.top:
                current[top] = i

        values: Dict[str, _Value] = {}
        graph_inputs: List[ValueInfo] = []
        available: Dict[str, None] = {}
        version: Dict[str, int] = {}
        for name, shape in inputs:
            values[name] = _Value(name, shape)
            graph_inputs.append(ValueInfo(name, np.float32, ["batch"] + shape[1:]))
            version[name] = -1

        problems = []
        for i, layer in enumerate(layers):
            missing = [x for x in layer.bottom if x not in values]
            if missing:
                # Caffe runs layers in file order, so reading a later layer's top is the only way to loop
                later = [x for x in missing if x in last_def]
                why = (f" ({', '.join(later)} only written by a later layer: a cycle, or layers out of order)"
                       if later else "")
                raise ConversionError(f"{self.where}: layer {layer.name!r} reads blob(s) {', '.join(missing)} "
                                      f"that no earlier layer writes{why}; the prototxt is damaged or incomplete")
            ins = [values[x] for x in layer.bottom]
            for x in layer.bottom:
                available.pop(x, None)
            kind = layer.type
            if kind == "Input":
                shapes = [list(s.dim) for s in layer.input_param.shape]
                if not shapes:
                    raise ConversionError(f"{self.where}: Input layer {layer.name!r} gives no shape")
                for j, top in enumerate(layer.top):
                    shape = [int(d) for d in shapes[j if len(shapes) > 1 else 0]]
                    check_shape(shape, f"{self.where}: Input layer {layer.name!r}")
                    values[top] = _Value(top, shape)
                    graph_inputs.append(ValueInfo(top, np.float32, ["batch"] + shape[1:]))
                    version[top] = i
                    available[top] = None
                continue
            if kind in _IGNORED:
                continue
            if kind in _ALIASES:
                if list(layer.top) != list(layer.bottom[:1]):   # other names for a BatchNorm's output: other
                    b.bn_nodes.pop(ins[0].name, None)           # readers a Scale merged into it would miss
                for top in layer.top:
                    values[top] = ins[0]
                    version[top] = i
                    available[top] = None
                continue
            zero = _zero_params(layer)
            if zero:
                raise ConversionError(f"{self.where}: layer {layer.name!r} ({kind}) has {', '.join(zero)} 0; "
                                      "Caffe requires at least 1: the prototxt is damaged")
            outs = [top if last_def[top] == i and top not in input_names else b.fresh(f"{top}/{layer.name}")
                    for top in layer.top]
            in_shapes = [x.shape for x in ins]
            try:
                expected = [tuple(s) for s in param_shapes(kind, layer, in_shapes)]
            except _Unsupported as e:
                problems.append(f"{kind} {layer.name!r} ({e})")
                continue
            if self.weights is None:
                self.param_shapes[layer.name] = expected
                blobs = [np.zeros(s, dtype=np.float32) for s in expected]
            else:
                blobs = self.weights.get(layer.name, [])
                if expected and not blobs:
                    known = ", ".join(sorted(self.weights)[:8]) + (" ..." if len(self.weights) > 8 else "")
                    raise ConversionError(f"{self.where}: layer {layer.name!r} ({kind}) has no weights in the "
                                          f"caffemodel (layers are matched by name; it has weights for: "
                                          f"{known or 'no layer'}): give the caffemodel trained with this "
                                          "prototxt, complete and undamaged")
            item = _Layer(layer, ins, blobs, outs)
            if layer.bottom:
                item.input_readers = readers.get((layer.bottom[0], version.get(layer.bottom[0], -1)), 0)
            try:
                results = _LAYERS[kind](b, item)
            except _Unsupported as e:
                problems.append(f"{kind} {layer.name!r} ({e})")
                continue
            except ConversionError as e:  # name the file too
                if type(e) is not ConversionError:
                    raise
                raise ConversionError(f"{self.where}: {e}") from None
            for top, value in zip(layer.top, results):
                values[top] = value
                version[top] = i
                available[top] = None
        if problems:
            raise UnsupportedOperatorError(
                f"{self.where}: unsupported Caffe layer setting(s): {'; '.join(problems)}",
                sorted({p.split(' ')[0] for p in problems}))

        outputs: List[ValueInfo] = []
        input_names = {v.name for v in graph_inputs}
        for blob in available:
            value = values[blob]
            name = value.name
            if name != blob and blob not in input_names:  # an alias (Dropout) ends the net
                name = b.node("Identity", [value.name], f"{blob}/output", out=blob)
            outputs.append(ValueInfo(name, np.float32, ["batch"] + list(value.shape[1:])))
        if not outputs:
            raise ConversionError(f"{self.where}: the network has no output blob")
        graph = Graph(b.nodes, graph_inputs, outputs, b.inits, net.name)
        return Model(graph, {"": OPSET}, {"source_format": "caffe"})


def blob_shapes(net) -> Dict[str, List[Tuple[int, ...]]]:
    """The weight-blob shapes of each layer of a network definition (what a caffemodel must hold)."""
    conv = _Converter(net, None, net.name or "network")
    conv.run()
    return conv.param_shapes


def from_caffe(prototxt_path: str, caffemodel_path: str) -> Model:
    """Translate a Caffe network definition and its trained weights into the dcrt IR."""
    if not os.path.exists(prototxt_path):
        raise ConversionError(f"{prototxt_path}: no such file")
    try:
        net, strict_error = _parse_prototxt(prototxt_path)
    except ConversionError as e:
        raise ConversionError(f"{prototxt_path}: {e}") from None
    trained = _read_weights(caffemodel_path)
    weights: Dict[str, List[np.ndarray]] = {}
    for layer in list(trained.layer) + list(trained.layers):  # V1 caffemodels: `layers`
        if layer.blobs and layer.name not in weights:
            weights[layer.name] = [_blob_array(blob) for blob in layer.blobs]
    model = _Converter(net, weights, prototxt_path, strict_error).run()
    model.metadata["caffemodel"] = os.path.basename(caffemodel_path)
    return model
