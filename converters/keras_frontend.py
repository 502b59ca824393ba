"""Keras frontend: a ``.h5`` / ``.hdf5`` / ``.keras`` file to dcrt's graph IR, with h5py and json only.

Two containers are read, neither of them through Keras or TensorFlow:

* ``.h5`` (Keras 2 / tf.keras, and Keras 3's legacy HDF5 save): the ``model_config`` attribute holds
  the architecture as JSON; ``model_weights/<layer>`` groups hold each layer's weights in the order
  their ``weight_names`` attribute lists.
* ``.keras`` (Keras 3 zip): ``config.json`` holds the architecture; ``model.weights.h5`` holds each
  layer's variables under ``layers/<snake_case class name>[_<n>]/vars/<i>``, numbered in the order
  of ``model.layers`` (how Keras names them when saving; the layer's own name is not used there).

Nothing in the file is ever executed: ``Lambda`` layers (marshalled Python bytecode) and custom
layers are refused by name, all unsupported layers of a model in one
:class:`~dcrt.errors.UnsupportedOperatorError`.

The IR has ONNX semantics (NCHW). A Keras tensor is channels-last, so the IR may hold it transposed:
each Keras tensor keeps the IR values that hold it under given axis permutations, and a Transpose is
emitted only when an operator needs a layout not available yet. The model's inputs and outputs keep
Keras's own layout (NHWC), so users feed the arrays they fed Keras. Weights are transposed here, at
conversion time (HWIO -> OIHW, Dense kernels to ``[out, in]``, LSTM gates reordered).

Supported layers: InputLayer, Dense, Conv1D/2D/3D (strides, same/valid padding, dilation, groups),
DepthwiseConv1D/2D, SeparableConv1D/2D, Conv1D/2D/3DTranspose, Max/AveragePooling1D/2D/3D,
GlobalAverage/GlobalMaxPooling1D/2D/3D, BatchNormalization, Activation (relu, sigmoid, tanh,
softmax, log_softmax, leaky_relu, linear, elu, selu, softplus, softsign, swish/silu, hard_sigmoid,
relu6, exponential), ReLU, LeakyReLU, ELU, Softmax, Add, Subtract, Multiply, Average, Maximum,
Minimum, Concatenate, Flatten, Reshape, Permute, RepeatVector, Dropout (and the other
inference-time no-ops: SpatialDropout, GaussianNoise, GaussianDropout, AlphaDropout,
ActivityRegularization), Embedding, LSTM, GRU, SimpleRNN, UpSampling1D/2D, ZeroPadding1D/2D,
Cropping1D/2D, Rescaling.
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dcrt.errors import ConversionError, UnsupportedOperatorError
from dcrt.graph import Graph, Model, ValueInfo

from .builder import GraphBuilder
from .passes import check_shape

try:
    import h5py
except ImportError as e:  # pragma: no cover - the [convert] extra is missing
    raise ConversionError("converting Keras models needs the h5py package: pip install 'dcrt[convert]'") from e

Shape = List[Optional[int]]
Perm = Tuple[int, ...]
OPSET = 17

# ---------------------------------------------------------------------------------------------------
# reading the file
# ---------------------------------------------------------------------------------------------------


def _snake(name: str) -> str:
    """Keras's ``to_snake_case``: the prefix of a layer's path in ``model.weights.h5``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


#: A weight array larger than this (4 GB) is a damaged file, not an edge model.
MAX_WEIGHT_BYTES = 1 << 32


def _read(ds: "h5py.Dataset") -> np.ndarray:
    """A dataset's values, refusing before allocating one whose shape the stored bytes cannot back (HDF5
    fills an unwritten dataset of any declared size with zeros)."""
    if not isinstance(ds, h5py.Dataset):
        raise ConversionError(f"{ds.name} is a group where a weight array is expected: the file is damaged")
    if ds.external or ds.is_virtual:  # values read from other files: any file this process can read
        raise ConversionError(f"weight {ds.name} keeps its values in other files (HDF5 external or virtual "
                              "storage); dcrt reads weights from the model file only: save the model again")
    stored = ds.id.get_storage_size()
    if ds.nbytes > MAX_WEIGHT_BYTES or (ds.nbytes and not stored and ds.compression is None):
        raise ConversionError(f"weight {ds.name} declares shape {list(ds.shape)} ({ds.nbytes} bytes) but the file "
                              f"stores {stored} bytes for it: the file is damaged; save the model again")
    return np.array(ds)


def _group_arrays(group: "h5py.Group") -> List[np.ndarray]:
    """A ``.keras`` layer group's variables: its own ``vars/0..n``, then its children's (an RNN's
    ``cell``), depth first in name order."""
    arrays: List[np.ndarray] = []
    if "vars" in group:
        vars_ = group["vars"]
        arrays += [_read(vars_[k]) for k in sorted(vars_, key=lambda k: int(k) if k.isdigit() else 1 << 30)]
    for key in sorted(group):
        if key != "vars" and isinstance(group[key], h5py.Group):
            arrays += _group_arrays(group[key])
    return arrays


class _Source:
    """The architecture (a Keras config dict) and the weights of one model file."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise ConversionError(f"{path}: no such file")
        self._zip: Optional[zipfile.ZipFile] = None
        self._h5: Optional[h5py.File] = None
        self._paths: Dict[str, str] = {}
        try:
            if zipfile.is_zipfile(path):
                self._open_keras_zip()
            else:
                with open(path, "rb") as f:
                    if f.read(4) == b"PK\x03\x04":  # a zip whose end (its directory) is cut off
                        raise ConversionError(f"{path} is a truncated or damaged zip (.keras) file: copy or "
                                              "save it again")
                self._open_h5()
        except ConversionError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise ConversionError(f"{path} is not a readable Keras model ({type(e).__name__}: {e})") from None

    def _open_keras_zip(self) -> None:
        self._zip = zipfile.ZipFile(self.path)
        names = set(self._zip.namelist())
        for info in self._zip.infolist():  # a zip bomb would be inflated into memory below
            if info.file_size > max(100 * info.compress_size, 1 << 30):
                raise ConversionError(f"{self.path}: {info.filename} claims {info.file_size} bytes from "
                                      f"{info.compress_size} compressed: a damaged or hostile file")
        if "config.json" not in names:
            raise ConversionError(f"{self.path} is a zip file without config.json: not a Keras 3 .keras model")
        self.config = self._json(self._zip.read("config.json"), "config.json")
        meta = self._json(self._zip.read("metadata.json"), "metadata.json") if "metadata.json" in names else {}
        self.keras_version = str(meta.get("keras_version", "3"))
        if "model.weights.h5" not in names:
            raise ConversionError(f"{self.path} holds no model.weights.h5 (sharded or npz weights are not "
                                  "supported); save it again with model.save('model.keras')")
        self._h5 = h5py.File(io.BytesIO(self._zip.read("model.weights.h5")), "r")
        self.kind = "keras"

    def _open_h5(self) -> None:
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise ConversionError(f"{self.path} is neither an HDF5 (.h5) nor a zip (.keras) Keras model, or it "
                                  f"is truncated ({e})") from None
        attrs = self._h5.attrs
        if "model_config" not in attrs:
            if "layer_names" in attrs:
                raise ConversionError(f"{self.path} holds weights only (model.save_weights); save the whole "
                                      "model with model.save('model.h5') or model.save('model.keras')")
            raise ConversionError(f"{self.path} is an HDF5 file without a Keras model_config attribute")
        self.config = self._json(_text(attrs["model_config"]), "model_config")
        self.keras_version = _text(attrs.get("keras_version", "2"))
        if "model_weights" not in self._h5:
            raise ConversionError(f"{self.path} has a model_config but no model_weights group")
        self.kind = "h5"

    def _json(self, text: "str | bytes", what: str) -> Any:
        try:
            value = json.loads(text)
        except RecursionError:  # json recurses per nesting level
            raise ConversionError(f"{self.path}: {what} is nested too deeply to be a Keras model: the file is "
                                  "damaged") from None
        except ValueError as e:
            raise ConversionError(f"{self.path}: {what} is not valid JSON ({e}): the file is damaged") from None
        if not isinstance(value, dict):
            raise ConversionError(f"{self.path}: {what} is not a JSON object: the file is damaged")
        return value

    @property
    def keras_major(self) -> int:
        try:
            return int(self.keras_version.split(".")[0])
        except ValueError:
            return 2

    def bind(self, layers: Sequence[dict]) -> None:
        """Number the layers as Keras does in ``model.weights.h5`` (class name, then a counter)."""
        used: Dict[str, int] = {}
        for layer in layers:
            base = _snake(layer["class_name"])
            if base in used:
                used[base] += 1
                self._paths[_layer_name(layer)] = f"layers/{base}_{used[base]}"
            else:
                used[base] = 0
                self._paths[_layer_name(layer)] = f"layers/{base}"

    def weights(self, name: str) -> List[np.ndarray]:
        """The weights of layer ``name``, in the layer's own order (kernel, bias, ...)."""
        assert self._h5 is not None
        if self.kind == "keras":
            path = self._paths.get(name)
            if path is None or path not in self._h5:
                return []
            return _group_arrays(self._h5[path])
        group = self._h5["model_weights"]
        if name not in group:
            return []
        layer = group[name]
        out = []
        for wname in layer.attrs.get("weight_names", []):
            wname = _text(wname)
            if wname not in layer:
                raise ConversionError(f"{self.path}: weight {wname!r} of layer {name!r} is missing: the file is "
                                      "damaged; save the model again")
            out.append(_read(layer[wname]))
        return out

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
        if self._zip is not None:
            self._zip.close()


# ---------------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------------


def _layer_name(layer: dict) -> str:
    return str(layer.get("name") or (layer.get("config") or {}).get("name") or "")


def _ints(value: Any, n: int) -> List[int]:
    """A Keras size argument (int, list, or serialized tuple) as ``n`` ints."""
    if isinstance(value, dict):
        value = value.get("items", value.get("config", value))
    if isinstance(value, (int, float)):
        return [int(value)] * n
    return [int(v) for v in value]


def _activation_name(value: Any) -> Optional[str]:
    """A serialized activation as its name, or None when it is not a built-in one."""
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        module = str(value.get("module") or "keras.activations")
        inner = value.get("config")
        builtin = module.startswith("keras")
        if builtin and isinstance(inner, str) and value.get("class_name") in ("function", None):
            return inner
        if builtin and isinstance(inner, dict) and isinstance(inner.get("name"), str):
            return inner["name"]
    return None


def _is_ref(value: Any) -> bool:
    """A Keras 2 tensor reference ``[layer_name, node_index, tensor_index(, kwargs)]``."""
    return (isinstance(value, list) and 3 <= len(value) <= 4 and isinstance(value[0], str)
            and isinstance(value[1], int) and isinstance(value[2], int))


def _refs(value: Any) -> List[Tuple[str, int, int]]:
    """Every tensor reference in a config structure (input_layers, a node's args), in order."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            hist = value["config"]["keras_history"]
            return [(str(hist[0]), int(hist[1]), int(hist[2]))]
        return [r for v in value.values() for r in _refs(v)]
    if _is_ref(value):
        return [(value[0], value[1], value[2])]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _refs(v)]
    return []


def _calls(layer: dict) -> List[Tuple[List[Tuple[str, int, int]], bool]]:
    """Each call of a functional layer: (input tensor references, called with tensor kwargs)."""
    calls = []
    for node in layer.get("inbound_nodes") or []:
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            calls.append((_refs(node.get("args", [])), bool(_refs(node.get("kwargs", {})))))
        elif _is_ref(node):  # a single flat reference
            calls.append(([(node[0], node[1], node[2])], False))
        else:  # Keras 2: [[name, node, tensor, kwargs], ...]
            entries = [e for e in node if _is_ref(e)]
            extra = any(_refs(e[3]) for e in entries if len(e) > 3 and isinstance(e[3], dict))
            calls.append(([(e[0], e[1], e[2]) for e in entries], extra))
    return calls


def _input_shape(cfg: dict) -> Optional[list]:
    for key in ("batch_shape", "batch_input_shape"):
        shape = cfg.get(key)
        if isinstance(shape, dict):
            shape = shape.get("items")
        if shape is not None:
            return list(shape)
    if cfg.get("shape") is not None:  # some Keras 3 versions store the shape without the batch
        return [None] + list(cfg["shape"])
    return None


def _dtype_name(value: Any) -> str:
    if isinstance(value, dict):  # Keras 3 DTypePolicy
        value = (value.get("config") or {}).get("name", "float32")
    value = str(value or "float32")
    return value.split("_")[-1] if value.startswith("mixed_") else value


# ---------------------------------------------------------------------------------------------------
# the graph being built
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    """A Keras tensor as the IR holds it: ``views[perm]`` is an IR value equal to
    ``np.transpose(keras_tensor, perm)``; the first view is the one its producer wrote."""

    shape: Shape
    dtype: np.dtype
    views: Dict[Perm, str] = field(default_factory=dict)
    base: str = ""  # the name new views are derived from

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def primary(self) -> Tuple[Perm, str]:
        perm = next(iter(self.views))
        return perm, self.views[perm]


def _identity(rank: int) -> Perm:
    return tuple(range(rank))


def _channels_first(rank: int, axis: int) -> Perm:
    """The permutation that moves ``axis`` to position 1 (ONNX's channel axis), keeping the rest."""
    return (0, axis) + tuple(a for a in range(1, rank) if a != axis)


def _inverse(perm: Perm) -> Perm:
    return tuple(int(i) for i in np.argsort(perm))


class _Builder(GraphBuilder):
    """The graph builder, plus Keras's shared weights and layout views."""

    def weight(self, name: str, value: Callable[[], np.ndarray]) -> str:
        """An initializer, created once (a shared layer reuses its weights)."""
        if name not in self.inits:
            self.used.add(name)
            self.inits[name] = np.ascontiguousarray(value())
        return name

    def node(self, op: str, inputs: List[str], name: str, out: Optional[str] = None, nout: int = 1,
             **attrs: Any) -> Any:
        """Add a node named after ``name``; returns its output value's name (a list when ``nout > 1``).

        The output is named ``out`` (default: the node's name), made unique.
        """
        node_name = self.node_name(name)
        base = out or node_name
        outputs = [self.fresh(base)] + [self.fresh(f"{base}:{i}") for i in range(1, nout)]
        self.append(op, inputs, outputs, node_name, attrs)
        return outputs[0] if nout == 1 else outputs

    def view(self, t: _Tensor, perm: Perm) -> str:
        """The IR value holding ``t`` transposed by ``perm``, emitting a Transpose if needed."""
        perm = tuple(perm)
        if perm in t.views:
            return t.views[perm]
        src_perm, src = t.primary
        # out[j] = keras axis perm[j] = src axis src_perm.index(perm[j])
        step = [src_perm.index(a) for a in perm]
        suffix = {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(step), "perm" + "".join(map(str, step)))
        name = self.node("Transpose", [src], f"{t.base}.{suffix}", out=f"{t.base}.{suffix}", perm=step)
        t.views[perm] = name
        return name


class _Unsupported(Exception):
    """A layer option dcrt cannot translate (collected, then reported with the other problems)."""


# ---------------------------------------------------------------------------------------------------
# layer translations: fn(builder, node name, layer config, input tensors, layer weights, ctx) -> the
# layer's output tensors. Node and value names follow the node name (the layer's name, or
# "<layer>_call<n>" for a shared layer's later calls); weights follow ctx.layer.
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    keras_major: int
    layer: str = ""  # the Keras layer being translated: its weights are named after it
    module: str = ""  # its module: keras.layers' merge layers and keras.ops' arithmetic share class names


def _spatial_perm(rank: int, cfg: dict) -> Perm:
    """The permutation giving the NC... (ONNX) view of a ``data_format`` layer's input."""
    if cfg.get("data_format", "channels_last") == "channels_first":
        return _identity(rank)
    return _channels_first(rank, rank - 1)


def _spatial_input(b: _Builder, x: _Tensor, cfg: dict) -> Tuple[Perm, str, Shape]:
    """``(perm, value, shape)``: ``x`` as ONNX's NC... layout for a ``data_format`` layer."""
    perm = _spatial_perm(x.rank, cfg)
    return perm, b.view(x, perm), [x.shape[a] for a in perm]


def _as_float32(b: _Builder, t: _Tensor) -> _Tensor:
    """``t`` itself when float32, else cast to float32 (from the view its producer wrote)."""
    if t.dtype == np.float32:
        return t
    perm, src = t.primary
    name = b.node("Cast", [src], f"{t.base}/float", out=f"{t.base}/float", to=1)
    return _out_tensor(t.shape, np.float32, perm, name, f"{t.base}/float")


def _out_tensor(shape: Shape, dtype: Any, perm: Perm, name: str, base: str) -> _Tensor:
    t = _Tensor(list(shape), np.dtype(dtype), base=base)
    t.views[tuple(perm)] = name
    return t


def _keras_shape(nc_shape: Shape, perm: Perm) -> Shape:
    """Keras shape from the shape of the view ``perm``."""
    inv = _inverse(perm)
    return [nc_shape[i] for i in inv]


def _same_pads(sizes: Shape, kernel: List[int], strides: List[int],
               dilations: List[int]) -> Optional[List[int]]:
    """TensorFlow's 'same' padding as explicit ONNX pads (the odd pixel at the end), or None when
    it depends on an unknown input size (then SAME_UPPER does the same at run time)."""
    begin, end = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        span = (k - 1) * d + 1
        if s == 1:
            total = span - 1
        elif n is None:
            return None
        else:
            total = max((-(-n // s) - 1) * s + span - n, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return begin + end


def _conv_out(n: Optional[int], k: int, s: int, d: int, padding: str) -> Optional[int]:
    if n is None:
        return None
    if padding == "same":
        return -(-n // s)
    return (n - (k - 1) * d - 1) // s + 1


def _padding_attrs(padding: str, sizes: Shape, kernel, strides, dilations) -> Dict[str, Any]:
    if padding == "valid":
        return {}
    if padding != "same":
        raise _Unsupported(f"padding={padding!r}")
    pads = _same_pads(sizes, kernel, strides, dilations)
    return {"pads": pads} if pads is not None else {"auto_pad": "SAME_UPPER"}


def _weight_inputs(b: _Builder, ctx: _Ctx, weight: np.ndarray, bias: Optional[np.ndarray],
                   weight_name: Optional[str] = None) -> List[str]:
    """The float32 initializers of a layer's weight (already in ONNX layout) and of its bias, if any."""
    names = [b.weight(weight_name or f"{ctx.layer}.weight", lambda: weight.astype(np.float32))]
    if bias is not None:
        names.append(b.weight(f"{ctx.layer}.bias", lambda: bias.astype(np.float32)))
    return names


def _fused_activation(act: Optional[str]) -> bool:
    """Whether a layer's ``activation`` adds a node after its own (anything but linear)."""
    return act is not None and act.lower() != "linear"


def _apply_activation(b: _Builder, act: Optional[str], x: str, name: str, ctx: _Ctx, axis: int = 1,
                      final: Optional[str] = None, own: bool = False) -> str:
    """Append the activation ``act`` (a Keras name) to IR value ``x``; ``axis`` is softmax's axis.

    The node is ``name/act`` (a layer's fused activation) or ``name`` when ``own`` (an Activation layer).
    """
    act = (act or "linear").lower()
    if act == "linear":
        return x
    out = final if final is not None else f"{name}.{act}"
    node = name if own else f"{name}/{act}"
    simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus",
              "softsign": "Softsign", "exponential": "Exp"}
    if act in simple:
        return b.node(simple[act], [x], node, out=out)
    if act in ("softmax", "log_softmax"):
        return b.node("Softmax" if act == "softmax" else "LogSoftmax", [x], node, out=out, axis=axis)
    if act == "leaky_relu":
        return b.node("LeakyRelu", [x], node, out=out, alpha=0.2)  # Keras 3's default slope
    if act == "elu":
        return b.node("Elu", [x], node, out=out, alpha=1.0)
    if act == "selu":  # Keras's constants (ONNX's defaults are the same to float32 precision)
        return b.node("Selu", [x], node, out=out, alpha=1.6732632423543772, gamma=1.0507009873554805)
    if act == "hard_sigmoid":
        slope = 1.0 / 6.0 if ctx.keras_major >= 3 else 0.2
        return b.node("HardSigmoid", [x], node, out=out, alpha=slope, beta=0.5)
    if act == "relu6":
        return b.node("Clip", [x, b.const(f"{name}.min", 0.0), b.const(f"{name}.max", 6.0)], node, out=out)
    if act in ("swish", "silu"):
        gate = b.node("Sigmoid", [x], f"{node}.sigmoid")
        return b.node("Mul", [x, gate], node, out=out)
    raise _Unsupported(f"activation {act!r}")


ACTIVATIONS = {"linear", "relu", "sigmoid", "tanh", "softplus", "softsign", "exponential", "softmax",
               "log_softmax", "leaky_relu", "elu", "selu", "hard_sigmoid", "relu6", "swish", "silu"}


def _bias(w: List[np.ndarray], cfg: dict, index: int) -> Optional[np.ndarray]:
    return w[index] if cfg.get("use_bias", True) and len(w) > index else None


def _conv_like(b: _Builder, name: str, cfg: dict, x: _Tensor, kernel_oi: np.ndarray, bias: Optional[np.ndarray],
               group: int, ctx: _Ctx, weight_name: Optional[str] = None, apply_act: bool = True,
               node_name: Optional[str] = None) -> _Tensor:
    """An ONNX Conv over ``x`` with weights already in ``[out, in/group, *k]`` layout."""
    dims = x.rank - 2
    perm, xin, nc_in = _spatial_input(b, x, cfg)
    kernel = list(kernel_oi.shape[2:])
    strides = _ints(cfg.get("strides", 1), dims)
    dil = _ints(cfg.get("dilation_rate", 1), dims)
    padding = str(cfg.get("padding", "valid")).lower()
    if any(s > 1 for s in strides) and any(d > 1 for d in dil):
        raise _Unsupported("strides > 1 together with dilation_rate > 1")
    attrs = _padding_attrs(padding, nc_in[2:], kernel, strides, dil)
    inputs = [xin] + _weight_inputs(b, ctx, kernel_oi, bias, weight_name)
    act = _activation_name(cfg.get("activation")) if apply_act else "linear"
    has_act = _fused_activation(act)
    y = b.node("Conv", inputs, node_name or name, out=(node_name or name) + (".conv" if has_act else ""),
               kernel_shape=kernel, strides=strides, dilations=dil, group=group, **attrs)
    if has_act:     # a softmax over Keras's last axis: channels (axis 1 here) unless channels_first
        y = _apply_activation(b, act, y, name, ctx, axis=perm.index(x.rank - 1), final=node_name or name)
    out_nc = [nc_in[0], kernel_oi.shape[0]] + [_conv_out(n, k, s, d, padding)
                                               for n, k, s, d in zip(nc_in[2:], kernel, strides, dil)]
    return _out_tensor(_keras_shape(out_nc, perm), np.float32, perm, y, name)


def _hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    dims = kernel.ndim - 2
    return kernel.transpose((dims + 1, dims) + tuple(range(dims)))


def _conv(b, name, cfg, ins, w, ctx):
    x = ins[0]
    group = int(cfg.get("groups", 1) or 1)
    return [_conv_like(b, name, cfg, x, _hwio_to_oihw(w[0]), _bias(w, cfg, 1), group, ctx)]


def _depthwise_kernel(kernel: np.ndarray) -> np.ndarray:
    """``[*k, in, multiplier]`` -> ``[in * multiplier, 1, *k]`` (output channel c*m + j)."""
    dims = kernel.ndim - 2
    cin, mult = kernel.shape[-2:]
    moved = kernel.transpose((dims, dims + 1) + tuple(range(dims)))
    return moved.reshape((cin * mult, 1) + kernel.shape[:dims])


def _depthwise(b, name, cfg, ins, w, ctx):
    x = ins[0]
    k = _depthwise_kernel(w[0])
    cin = w[0].shape[-2]
    return [_conv_like(b, name, cfg, x, k, _bias(w, cfg, 1), cin, ctx)]


def _separable(b, name, cfg, ins, w, ctx):
    x = ins[0]
    cin = w[0].shape[-2]
    depth = _conv_like(b, name, cfg, x, _depthwise_kernel(w[0]), None, cin, ctx,
                       weight_name=f"{ctx.layer}.depthwise.weight", apply_act=False,
                       node_name=f"{name}.depthwise")
    point_cfg = dict(cfg, strides=1, dilation_rate=1, padding="valid")
    return [_conv_like(b, name, point_cfg, depth, _hwio_to_oihw(w[1]), _bias(w, cfg, 2), 1, ctx)]


def _conv_transpose(b, name, cfg, ins, w, ctx):
    x = ins[0]
    dims = x.rank - 2
    perm, xin, nc_in = _spatial_input(b, x, cfg)
    kernel = w[0]  # [*k, out, in]
    weight = kernel.transpose((dims + 1, dims) + tuple(range(dims)))  # [in, out, *k]
    ks = list(kernel.shape[:dims])
    strides = _ints(cfg.get("strides", 1), dims)
    dil = _ints(cfg.get("dilation_rate", 1), dims)
    padding = str(cfg.get("padding", "valid")).lower()
    extra = cfg.get("output_padding")
    extra = [None] * dims if extra is None else _ints(extra, dims)
    if padding not in ("same", "valid"):
        raise _Unsupported(f"padding={padding!r}")
    # Keras pads the stride-dilated input by (left, right) and correlates with the flipped kernel;
    # the full transposed convolution is that with (span-1, span-1), so ONNX crops span-1-left at
    # the beginning and span-1-right at the end (a negative crop is output_padding).
    begin, end, out_pad, out_sizes = [], [], [], []
    for n, k, s, d, op in zip(nc_in[2:], ks, strides, dil, extra):
        span = (k - 1) * d + 1
        if padding == "valid":
            op2 = max(span, s) - span if op is None else op
            left, right = span - 1, span - 1 + op2
        else:
            total = s + span - 2 if op is None else span + span % 2 - 2 + op
            left = min(total // 2 + total % 2, span - 1)
            right = total - left
        crop_end = span - 1 - right
        begin.append(span - 1 - left)
        end.append(max(crop_end, 0))
        out_pad.append(max(-crop_end, 0))
        out_sizes.append(None if n is None else (n - 1) * s + span - (span - 1 - left) - crop_end)
    inputs = [xin] + _weight_inputs(b, ctx, weight, _bias(w, cfg, 1))
    act = _activation_name(cfg.get("activation"))
    has_act = _fused_activation(act)
    y = b.node("ConvTranspose", inputs, name, out=name + (".convt" if has_act else ""), kernel_shape=ks,
               strides=strides, dilations=dil, pads=begin + end,
               output_padding=out_pad if any(out_pad) else None)
    if has_act:
        y = _apply_activation(b, act, y, name, ctx, axis=perm.index(x.rank - 1), final=name)
    out_nc = [nc_in[0], weight.shape[1]] + out_sizes
    return [_out_tensor(_keras_shape(out_nc, perm), np.float32, perm, y, name)]


def _pool(op: str):
    def run(b, name, cfg, ins, w, ctx):
        x = ins[0]
        dims = x.rank - 2
        perm, xin, nc_in = _spatial_input(b, x, cfg)
        kernel = _ints(cfg.get("pool_size", 2), dims)
        strides = _ints(cfg.get("strides") or kernel, dims)
        padding = str(cfg.get("padding", "valid")).lower()
        attrs = _padding_attrs(padding, nc_in[2:], kernel, strides, [1] * dims)
        if op == "AveragePool":
            attrs["count_include_pad"] = 0  # TensorFlow averages over the real cells only
        y = b.node(op, [xin], name, out=name, kernel_shape=kernel, strides=strides, **attrs)
        out_nc = nc_in[:2] + [_conv_out(n, k, s, 1, padding) for n, k, s in zip(nc_in[2:], kernel, strides)]
        return [_out_tensor(_keras_shape(out_nc, perm), np.float32, perm, y, name)]
    return run


def _global_pool(op: str):
    def run(b, name, cfg, ins, w, ctx):
        x = ins[0]
        rank = x.rank
        perm = _spatial_perm(rank, cfg)
        xin = b.view(x, perm)
        channels = x.shape[perm[1]]
        if cfg.get("keepdims", False):
            y = b.node(op, [xin], name, out=name)
            nc = [x.shape[0], channels] + [1] * (rank - 2)
            return [_out_tensor(_keras_shape(nc, perm), np.float32, perm, y, name)]
        pooled = b.node(op, [xin], name, out=f"{name}.pool")
        y = b.node("Flatten", [pooled], f"{name}/flatten", out=name, axis=1)
        return [_out_tensor([x.shape[0], channels], np.float32, (0, 1), y, name)]
    return run


def _batchnorm(b, name, cfg, ins, w, ctx):
    x = ins[0]
    axis = cfg.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise _Unsupported(f"normalisation over several axes {axis}")
        axis = axis[0]
    axis = int(axis) % x.rank
    i = 0
    gamma = beta = None
    if cfg.get("scale", True):
        gamma, i = w[i], i + 1
    if cfg.get("center", True):
        beta, i = w[i], i + 1
    mean, var = w[i], w[i + 1]
    c = mean.shape[0]
    perm = _channels_first(x.rank, axis)  # ONNX normalises along axis 1
    xin = b.view(x, perm)
    gamma = np.ones(c) if gamma is None else gamma    # scale=False / center=False: identity parts
    beta = np.zeros(c) if beta is None else beta
    inputs = [xin,
              b.weight(f"{ctx.layer}.weight", lambda: gamma.astype(np.float32)),
              b.weight(f"{ctx.layer}.bias", lambda: beta.astype(np.float32)),
              b.weight(f"{ctx.layer}.mean", lambda: mean.astype(np.float32)),
              b.weight(f"{ctx.layer}.var", lambda: var.astype(np.float32))]
    y = b.node("BatchNormalization", inputs, name, out=name, epsilon=float(cfg.get("epsilon", 1e-3)))
    return [_out_tensor(x.shape, np.float32, perm, y, name)]


def _elementwise(b: _Builder, x: _Tensor, op: str, name: str, **attrs) -> _Tensor:
    perm, src = x.primary
    y = b.node(op, [src], name, out=name, **attrs)
    return _out_tensor(x.shape, x.dtype, perm, y, name)


def _activation_layer(b, name, cfg, ins, w, ctx):
    x = ins[0]
    act = _activation_name(cfg.get("activation"))
    if act is None:
        raise _Unsupported("a custom activation function")
    if act.lower() == "linear":
        return [x]
    perm, src = x.primary
    y = _apply_activation(b, act, src, name, ctx, axis=perm.index(x.rank - 1), final=name, own=True)
    return [_out_tensor(x.shape, x.dtype, perm, y, name)]


def _relu(b, name, cfg, ins, w, ctx):
    x = ins[0]
    max_value = cfg.get("max_value")
    slope = float(cfg.get("negative_slope", 0.0) or 0.0)
    threshold = float(cfg.get("threshold", 0.0) or 0.0)
    if threshold != 0.0:
        raise _Unsupported(f"threshold={threshold}")
    if max_value is not None and slope != 0.0:
        raise _Unsupported("max_value together with negative_slope")
    if max_value is not None:
        perm, src = x.primary
        y = b.node("Clip", [src, b.const(f"{name}.min", 0.0), b.const(f"{name}.max", float(max_value))],
                   name, out=name)
        return [_out_tensor(x.shape, x.dtype, perm, y, name)]
    if slope:
        return [_elementwise(b, x, "LeakyRelu", name, alpha=slope)]
    return [_elementwise(b, x, "Relu", name)]


def _leaky_relu(b, name, cfg, ins, w, ctx):
    slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
    return [_elementwise(b, ins[0], "LeakyRelu", name, alpha=float(slope))]


def _elu(b, name, cfg, ins, w, ctx):
    return [_elementwise(b, ins[0], "Elu", name, alpha=float(cfg.get("alpha", 1.0)))]


def _softmax(b, name, cfg, ins, w, ctx):
    x = ins[0]
    axis = cfg.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise _Unsupported(f"softmax over several axes {axis}")
        axis = axis[0]
    perm, src = x.primary
    y = b.node("Softmax", [src], name, out=name, axis=perm.index(int(axis) % x.rank))
    return [_out_tensor(x.shape, x.dtype, perm, y, name)]


def _broadcast_shape(shapes: List[Shape]) -> Shape:
    """numpy's broadcast of Keras shapes (``None``: unknown), as the merge layers compute: the
    output of ``Multiply()([scale (N,1,1,C), x (N,8,8,C)])`` is 8x8, whichever input comes first."""
    rank = max(len(s) for s in shapes)
    out: Shape = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        known = [d for d in dims if d is not None and d != 1]
        out.append(known[0] if known else (None if None in dims else 1))
    return out


def _unsqueezed(b: _Builder, t: _Tensor, rank: int, name: str) -> _Tensor:
    """``t`` with axes of length 1 inserted at axis 1 up to ``rank`` (Keras's merge layers' rule)."""
    extra = rank - t.rank
    axes = b.const(f"{name}.axes", np.arange(1, 1 + extra, dtype=np.int64))
    y = b.node("Unsqueeze", [b.view(t, _identity(t.rank)), axes], name, out=name)
    return _out_tensor([t.shape[0]] + [1] * extra + list(t.shape[1:]), t.dtype, _identity(rank), y, name)


def _merge(op: str):
    def run(b, name, cfg, ins, w, ctx):
        if len(ins) < 2:
            raise _Unsupported("fewer than two inputs")
        ranks = {t.rank for t in ins}
        if len(ranks) > 1 and ".ops." not in ctx.module:
            # keras.layers' merges expand a lower-rank input at axis 1, (N, C) -> (N, 1, C), before
            # broadcasting; keras.ops arithmetic (same class names) broadcasts from the right, as numpy
            top = max(ranks)
            ins = [t if t.rank == top else _unsqueezed(b, t, top, f"{name}/in{i}") for i, t in enumerate(ins)]
        if len({t.rank for t in ins}) == 1:
            perm = ins[0].primary[0]
        else:
            perm = None
        srcs = [b.view(t, perm if perm is not None else _identity(t.rank)) for t in ins]
        shape = _broadcast_shape([t.shape for t in ins])
        out_perm = perm if perm is not None else _identity(len(shape))
        if op == "Mean":  # Average: the sum scaled, as ONNX Mean
            y = b.node("Mean", srcs, name, out=name)
        elif op in ("Sum", "Max", "Min") and len(srcs) > 2:
            y = b.node(op, srcs, name, out=name)
        else:
            binary = {"Sum": "Add", "Max": "Max", "Min": "Min", "Mul": "Mul", "Sub": "Sub"}[op]
            y = srcs[0]
            for i, other in enumerate(srcs[1:]):
                last = i == len(srcs) - 2
                y = b.node(binary, [y, other], name if last else f"{name}/{i}", out=name if last else None)
        return [_out_tensor(shape, ins[0].dtype, out_perm, y, name)]
    return run


def _concat(b, name, cfg, ins, w, ctx):
    rank = ins[0].rank
    axis = int(cfg.get("axis", -1)) % rank
    perm = ins[0].primary[0]
    srcs = [b.view(t, perm) for t in ins]
    y = b.node("Concat", srcs, name, out=name, axis=perm.index(axis))
    shape = list(ins[0].shape)
    sizes = [t.shape[axis] for t in ins]
    shape[axis] = None if any(s is None for s in sizes) else sum(sizes)
    return [_out_tensor(shape, ins[0].dtype, perm, y, name)]


def _flatten(b, name, cfg, ins, w, ctx):
    x = ins[0]
    # Keras flattens in its own (channels-last) order; channels_first moves channels last first
    perm = _identity(x.rank)
    if cfg.get("data_format") == "channels_first" and x.rank > 2:
        perm = (0,) + tuple(range(2, x.rank)) + (1,)
    src = b.view(x, perm)
    y = b.node("Flatten", [src], name, out=name, axis=1)
    rest = x.shape[1:]
    size = None if any(s is None for s in rest) else int(np.prod(rest, dtype=np.int64))
    return [_out_tensor([x.shape[0], size], x.dtype, (0, 1), y, name)]


def _reshape(b, name, cfg, ins, w, ctx):
    if ".ops." in ctx.module:   # keras.ops.reshape, saved under the layer's class name
        raise _Unsupported("keras.ops.reshape (use a keras.layers.Reshape)")
    x = ins[0]
    target = [int(v) for v in _ints(cfg["target_shape"], 0)]
    src = b.view(x, _identity(x.rank))
    y = b.node("Reshape", [src, b.const(f"{name}.shape", [0] + target, np.int64)], name, out=name)
    shape: Shape = [x.shape[0]] + [None if v == -1 else v for v in target]
    if -1 in target and all(s is not None for s in x.shape[1:]):
        known = int(np.prod([v for v in target if v != -1], dtype=np.int64))
        shape[1 + target.index(-1)] = int(np.prod(x.shape[1:], dtype=np.int64)) // max(known, 1)
    return [_out_tensor(shape, x.dtype, _identity(len(shape)), y, name)]


def _permute(b, name, cfg, ins, w, ctx):
    x = ins[0]
    perm = (0,) + tuple(int(d) for d in _ints(cfg["dims"], 0))
    src_perm, src = x.primary
    # the output is np.transpose(x, perm); from the view src_perm that is one Transpose
    y = b.node("Transpose", [src], name, out=name, perm=[src_perm.index(a) for a in perm])
    return [_out_tensor([x.shape[a] for a in perm], x.dtype, _identity(x.rank), y, name)]


def _repeat_vector(b, name, cfg, ins, w, ctx):
    x = ins[0]
    n = int(cfg["n"])
    src = b.view(x, (0, 1))
    expanded = b.node("Unsqueeze", [src, b.const(f"{name}.axes", [1], np.int64)], f"{name}/unsqueeze")
    y = b.node("Tile", [expanded, b.const(f"{name}.repeats", [1, n, 1], np.int64)], name, out=name)
    return [_out_tensor([x.shape[0], n, x.shape[1]], x.dtype, (0, 1, 2), y, name)]


def _embedding(b, name, cfg, ins, w, ctx):
    x = ins[0]
    if cfg.get("mask_zero"):
        raise _Unsupported("mask_zero=True (masked time steps)")
    table = w[0]
    idx = b.view(x, _identity(x.rank))
    if not np.issubdtype(x.dtype, np.integer):
        idx = b.node("Cast", [idx], f"{name}/cast", to=7)  # int64
    y = b.node("Gather", [b.weight(f"{ctx.layer}.weight", lambda: table.astype(np.float32)), idx], name,
               out=name, axis=0)
    shape = list(x.shape) + [int(table.shape[1])]
    return [_out_tensor(shape, np.float32, _identity(len(shape)), y, name)]


_RNN_ACTIVATIONS = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu", "linear": "Affine",
                    "hard_sigmoid": "HardSigmoid"}


def _rnn_activation(value: Any, ctx: _Ctx, alphas: List[float], betas: List[float]) -> str:
    act = _activation_name(value)
    if act is None or act not in _RNN_ACTIVATIONS:
        raise _Unsupported(f"recurrent activation {act or 'custom'!r}")
    if act == "hard_sigmoid":
        alphas.append(1.0 / 6.0 if ctx.keras_major >= 3 else 0.2)
        betas.append(0.5)
    elif act == "linear":
        alphas.append(1.0)
        betas.append(0.0)
    return _RNN_ACTIVATIONS[act]


def _recurrent(kind: str):
    """LSTM / GRU / SimpleRNN as the ONNX operator of the same family (sequence-major layout)."""
    def run(b, name, cfg, ins, w, ctx):
        x = ins[0]
        if x.rank != 3:
            raise _Unsupported(f"a rank-{x.rank} input")
        for key in ("stateful", "time_major"):
            if cfg.get(key):
                raise _Unsupported(f"{key}=True")
        units = int(cfg["units"])
        kernel, recurrent = w[0], w[1]
        bias = w[2] if cfg.get("use_bias", True) and len(w) > 2 else None
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
        W, R = kernel.T, recurrent.T  # [gates * units, in], [gates * units, units]
        attrs: Dict[str, Any] = {"hidden_size": units}
        if bias is None:
            bias = np.zeros(gates * units, dtype=np.float32)
        if kind == "LSTM":
            def blocks(m: np.ndarray) -> np.ndarray:  # Keras gates i, f, c, o -> ONNX i, o, f, c
                return np.concatenate([m[g * units:(g + 1) * units] for g in (0, 3, 1, 2)], axis=0)
            W, R, wb = blocks(W), blocks(R), blocks(bias.reshape(-1))
            B = np.concatenate([wb, np.zeros_like(wb)])
        elif kind == "GRU":
            # reset_after (Keras 3's and tf.keras's default) applies the reset gate after the
            # recurrent matmul, ONNX's linear_before_reset; files from before the option existed
            # have no key and a 1-D bias
            reset_after = cfg.get("reset_after", bias.ndim == 2)
            attrs["linear_before_reset"] = 1 if reset_after else 0
            if bias.ndim == 2:  # [input bias, recurrent bias]
                B = np.concatenate([bias[0], bias[1]])
            else:
                B = np.concatenate([bias, np.zeros_like(bias)])
        else:
            B = np.concatenate([bias, np.zeros_like(bias)])
        alphas: List[float] = []
        betas: List[float] = []
        if kind == "LSTM":
            acts = [_rnn_activation(cfg.get("recurrent_activation", "sigmoid"), ctx, alphas, betas),
                    _rnn_activation(cfg.get("activation", "tanh"), ctx, alphas, betas)]
            acts.append(acts[1])
            if acts[1] in ("HardSigmoid", "Affine"):
                alphas.append(alphas[-1])
                betas.append(betas[-1])
            default = ["Sigmoid", "Tanh", "Tanh"]
        elif kind == "GRU":
            acts = [_rnn_activation(cfg.get("recurrent_activation", "sigmoid"), ctx, alphas, betas),
                    _rnn_activation(cfg.get("activation", "tanh"), ctx, alphas, betas)]
            default = ["Sigmoid", "Tanh"]
        else:
            acts = [_rnn_activation(cfg.get("activation", "tanh"), ctx, alphas, betas)]
            default = ["Tanh"]
        if acts != default:
            attrs["activations"] = acts
            if alphas:
                attrs["activation_alpha"] = alphas
                attrs["activation_beta"] = betas
        src = b.view(x, (1, 0, 2))  # [time, batch, features]
        if cfg.get("go_backwards"):
            # Keras runs over the reversed sequence and returns the outputs in that order
            bounds = [b.const(f"{name}.start", [-1], np.int64),
                      b.const(f"{name}.end", [np.iinfo(np.int64).min], np.int64),
                      b.const(f"{name}.axes", [0], np.int64), b.const(f"{name}.steps", [-1], np.int64)]
            src = b.node("Slice", [src] + bounds, f"{name}/reverse")
        inputs = [src, b.weight(f"{ctx.layer}.weight", lambda: W[None].astype(np.float32)),
                  b.weight(f"{ctx.layer}.recurrent_weight", lambda: R[None].astype(np.float32)),
                  b.weight(f"{ctx.layer}.bias", lambda: B[None].astype(np.float32))]
        nout = 3 if kind == "LSTM" else 2
        outs = b.node(kind, inputs, name, out=f"{name}.Y", nout=nout, **attrs)
        axes0 = b.const(f"{name}.squeeze0", [0], np.int64)
        results: List[_Tensor] = []
        if cfg.get("return_sequences"):
            seq = b.node("Squeeze", [outs[0], b.const(f"{name}.squeeze1", [1], np.int64)], f"{name}/squeeze",
                         out=f"{name}.seq")  # [time, batch, units]
            t = _out_tensor([x.shape[0], x.shape[1], units], np.float32, (1, 0, 2), seq, name)
            results.append(t)
        else:
            last = b.node("Squeeze", [outs[1], axes0], f"{name}/last", out=name)
            results.append(_out_tensor([x.shape[0], units], np.float32, (0, 1), last, name))
        if cfg.get("return_state"):
            for i, state in enumerate(outs[1:]):
                s = b.node("Squeeze", [state, axes0], f"{name}/state{i}", out=f"{name}.state{i}")
                results.append(_out_tensor([x.shape[0], units], np.float32, (0, 1), s, f"{name}.state{i}"))
        return results
    return run


def _upsampling(b, name, cfg, ins, w, ctx):
    x = ins[0]
    rank = x.rank
    dims = rank - 2
    perm = _spatial_perm(rank, cfg)
    xin = b.view(x, perm)
    size = _ints(cfg.get("size", 2), dims)
    interp = str(cfg.get("interpolation", "nearest")).lower()
    if interp == "nearest":
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif interp == "bilinear":
        attrs = dict(mode="linear", coordinate_transformation_mode="half_pixel")
    else:
        raise _Unsupported(f"interpolation={interp!r}")
    scales = b.const(f"{name}.scales", [1.0, 1.0] + [float(s) for s in size])
    y = b.node("Resize", [xin, "", scales], name, out=name, **attrs)
    nc = [x.shape[a] for a in perm]
    out_nc = nc[:2] + [None if n is None else n * s for n, s in zip(nc[2:], size)]
    return [_out_tensor(_keras_shape(out_nc, perm), x.dtype, perm, y, name)]


def _pairs(value: Any, dims: int) -> List[Tuple[int, int]]:
    """ZeroPadding/Cropping amounts as (begin, end) per spatial axis."""
    if isinstance(value, dict):
        value = value.get("items", value)
    if isinstance(value, (int, float)):
        return [(int(value), int(value))] * dims
    value = list(value)
    if dims == 1 and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return [(int(value[0]), int(value[1]))]
    out = []
    for v in value:
        if isinstance(v, (int, float)):
            out.append((int(v), int(v)))
        else:
            v = list(v.get("items", v) if isinstance(v, dict) else v)
            out.append((int(v[0]), int(v[1])))
    return out


def _pad_layer(crop: bool):
    def run(b, name, cfg, ins, w, ctx):
        x = ins[0]
        rank = x.rank
        dims = rank - 2
        perm = _spatial_perm(rank, cfg)
        xin = b.view(x, perm)
        amounts = _pairs(cfg.get("cropping" if crop else "padding", 1), dims)
        sign = -1 if crop else 1
        pads = [0, 0] + [sign * a for a, _ in amounts] + [0, 0] + [sign * e for _, e in amounts]
        y = b.node("Pad", [xin, b.const(f"{name}.pads", pads, np.int64)], name, out=name, mode="constant")
        nc = [x.shape[a] for a in perm]
        out_nc = nc[:2] + [None if n is None else n + sign * (p + q) for n, (p, q) in zip(nc[2:], amounts)]
        return [_out_tensor(_keras_shape(out_nc, perm), x.dtype, perm, y, name)]
    return run


def _rescaling(b, name, cfg, ins, w, ctx):
    x = ins[0]
    perm, src = x.primary
    scale = np.asarray(cfg.get("scale", 1.0), dtype=np.float32)
    offset = np.asarray(cfg.get("offset", 0.0), dtype=np.float32)
    if scale.ndim or offset.ndim:
        raise _Unsupported("per-channel scale or offset")
    y = b.node("Mul", [src, b.const(f"{name}.scale", scale)], f"{name}/scale",
               out=name if not offset else None)
    if offset:
        y = b.node("Add", [y, b.const(f"{name}.offset", offset)], name, out=name)
    return [_out_tensor(x.shape, np.float32, perm, y, name)]


def _dense(b, name, cfg, ins, w, ctx):
    x = ins[0]
    kernel = w[0]
    bias = _bias(w, cfg, 1)
    units = int(kernel.shape[1])
    act = _activation_name(cfg.get("activation"))
    has_act = _fused_activation(act)
    out = name + (".dense" if has_act else "")
    if x.rank == 2:
        y = b.node("Gemm", [b.view(x, (0, 1))] + _weight_inputs(b, ctx, kernel.T, bias), name, out=out, transB=1)
    else:  # Dense acts on the last axis of an N-D input: the kernel as Keras has it, [in, out], under a
        # name of its own (a layer shared by a 2-D and a 3-D input holds both forms)
        src = b.view(x, _identity(x.rank))
        y = b.node("MatMul", [src, b.weight(f"{ctx.layer}.kernel", lambda: kernel.astype(np.float32))], name,
                   out=out if bias is None else f"{name}.matmul")
        if bias is not None:
            y = b.node("Add", [y, b.weight(f"{ctx.layer}.bias", lambda: bias.astype(np.float32))],
                       f"{name}/bias", out=out)
    shape = list(x.shape[:-1]) + [units]
    if has_act:
        y = _apply_activation(b, act, y, name, ctx, axis=len(shape) - 1, final=name)
    return [_out_tensor(shape, np.float32, _identity(len(shape)), y, name)]


def _passthrough(b, name, cfg, ins, w, ctx):
    return [ins[0]]


_LAYERS: Dict[str, Callable] = {
    "Dense": _dense,
    "Conv1D": _conv, "Conv2D": _conv, "Conv3D": _conv, "Convolution1D": _conv, "Convolution2D": _conv,
    "Convolution3D": _conv,
    "DepthwiseConv1D": _depthwise, "DepthwiseConv2D": _depthwise,
    "SeparableConv1D": _separable, "SeparableConv2D": _separable, "SeparableConvolution1D": _separable,
    "SeparableConvolution2D": _separable,
    "Conv1DTranspose": _conv_transpose, "Conv2DTranspose": _conv_transpose, "Conv3DTranspose": _conv_transpose,
    "Convolution2DTranspose": _conv_transpose, "Deconvolution2D": _conv_transpose,
    "MaxPooling1D": _pool("MaxPool"), "MaxPooling2D": _pool("MaxPool"), "MaxPooling3D": _pool("MaxPool"),
    "MaxPool1D": _pool("MaxPool"), "MaxPool2D": _pool("MaxPool"), "MaxPool3D": _pool("MaxPool"),
    "AveragePooling1D": _pool("AveragePool"), "AveragePooling2D": _pool("AveragePool"),
    "AveragePooling3D": _pool("AveragePool"), "AvgPool1D": _pool("AveragePool"),
    "AvgPool2D": _pool("AveragePool"), "AvgPool3D": _pool("AveragePool"),
    "GlobalAveragePooling1D": _global_pool("GlobalAveragePool"),
    "GlobalAveragePooling2D": _global_pool("GlobalAveragePool"),
    "GlobalAveragePooling3D": _global_pool("GlobalAveragePool"),
    "GlobalAvgPool1D": _global_pool("GlobalAveragePool"), "GlobalAvgPool2D": _global_pool("GlobalAveragePool"),
    "GlobalMaxPooling1D": _global_pool("GlobalMaxPool"), "GlobalMaxPooling2D": _global_pool("GlobalMaxPool"),
    "GlobalMaxPooling3D": _global_pool("GlobalMaxPool"), "GlobalMaxPool1D": _global_pool("GlobalMaxPool"),
    "GlobalMaxPool2D": _global_pool("GlobalMaxPool"),
    "BatchNormalization": _batchnorm,
    "Activation": _activation_layer, "ReLU": _relu, "LeakyReLU": _leaky_relu, "ELU": _elu, "Softmax": _softmax,
    "Add": _merge("Sum"), "Subtract": _merge("Sub"), "Multiply": _merge("Mul"), "Average": _merge("Mean"),
    "Maximum": _merge("Max"), "Minimum": _merge("Min"),
    "Concatenate": _concat, "Flatten": _flatten, "Reshape": _reshape, "Permute": _permute,
    "RepeatVector": _repeat_vector,
    "Embedding": _embedding,
    "LSTM": _recurrent("LSTM"), "GRU": _recurrent("GRU"), "SimpleRNN": _recurrent("RNN"),
    "UpSampling1D": _upsampling, "UpSampling2D": _upsampling,
    "ZeroPadding1D": _pad_layer(False), "ZeroPadding2D": _pad_layer(False),
    "Cropping1D": _pad_layer(True), "Cropping2D": _pad_layer(True),
    "Rescaling": _rescaling,
}
#: Layers that compute in float32 whatever their input's type, as Keras's do (Rescaling casts, Dense
#: and the convolutions promote an integer input, every layer casts a float64 one to its float32
#: compute type): an integer or float64 input is cast first. Other layers keep their input's type
#: (token ids into an Embedding, shape-only layers).
_FLOAT_LAYERS = frozenset(k for k in _LAYERS if k not in (
    "Embedding", "Flatten", "Reshape", "Permute", "RepeatVector", "Concatenate", "ZeroPadding1D", "ZeroPadding2D",
    "Cropping1D", "Cropping2D", "UpSampling1D", "UpSampling2D"))

# identity at inference time
for _name in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
              "GaussianDropout", "AlphaDropout", "ActivityRegularization"):
    _LAYERS[_name] = _passthrough

#: Why a wrapper from the TensorFlow Model Optimization toolkit cannot be read, and what to do.
_TFMOT_HINTS = {
    "PruneLowMagnitude": "call tfmot.sparsity.keras.strip_pruning(model) before saving",
    "ClusterWeights": "call tfmot.clustering.keras.strip_clustering(model) before saving",
    "ClusterWeightsMHA": "call tfmot.clustering.keras.strip_clustering(model) before saving",
    "QuantizeWrapper": "dcrt converts float models; save the model before quantization-aware wrapping",
    "QuantizeWrapperV2": "dcrt converts float models; save the model before quantization-aware wrapping",
}


def _problems(layer: dict) -> Optional[Tuple[str, str]]:
    """(kind, why) when a layer cannot be converted (decided from its config alone), else None."""
    cls, name, cfg = layer.get("class_name", "?"), _layer_name(layer), layer.get("config") or {}
    if cls == "Lambda":
        return cls, f"Lambda {name!r} (Python code: dcrt never executes code from a model file)"
    if cls in _TFMOT_HINTS:
        return cls, f"{cls} {name!r} ({_TFMOT_HINTS[cls]})"
    if cls in ("TFOpLambda", "SlicingOpLambda"):
        return cls, f"{cls} {name!r} (a TensorFlow function called on a Keras tensor: {cfg.get('function', '?')})"
    if cls in ("Functional", "Sequential", "Model"):
        return cls, (f"nested model {name!r} (a model used as a layer is not supported yet: build the outer "
                     "model from the inner model's layers)")
    if cls not in _LAYERS and cls != "InputLayer":
        # Keras 3 writes a registered custom class as "package>Class"
        short = cls.split(">")[-1]
        module = layer.get("module")
        custom = ">" in cls or (module is not None and not str(module).startswith("keras")) or (
            layer.get("registered_name") not in (None, cls))
        why = (" (custom layer: its Python code is not in the file, and dcrt never executes code from a "
               "model file)") if custom else " (not supported)"
        return short, f"{short} {name!r}{why}"
    policy = cfg.get("dtype")
    if isinstance(policy, dict) and "Quantized" in str(policy.get("class_name", "")):
        return cls, f"{cls} {name!r} (Keras-quantized weights)"
    if cfg.get("lora_rank"):
        return cls, f"{cls} {name!r} (LoRA enabled: merge the LoRA factors into the kernel before saving)"
    act = _activation_name(cfg["activation"]) if "activation" in cfg else "linear"
    if (act or "").lower() not in ACTIVATIONS:
        return cls, f"{cls} {name!r} (activation {act or 'custom'!r})"
    if cls in ("LSTM", "GRU", "SimpleRNN"):
        for key in ("stateful", "time_major"):
            if cfg.get(key):
                return cls, f"{cls} {name!r} ({key}=True)"
    if cls == "Embedding" and cfg.get("mask_zero"):
        return cls, f"Embedding {name!r} (mask_zero=True: masked time steps are not supported)"
    return None


_CONV = {"Conv1D", "Conv2D", "Conv3D", "Convolution1D", "Convolution2D", "Convolution3D"}


def _expected_weights(cls: str, cfg: dict, x: Shape) -> Optional[List[Tuple[str, list]]]:
    """(name, shape) of each weight a layer reads, from its config and input shape (None: any size);
    None for the layers not checked (the translation reads their shapes from the weights)."""
    bias = bool(cfg.get("use_bias", True))
    if cls == "Dense":
        units = cfg.get("units")
        return [("kernel", [x[-1], units])] + ([("bias", [units])] if bias else [])
    if cls in _CONV:
        dims = len(x) - 2
        c = x[1] if cfg.get("data_format") == "channels_first" else x[-1]
        groups = int(cfg.get("groups", 1) or 1)
        kernel = _ints(cfg["kernel_size"], dims) if "kernel_size" in cfg else [None] * dims
        filters = cfg.get("filters")
        return ([("kernel", kernel + [None if c is None else c // groups, filters])]
                + ([("bias", [filters])] if bias else []))
    if cls == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if not isinstance(axis, int):
            return None
        names = ["gamma"] * bool(cfg.get("scale", True)) + ["beta"] * bool(cfg.get("center", True))
        return [(n, [x[axis % len(x)]]) for n in names + ["moving_mean", "moving_variance"]]
    if cls == "Embedding":
        return [("embeddings", [cfg.get("input_dim"), cfg.get("output_dim")])]
    return None


def _check_weights(where: str, cls: str, cfg: dict, ins: List[_Tensor], weights: List[np.ndarray]) -> None:
    """Refuse weights that do not fit the layer (missing, transposed, from another model): converted
    anyway, they would fail only when the model runs, or compute garbage."""
    expected = _expected_weights(cls, cfg, ins[0].shape) if ins else None
    if expected is None:
        return
    fix = "the weights do not match the model_config (a damaged or edited file): save the model again"
    if len(weights) < len(expected):
        raise ConversionError(f"{where} has {len(weights)} weight array(s) in the file, it needs "
                              f"{len(expected)} ({', '.join(n for n, _ in expected)}); {fix}")
    for (name, want), got in zip(expected, weights):
        if len(got.shape) != len(want) or any(w is not None and w != g for w, g in zip(want, got.shape)):
            shown = ["?" if w is None else w for w in want]
            raise ConversionError(f"{where}: its {name} has shape {list(got.shape)}, the layer's config and "
                                  f"input need {shown}; {fix}")


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------


def _model_layers(config: dict) -> Tuple[str, List[dict], list, list]:
    """(class, layers, input refs, output refs) of a model config (Sequential made functional)."""
    cls = config.get("class_name", "")
    inner = config.get("config", config)
    if isinstance(inner, list):  # very old Sequential: a bare list of layers
        inner = {"layers": inner}
    layers = [dict(l) for l in inner.get("layers", [])]
    if cls in ("Functional", "Model") or "input_layers" in inner:
        return cls, layers, _refs(inner.get("input_layers", [])), _refs(inner.get("output_layers", []))
    if cls != "Sequential":
        raise ConversionError(f"the file holds a {cls or 'unknown'} object, not a Keras Sequential or "
                              "functional model (subclassed models are Python code: save a functional model)")
    # Sequential: chain the layers after an InputLayer (explicit or made from the first layer's shape)
    if not layers:
        raise ConversionError("the Sequential model has no layers")
    if layers[0].get("class_name") != "InputLayer":
        first = layers[0].get("config", {})
        shape = _input_shape(first) or inner.get("build_input_shape")
        if shape is None:
            raise ConversionError("the Sequential model was never built (no input shape); "
                                  "give it a keras.Input(...) first layer and save it again")
        layers.insert(0, {"class_name": "InputLayer", "synthetic": True,
                          "config": {"name": f"{_layer_name(layers[0]) or 'input'}_input",
                                     "batch_shape": list(shape), "dtype": first.get("dtype", "float32")}})
    previous = _layer_name(layers[0])
    for layer in layers[1:]:
        layer["inbound_nodes"] = [[[previous, 0, 0, {}]]]
        previous = _layer_name(layer)
    return cls, layers, [(_layer_name(layers[0]), 0, 0)], [(previous, 0, 0)]


def from_keras(path: str) -> Model:
    """Translate a Keras ``.h5`` / ``.hdf5`` / ``.keras`` model file into the dcrt IR."""
    source = _Source(path)
    try:
        return _convert(source)
    finally:
        source.close()


def _convert(source: _Source) -> Model:
    cls, layers, input_refs, output_refs = _model_layers(source.config)
    source.bind([l for l in layers if not l.get("synthetic")])
    ctx = _Ctx(source.keras_major)

    problems: List[str] = []
    kinds: List[str] = []
    for layer in layers:
        problem = _problems(layer)
        if problem:
            kinds.append(problem[0])
            problems.append(problem[1])
    if problems:
        raise UnsupportedOperatorError(f"{source.path}: unsupported Keras layer(s): {'; '.join(problems)}",
                                       sorted(set(kinds)))

    b = _Builder()
    tensors: Dict[Tuple[str, int, int], _Tensor] = {}
    inputs: List[ValueInfo] = []
    by_name = {_layer_name(l): l for l in layers}
    fix = "the model_config is damaged: save the model again"
    if len(by_name) != len(layers):
        names = [_layer_name(l) for l in layers]
        twice = next(n for n in names if names.count(n) > 1)
        raise ConversionError(f"{source.path}: several layers are named {twice!r} (layer names are unique); {fix}")
    for layer in layers:  # a dangling reference would only show as an output that cannot be computed
        for ref in [r for refs, _ in _calls(layer) for r in refs]:
            if ref[0] not in by_name:
                raise ConversionError(f"{source.path}: layer {_layer_name(layer)!r} reads the output of layer "
                                      f"{ref[0]!r}, which the model does not have; {fix}")
    for ref in input_refs:
        layer = by_name.get(ref[0])
        if layer is None or layer.get("class_name") != "InputLayer":
            raise ConversionError(f"{source.path}: model input {ref[0]!r} is not an InputLayer")
        cfg = layer.get("config") or {}
        shape = _input_shape(cfg)
        if shape is None:
            raise ConversionError(f"{source.path}: input {ref[0]!r} has no shape")
        if not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in shape):
            raise ConversionError(f"{source.path}: input {ref[0]!r} has shape {shape}: dimensions are whole "
                                  f"numbers or null; {fix}")
        check_shape(shape, f"{source.path}: input {ref[0]!r}")
        dtype = np.dtype(_dtype_name(cfg.get("dtype", "float32")))
        name = b.fresh(ref[0])
        inputs.append(ValueInfo(name, dtype, _io_shape(shape)))
        tensors[ref] = _out_tensor(shape, dtype, _identity(len(shape)), name, name)

    # every (layer, call) whose inputs exist is translated, until nothing more can be
    pending = [(l, i, call) for l in layers if l.get("class_name") != "InputLayer"
               for i, call in enumerate(_calls(l))]
    errors: List[str] = []
    progress = True
    while pending and progress:
        progress = False
        rest = []
        for layer, index, (refs, tensor_kwargs) in pending:
            if not all(r in tensors for r in refs):
                rest.append((layer, index, (refs, tensor_kwargs)))
                continue
            progress = True
            lcls, lname, cfg = layer["class_name"], _layer_name(layer), layer.get("config") or {}
            node_name = lname if index == 0 else f"{lname}_call{index}"
            ctx.layer, ctx.module = lname, str(layer.get("module") or "")
            try:
                if tensor_kwargs:
                    raise _Unsupported("called with tensor keyword arguments (e.g. initial_state or mask)")
                weights = source.weights(lname)
                _check_weights(f"{source.path}: layer {lname!r} ({lcls})", lcls, cfg,
                               [tensors[r] for r in refs], weights)
                ins = [tensors[r] for r in refs]
                if lcls in _FLOAT_LAYERS:
                    ins = [_as_float32(b, t) for t in ins]
                outs = _LAYERS[lcls](b, node_name, cfg, ins, weights, ctx)
            except _Unsupported as e:
                errors.append(f"{lcls} {lname!r} ({e})")
                continue
            except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError) as e:  # a damaged config
                raise ConversionError(f"{source.path}: layer {lname!r} ({lcls}) cannot be read: "
                                      f"{type(e).__name__}: {e}") from None
            for t_index, t in enumerate(outs):
                tensors[(lname, index, t_index)] = t
        pending = rest
    if errors:
        raise UnsupportedOperatorError(f"{source.path}: unsupported Keras layer option(s): {'; '.join(errors)}",
                                       sorted({e.split(' ')[0] for e in errors}))

    # outputs keep Keras's layout and are named after their layers
    input_names = {v.name for v in inputs}
    wanted_outputs: List[Tuple[str, str, _Tensor]] = []
    for ref in output_refs:
        t = tensors.get(ref)
        if t is None:
            waits = [f"{_layer_name(l)!r} waits for {_ref_text(next(r for r in refs if r not in tensors))}"
                     for l, _, (refs, _) in pending]
            why = (f": {', '.join(waits[:5])} (a cycle, or a tensor no layer produces)" if waits
                   else f" (no layer produces {_ref_text(ref)})")
            raise ConversionError(f"{source.path}: model output {ref[0]!r} cannot be computed from the inputs"
                                  f"{why}; {fix}")
        value = b.view(t, _identity(t.rank))
        wanted = (ref[0] if ref[1:] == (0, 0) else f"{ref[0]}:{ref[2]}" if ref[1] == 0
                  else f"{ref[0]}:{ref[1]}:{ref[2]}")  # a second output / a second call
        if value in input_names or any(value == v for v, _, _ in wanted_outputs):
            value = b.node("Identity", [value], f"{wanted}/output", out=f"{wanted}.output")
        wanted_outputs.append((value, wanted, t))
    outputs: List[ValueInfo] = []
    for i, (value, wanted, t) in enumerate(wanted_outputs):
        if wanted not in input_names and wanted not in {o.name for o in outputs}:
            renamed = _rename(b, value, wanted, ".nchw" if t.rank == 4 else ".internal")
            wanted_outputs[i + 1:] = [(renamed.get(v, v), w, tt) for v, w, tt in wanted_outputs[i + 1:]]
            value = renamed.get(value, value)
        outputs.append(ValueInfo(value, t.dtype, _io_shape(t.shape)))
    _prune_unused(b, {o.name for o in outputs})
    inner = source.config.get("config")
    name = str(inner.get("name", "")) if isinstance(inner, dict) else ""
    graph = Graph(b.nodes, inputs, outputs, b.inits, name)
    meta = {"source_format": "keras", "keras_version": source.keras_version, "keras_container": source.kind}
    return Model(graph, {"": OPSET}, meta)


def _ref_text(ref: Tuple[str, int, int]) -> str:
    return repr(ref[0]) if ref[1:] == (0, 0) else f"{ref[0]!r} (call {ref[1]}, output {ref[2]})"


def _io_shape(shape: Shape) -> list:
    """A model input/output shape: the batch axis is a free dimension called "batch"."""
    return ["batch" if i == 0 and d is None else d for i, d in enumerate(shape)]


def _rename(b: _Builder, value: str, wanted: str, suffix: str) -> Dict[str, str]:
    """Give ``value`` the name ``wanted``; a value already called that is renamed ``wanted + suffix``.

    Returns the renames made (old -> new).
    """
    if value == wanted:
        return {}
    done: Dict[str, str] = {}
    if wanted in b.used:
        holder = b.fresh(wanted + suffix)
        _replace(b, wanted, holder)
        done[wanted] = holder
    else:
        b.used.add(wanted)
    _replace(b, value, wanted)
    done[value] = wanted
    return done


def _replace(b: _Builder, old: str, new: str) -> None:
    for node in b.nodes:
        node.inputs = [new if i == old else i for i in node.inputs]
        node.outputs = [new if o == old else o for o in node.outputs]
    if old in b.inits:
        b.inits[new] = b.inits.pop(old)


def _prune_unused(b: _Builder, outputs: set) -> None:
    """Drop nodes (and initializers) nothing reads: views made but not needed, unused RNN states."""
    live = set(outputs)
    kept = []
    for node in reversed(b.nodes):
        if any(o in live for o in node.outputs if o):
            kept.append(node)
            live.update(i for i in node.inputs if i)
            while len(node.outputs) > 1 and node.outputs[-1] not in live:
                node.outputs.pop()  # an optional output nobody reads (an RNN's final states)
            node.outputs = [o if o in live or i == 0 else "" for i, o in enumerate(node.outputs)]
    b.nodes = kept[::-1]
    for name in list(b.inits):
        if name not in live:
            del b.inits[name]
