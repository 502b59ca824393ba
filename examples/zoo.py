"""A zoo of ONNX models built from scratch (``onnx.helper`` + numpy) to test and benchmark dcrt.

No model hub is reachable, so every model is synthesised with deterministic random weights
(``np.random.default_rng(seed)``). The topologies mirror the networks of the Deep Compression paper
and common edge workloads (LeNet, ResNet, MobileNetV2, LSTM/GRU classifiers, DCGAN, YOLO-tiny,
CRNN, VGG's classifier), so the converter and runtime see realistic operator mixes and shapes.

Weights are He-initialised and BatchNormalization statistics are random but tame, so activations
stay O(1) through the whole network: outputs are neither saturated nor vanishing, which keeps
numerical comparisons between the runtime and onnxruntime meaningful.

Every model uses opset 17 and IR version 8 (loadable by onnxruntime 1.x), a symbolic batch dim
``"N"``, named nodes (``conv1``, ``fc6``, ...) and PyTorch-style initializer names
(``conv1.weight``, ``conv1.bias``, ``bn1.running_var``, ...).
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.x accepts IR <= 9/10 depending on version; 8 is safe everywhere
BATCH = "N"  # symbolic batch dim of every model
SEQ = "T"  # symbolic sequence length of the token models

Dim = Union[int, str]
Ints = Union[int, Sequence[int]]


# Ops whose output has the same dim 1 as their first input (for Builder's channel tracking).
_KEEPS_CHANNELS = {"Relu", "Clip", "LeakyRelu", "BatchNormalization", "MaxPool", "Add", "Mul",
                   "Sigmoid", "Tanh", "Exp", "Softmax", "GlobalAveragePool", "Resize"}


def _pair(v: Ints) -> List[int]:
    return [v, v] if isinstance(v, int) else list(v)


class Builder:
    """Accumulates nodes and initializers; each layer method returns its output tensor's name.

    A node's output tensor is named like the node itself, so graphs read like their PyTorch
    module trees. The number of channels (dim 1) of every tensor is tracked so layer calls only
    state what changes (``conv(x, 64, 3)``, not ``conv(x, 32, 64, 3)``).
    """

    def __init__(self, seed: int = 0, constant_weights: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.constant_weights = constant_weights  # emit weights as Constant nodes (PyTorch style)
        self.nodes: List[NodeProto] = []
        self.initializers: List[TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.channels: Dict[str, int] = {}
        self._node_names: set = set()
        self._tensor_names: set = set()
        self._counts: Dict[str, int] = {}

    # ---------------------------------------------------------------- plumbing

    def _name(self, name: Optional[str], prefix: str) -> str:
        """``name``, or a fresh auto name (relu1, relu2, ...); :meth:`op` claims it."""
        if name is not None:
            return name
        n = self._counts.get(prefix, 0)
        while f"{prefix}{n + 1}" in self._node_names:
            n += 1
        self._counts[prefix] = n + 1
        return f"{prefix}{n + 1}"

    def tensor(self, name: str, value: np.ndarray) -> str:
        """Add a constant tensor (initializer, or Constant node in constant-weights mode)."""
        if name in self._tensor_names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._tensor_names.add(name)
        value = np.asarray(value)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        t = numpy_helper.from_array(value, name)
        if self.constant_weights and value.dtype == np.float32:
            self._node_names.add(name)
            self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=t))
        else:
            self.initializers.append(t)
        return name

    def ints(self, name: str, values: Sequence[int]) -> str:
        """An int64 1-D initializer (shapes, axes, split sizes): never a Constant node."""
        if name in self._tensor_names:
            return name  # shared, e.g. one axes tensor for many Squeezes
        self._tensor_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: Optional[str] = None,
           n_out: int = 1, channels: Optional[int] = None, out_names: Optional[List[str]] = None,
           **attrs) -> Union[str, List[str]]:
        """Append a node; single-output nodes name their output after themselves."""
        name = self._name(name, op_type.lower())
        if name in self._node_names:
            raise ValueError(f"duplicate node name {name!r}")
        self._node_names.add(name)
        outs = out_names or ([name] if n_out == 1 else [f"{name}.{i}" for i in range(n_out)])
        for o in outs:
            if o:
                self._tensor_names.add(o)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        if channels is None and op_type in _KEEPS_CHANNELS and inputs[0] in self.channels:
            channels = self.channels[inputs[0]]
        if channels is not None:
            for o in outs:
                self.channels[o] = channels
        return outs[0] if len(outs) == 1 else outs

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        a = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        a *= np.float32(std)  # in place: vgg_fc's 100M-element matrices would double memory
        return a

    def he(self, shape: Sequence[int], fan_in: int, gain: float = 2.0) -> np.ndarray:
        """He init: Var(w) = gain / fan_in keeps E[x^2] constant through ReLU layers."""
        return self.normal(shape, np.sqrt(gain / fan_in))

    def bias(self, n: int, std: float = 0.05) -> np.ndarray:
        return self.normal((n,), std)

    # ---------------------------------------------------------------- graph I/O

    def input(self, name: str, shape: Sequence[Dim], elem_type: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        self._tensor_names.add(name)
        if len(shape) >= 2 and isinstance(shape[1], int):
            self.channels[name] = shape[1]
        return name

    def output(self, tensor: str, name: str, shape: Sequence[Dim],
               elem_type: int = TensorProto.FLOAT) -> str:
        """Declare a graph output, renaming ``tensor`` to ``name`` (e.g. ``fc2`` -> ``logits``)."""
        if tensor != name:
            for node in self.nodes:
                for i, t in enumerate(node.input):
                    if t == tensor:
                        node.input[i] = name
                for i, t in enumerate(node.output):
                    if t == tensor:
                        node.output[i] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def model(self, graph_name: str, doc: str = "") -> ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  initializer=self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dcrt-zoo", doc_string=doc)
        m.ir_version = IR_VERSION
        return m

    # ---------------------------------------------------------------- layers

    def conv(self, x: str, cout: int, k: Ints, stride: Ints = 1, pad: Optional[Ints] = None,
             group: int = 1, bias: bool = True, name: Optional[str] = None,
             gain: float = 2.0) -> str:
        name = self._name(name, "conv")
        cin = self.channels[x]
        kh, kw = _pair(k)
        if pad is None:
            pad = [kh // 2, kw // 2, kh // 2, kw // 2]  # "same" for odd kernels at stride 1
        elif isinstance(pad, int):
            pad = [pad] * 4
        elif len(pad) == 2:
            pad = [pad[0], pad[1], pad[0], pad[1]]
        w = self.tensor(f"{name}.weight", self.he((cout, cin // group, kh, kw),
                                                  cin // group * kh * kw, gain))
        inputs = [x, w] + ([self.tensor(f"{name}.bias", self.bias(cout))] if bias else [])
        return self.op("Conv", inputs, name, channels=cout, kernel_shape=[kh, kw],
                       strides=_pair(stride), pads=list(pad), group=group)

    def conv_transpose(self, x: str, cout: int, k: int, stride: int, pad: int,
                       bias: bool = False, name: Optional[str] = None) -> str:
        name = self._name(name, "deconv")
        cin = self.channels[x]
        # Each output pixel sums cin * (k/stride)^2 products, which is the effective fan-in.
        fan_in = cin * max(1, (k // stride) ** 2)
        w = self.tensor(f"{name}.weight", self.he((cin, cout, k, k), fan_in))
        inputs = [x, w] + ([self.tensor(f"{name}.bias", self.bias(cout))] if bias else [])
        return self.op("ConvTranspose", inputs, name, channels=cout, kernel_shape=[k, k],
                       strides=[stride, stride], pads=[pad] * 4)

    def bn(self, x: str, name: Optional[str] = None, gamma: Tuple[float, float] = (0.6, 1.4),
           eps: float = 1e-5) -> str:
        """Inference BatchNormalization with random but well-conditioned statistics."""
        name = self._name(name, "bn")
        c = self.channels[x]
        r = self.rng
        params = [
            self.tensor(f"{name}.weight", r.uniform(*gamma, c).astype(np.float32)),
            self.tensor(f"{name}.bias", r.normal(0.0, 0.1, c).astype(np.float32)),
            self.tensor(f"{name}.running_mean", r.normal(0.0, 0.1, c).astype(np.float32)),
            self.tensor(f"{name}.running_var", r.uniform(0.6, 1.4, c).astype(np.float32)),
        ]
        return self.op("BatchNormalization", [x] + params, name, epsilon=eps, momentum=0.9)

    def relu(self, x: str, name: Optional[str] = None) -> str:
        return self.op("Relu", [x], name)

    def relu6(self, x: str, name: Optional[str] = None) -> str:
        """ReLU6 the way PyTorch exports it: Clip with min/max as (shared) initializer inputs."""
        if "relu6.min" not in self._tensor_names:
            self._tensor_names.update(["relu6.min", "relu6.max"])
            self.initializers += [numpy_helper.from_array(np.float32(0.0), "relu6.min"),
                                  numpy_helper.from_array(np.float32(6.0), "relu6.max")]
        return self.op("Clip", [x, "relu6.min", "relu6.max"], name or self._name(None, "relu6_"))

    def leaky(self, x: str, alpha: float = 0.1, name: Optional[str] = None) -> str:
        return self.op("LeakyRelu", [x], name, alpha=alpha)

    def act(self, x: str, kind: Optional[str], name: Optional[str] = None) -> str:
        if kind is None:
            return x
        return {"relu": self.relu, "relu6": self.relu6, "leaky": self.leaky}[kind](x, name=name)

    def conv_bn(self, x: str, cout: int, k: Ints, stride: Ints = 1, pad: Optional[Ints] = None,
                group: int = 1, act: Optional[str] = "relu", name: Optional[str] = None,
                gamma: Tuple[float, float] = (0.6, 1.4), gain: float = 2.0) -> str:
        """Conv (no bias: BN follows) -> BN -> activation.

        Nodes are ``name``, ``name.bn`` and ``name.<act>``.
        """
        name = self._name(name, "conv")
        y = self.conv(x, cout, k, stride, pad, group, bias=False, name=name, gain=gain)
        y = self.bn(y, name=f"{name}.bn", gamma=gamma)
        return self.act(y, act, name=f"{name}.{act}") if act else y

    def maxpool(self, x: str, k: Ints, stride: Optional[Ints] = None, pad: Ints = 0,
                name: Optional[str] = None) -> str:
        pads = [pad] * 4 if isinstance(pad, int) else list(pad)
        return self.op("MaxPool", [x], name or self._name(None, "pool"), kernel_shape=_pair(k),
                       strides=_pair(stride if stride is not None else k), pads=pads)

    def gap(self, x: str, name: Optional[str] = None) -> str:
        return self.op("GlobalAveragePool", [x], name or self._name(None, "avgpool"))

    def flatten(self, x: str, features: Optional[int] = None, name: Optional[str] = None) -> str:
        """Flatten to [N, features]; pass ``features`` when spatial dims are folded in."""
        return self.op("Flatten", [x], name, axis=1,
                       channels=features if features is not None else self.channels.get(x))

    def gemm(self, x: str, out: int, name: Optional[str] = None, gain: float = 2.0,
             bias: bool = True) -> str:
        """Fully connected layer, PyTorch layout: W [out, in], transB=1."""
        name = self._name(name, "fc")
        fin = self.channels[x]
        inputs = [x, self.tensor(f"{name}.weight", self.he((out, fin), fin, gain))]
        if bias:
            inputs.append(self.tensor(f"{name}.bias", self.bias(out)))
        return self.op("Gemm", inputs, name, channels=out, transB=1)

    def add(self, a: str, b: str, name: Optional[str] = None) -> str:
        return self.op("Add", [a, b], name)

    def reshape(self, x: str, shape: Sequence[int], name: Optional[str] = None,
                channels: Optional[int] = None) -> str:
        name = self._name(name, "reshape")
        return self.op("Reshape", [x, self.ints(f"{name}.shape", shape)], name, channels=channels)

    def transpose(self, x: str, perm: Sequence[int], name: Optional[str] = None,
                  channels: Optional[int] = None) -> str:
        return self.op("Transpose", [x], name, perm=list(perm), channels=channels)

    def squeeze(self, x: str, axes: Sequence[int], name: Optional[str] = None,
                channels: Optional[int] = None) -> str:
        """Squeeze with axes as an input tensor (opset 13+)."""
        axes_t = self.ints("axes_" + "_".join(str(a) for a in axes), axes)
        return self.op("Squeeze", [x, axes_t], name, channels=channels)

    def lstm(self, x: str, input_size: int, hidden: int, name: str,
             direction: str = "forward") -> Tuple[str, str]:
        """ONNX LSTM (gate order i,o,f,c); returns (Y [T, D, N, H], Y_h [D, N, H])."""
        return self._rnn("LSTM", 4, x, input_size, hidden, name, direction)

    def gru(self, x: str, input_size: int, hidden: int, name: str,
            direction: str = "forward") -> Tuple[str, str]:
        """ONNX GRU (gate order z,r,h), linear_before_reset=1 as PyTorch exports it."""
        return self._rnn("GRU", 3, x, input_size, hidden, name, direction, linear_before_reset=1)

    def _rnn(self, op_type: str, gates: int, x: str, input_size: int, hidden: int, name: str,
             direction: str, **attrs) -> Tuple[str, str]:
        d = 2 if direction == "bidirectional" else 1
        # Unit-variance gate pre-activations (Var(w) = 1/fan_in): PyTorch's U(+-1/sqrt(H)) default
        # leaves hidden states ~0.1 and the classifier's softmax nearly uniform.
        u = lambda a, *shape: self.rng.uniform(-a, a, shape).astype(np.float32)  # noqa: E731
        g = gates * hidden
        inputs = [x,
                  self.tensor(f"{name}.W", u(np.sqrt(3 / input_size), d, g, input_size)),
                  self.tensor(f"{name}.R", u(np.sqrt(3 / hidden), d, g, hidden)),
                  self.tensor(f"{name}.B", u(1 / np.sqrt(hidden), d, 2 * gates * hidden))]
        y, y_h = self.op(op_type, inputs, name, out_names=[f"{name}.Y", f"{name}.Y_h"],
                         hidden_size=hidden, direction=direction, **attrs)
        return y, y_h


# ==================================================================== models


def lenet5(seed: int = 0) -> ModelProto:
    """Caffe LeNet-5 (the Deep Compression paper's variant): 431,080 parameters."""
    b = Builder(seed)
    x = b.input("input", [BATCH, 1, 28, 28])
    x = b.maxpool(b.conv(x, 20, 5, pad=0, name="conv1"), 2, name="pool1")  # 24 -> 12
    x = b.maxpool(b.conv(x, 50, 5, pad=0, name="conv2"), 2, name="pool2")  # 8 -> 4
    x = b.flatten(x, 50 * 4 * 4, name="flatten")
    x = b.relu(b.gemm(x, 500, name="fc1"), name="relu1")
    x = b.gemm(x, 10, name="fc2", gain=1.0)
    b.output(x, "logits", [BATCH, 10])
    return b.model("lenet5", "LeNet-5 (Caffe), 431k params")


def lenet_300_100(seed: int = 0) -> ModelProto:
    """LeNet-300-100 MLP: 266,610 parameters."""
    b = Builder(seed)
    x = b.input("input", [BATCH, 784])
    b.channels[x] = 784
    x = b.relu(b.gemm(x, 300, name="fc1"), name="relu1")
    x = b.relu(b.gemm(x, 100, name="fc2"), name="relu2")
    x = b.gemm(x, 10, name="fc3", gain=1.0)
    b.output(x, "logits", [BATCH, 10])
    return b.model("lenet_300_100", "LeNet-300-100 MLP")


def _basic_block(b: Builder, x: str, cout: int, stride: int, prefix: str) -> str:
    """ResNet basic block. The last BN's gamma is small (as after training, and like
    zero-init-residual) so the residual sum does not grow activations block after block."""
    y = b.conv_bn(x, cout, 3, stride, name=f"{prefix}.conv1")
    y = b.conv_bn(y, cout, 3, 1, act=None, name=f"{prefix}.conv2", gamma=(0.2, 0.5))
    if stride != 1 or b.channels[x] != cout:
        x = b.conv_bn(x, cout, 1, stride, pad=0, act=None, name=f"{prefix}.downsample",
                      gamma=(0.4, 0.8))
    return b.relu(b.add(y, x, name=f"{prefix}.add"), name=f"{prefix}.relu")


def _bottleneck(b: Builder, x: str, width: int, stride: int, prefix: str) -> str:
    """ResNet-50 v1.5 bottleneck (stride on the 3x3 conv), expansion 4."""
    cout = width * 4
    y = b.conv_bn(x, width, 1, 1, pad=0, name=f"{prefix}.conv1")
    y = b.conv_bn(y, width, 3, stride, name=f"{prefix}.conv2")
    y = b.conv_bn(y, cout, 1, 1, pad=0, act=None, name=f"{prefix}.conv3", gamma=(0.2, 0.5))
    if stride != 1 or b.channels[x] != cout:
        x = b.conv_bn(x, cout, 1, stride, pad=0, act=None, name=f"{prefix}.downsample",
                      gamma=(0.4, 0.8))
    return b.relu(b.add(y, x, name=f"{prefix}.add"), name=f"{prefix}.relu")


def resnet_small(seed: int = 0) -> ModelProto:
    """A CIFAR-sized ResNet: stem, two identity blocks, one stride-2 projection block, FC-10."""
    b = Builder(seed)
    x = b.input("input", [BATCH, 3, 32, 32])
    x = b.conv_bn(x, 16, 3, name="conv1")
    x = _basic_block(b, x, 16, 1, "block1")
    x = _basic_block(b, x, 16, 1, "block2")
    x = _basic_block(b, x, 32, 2, "block3")
    x = b.flatten(b.gap(x, name="avgpool"), name="flatten")
    x = b.gemm(x, 10, name="fc", gain=1.0)
    b.output(x, "logits", [BATCH, 10])
    return b.model("resnet_small", "CIFAR-style ResNet with BatchNormalization and a projection")


def _token_classifier(kind: str, hidden: int, seed: int) -> ModelProto:
    b = Builder(seed)
    tokens = b.input("tokens", [BATCH, SEQ], TensorProto.INT64)
    emb = b.tensor("embedding.weight", b.normal((1000, 64), 1.0))
    x = b.op("Gather", [emb, tokens], "embedding", axis=0, channels=64)  # [N, T, 64]
    x = b.transpose(x, [1, 0, 2], name="to_time_major")  # [T, N, 64]: ONNX RNNs are time-major
    rnn = b.lstm if kind == "lstm" else b.gru
    _, y_h = rnn(x, 64, hidden, name=kind)  # Y_h [1, N, H]
    x = b.squeeze(y_h, [0], name="squeeze", channels=hidden)  # [N, H]
    x = b.gemm(x, 2, name="fc", gain=8.0)  # LSTM hidden states are small: |h| ~ 0.2-0.4
    x = b.op("Softmax", [x], "softmax", axis=-1)
    b.output(x, "probs", [BATCH, 2])
    return b.model(f"{kind}_classifier", f"embedding + {kind.upper()} sentiment classifier")


def lstm_classifier(seed: int = 0) -> ModelProto:
    """Token ids [N, T] -> embedding [1000, 64] -> LSTM(128) -> last hidden -> FC-2 -> Softmax."""
    return _token_classifier("lstm", 128, seed)


def gru_classifier(seed: int = 0) -> ModelProto:
    """Like :func:`lstm_classifier` with a GRU(96), linear_before_reset=1."""
    return _token_classifier("gru", 96, seed)


def dcgan_generator(seed: int = 0) -> ModelProto:
    """DCGAN generator: z [N, 100] -> image [N, 3, 32, 32] via three stride-2 ConvTransposes."""
    b = Builder(seed)
    z = b.input("z", [BATCH, 100])
    b.channels[z] = 100
    x = b.gemm(z, 256 * 4 * 4, name="fc", gain=1.0)
    x = b.reshape(x, [-1, 256, 4, 4], name="reshape", channels=256)
    x = b.relu(b.bn(x, name="bn0"), name="relu0")
    for i, c in enumerate([128, 64], start=1):  # 4 -> 8 -> 16
        x = b.conv_transpose(x, c, 4, 2, 1, name=f"deconv{i}")
        x = b.relu(b.bn(x, name=f"bn{i}"), name=f"relu{i}")
    x = b.conv_transpose(x, 3, 4, 2, 1, bias=True, name="deconv3")  # 16 -> 32
    x = b.op("Tanh", [x], "tanh")
    b.output(x, "image", [BATCH, 3, 32, 32])
    return b.model("dcgan_generator", "DCGAN generator with ConvTranspose and BatchNormalization")


def resnet18(width: int = 64, num_classes: int = 1000, size: int = 224,
             seed: int = 0) -> ModelProto:
    """ResNet-18 (torchvision topology and names); 11.7M parameters at the defaults."""
    b = Builder(seed)
    x = b.input("input", [BATCH, 3, size, size])
    x = b.conv_bn(x, width, 7, 2, pad=3, name="conv1")
    x = b.maxpool(x, 3, 2, pad=1, name="maxpool")
    for stage in range(4):
        for blk in range(2):
            stride = 2 if stage > 0 and blk == 0 else 1
            x = _basic_block(b, x, width << stage, stride, f"layer{stage + 1}.{blk}")
    x = b.flatten(b.gap(x, name="avgpool"), name="flatten")
    x = b.gemm(x, num_classes, name="fc", gain=1.0)
    b.output(x, "logits", [BATCH, num_classes])
    return b.model("resnet18", f"ResNet-18 width={width} size={size}")


def resnet50(width: int = 64, size: int = 224, num_classes: int = 1000,
             seed: int = 0) -> ModelProto:
    """ResNet-50 v1.5 with bottleneck blocks; 25.6M parameters (~100 MB) at the defaults."""
    b = Builder(seed)
    x = b.input("input", [BATCH, 3, size, size])
    x = b.conv_bn(x, width, 7, 2, pad=3, name="conv1")
    x = b.maxpool(x, 3, 2, pad=1, name="maxpool")
    for stage, blocks in enumerate([3, 4, 6, 3]):
        for blk in range(blocks):
            stride = 2 if stage > 0 and blk == 0 else 1
            x = _bottleneck(b, x, width << stage, stride, f"layer{stage + 1}.{blk}")
    x = b.flatten(b.gap(x, name="avgpool"), name="flatten")
    x = b.gemm(x, num_classes, name="fc", gain=1.0)
    b.output(x, "logits", [BATCH, num_classes])
    return b.model("resnet50", f"ResNet-50 width={width} size={size}")


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding, so width_mult gives the reference channel counts."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, size: int = 224,
                 seed: int = 0) -> ModelProto:
    """MobileNetV2 (torchvision config): 3.5M parameters at the defaults."""
    b = Builder(seed)
    x = b.input("input", [BATCH, 3, size, size])
    cin = _make_divisible(32 * width_mult)
    last = _make_divisible(1280 * max(1.0, width_mult))
    x = b.conv_bn(x, cin, 3, 2, act="relu6", name="features.0")
    idx = 1
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        cout = _make_divisible(c * width_mult)
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}"
            y = x
            hidden = cin * t
            if t != 1:
                y = b.conv_bn(y, hidden, 1, pad=0, act="relu6", name=f"{p}.expand")
            y = b.conv_bn(y, hidden, 3, stride, group=hidden, act="relu6", name=f"{p}.dw")
            use_res = stride == 1 and cin == cout
            # Linear bottleneck; a smaller gamma on residual blocks keeps the sum O(1).
            y = b.conv_bn(y, cout, 1, pad=0, act=None, name=f"{p}.project",
                          gamma=(0.3, 0.6) if use_res else (0.6, 1.4))
            x = b.add(y, x, name=f"{p}.add") if use_res else y
            cin = cout
            idx += 1
    x = b.conv_bn(x, last, 1, pad=0, act="relu6", name=f"features.{idx}")
    x = b.flatten(b.gap(x, name="avgpool"), name="flatten")
    x = b.gemm(x, num_classes, name="classifier", gain=1.0)
    b.output(x, "logits", [BATCH, num_classes])
    return b.model("mobilenet_v2", f"MobileNetV2 width_mult={width_mult} size={size}")


# YOLOv3-tiny anchors (pixels at 416), per head: stride 32 head, stride 16 head.
_YOLO_ANCHORS = {32: [(81, 82), (135, 169), (344, 319)], 16: [(10, 14), (23, 27), (37, 58)]}


def _yolo_decode(b: Builder, raw: str, grid: int, stride: int, num_classes: int,
                 p: str) -> str:
    """Decode a YOLO head [N, 3*(5+C), g, g] -> [N, 3, 5+C, g, g] with boxes normalised to [0, 1]:
    xy = (sigmoid(t_xy) + cell) / g, wh = exp(t_wh) * anchor / 416, obj/cls = sigmoid."""
    k = 5 + num_classes
    x = b.reshape(raw, [-1, 3, k, grid, grid], name=f"{p}.reshape")
    split = b.ints(f"{p}.split_sizes", [2, 2, 1, num_classes])
    xy, wh, obj, cls = b.op("Split", [x, split], f"{p}.split", n_out=4, axis=2)
    cells = np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), 0)  # [2 (x, y), g, g]
    cell = b.tensor(f"{p}.grid", cells.reshape(1, 1, 2, grid, grid).astype(np.float32))
    inv_g = b.tensor(f"{p}.inv_grid", np.array([1.0 / grid], np.float32))
    anchors = np.array(_YOLO_ANCHORS[stride], np.float32).reshape(1, 3, 2, 1, 1) / 416.0
    xy = b.op("Mul", [b.add(b.op("Sigmoid", [xy], f"{p}.xy_sigmoid"), cell, name=f"{p}.xy_add"),
                      inv_g], f"{p}.xy")
    wh = b.op("Mul", [b.op("Exp", [wh], f"{p}.wh_exp"), b.tensor(f"{p}.anchors", anchors)],
              f"{p}.wh")
    obj = b.op("Sigmoid", [obj], f"{p}.obj")
    cls = b.op("Sigmoid", [cls], f"{p}.cls")
    return b.op("Concat", [xy, wh, obj, cls], f"{p}.decoded", axis=2)


def tiny_yolo(size: int = 160, num_classes: int = 20, seed: int = 0) -> ModelProto:
    """YOLOv3-tiny-like detector (VOC: 20 classes): two heads at strides 32 and 16.

    Outputs ``boxes32`` [N, 3, 25, size/32, size/32] and ``boxes16`` [N, 3, 25, size/16, size/16].
    """
    if size % 32:
        raise ValueError("tiny_yolo size must be a multiple of 32")
    b = Builder(seed)
    x = b.input("input", [BATCH, 3, size, size])
    cb = partial(b.conv_bn, act="leaky")
    for i, c in enumerate([16, 32, 64, 128, 256]):
        # Gain 1.2, not He's 2, before each 2x2 max-pool: the max of 4 raises the RMS ~1.7x.
        x = cb(x, c, 3, name=f"conv{i}", gain=1.2)
        if c == 256:
            route = x  # stride-16 features for the second head
        x = b.maxpool(x, 2, name=f"pool{i}")
    x = cb(x, 512, 3, name="conv5", gain=1.2)
    x = b.maxpool(x, 2, 1, pad=[0, 0, 1, 1], name="pool5")  # darknet's size-preserving pool
    x = cb(x, 1024, 3, name="conv6")
    x = cb(x, 256, 1, pad=0, name="conv7")
    head = b.conv(cb(x, 512, 3, name="conv8"), 3 * (5 + num_classes), 1, pad=0,
                  name="head32", gain=0.2)  # small gain: head outputs feed Exp
    y = cb(x, 128, 1, pad=0, name="conv9")
    scales = b.tensor("upsample.scales", np.array([1, 1, 2, 2], np.float32))
    y = b.op("Resize", [y, "", scales], "upsample", mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    y = b.op("Concat", [y, route], "route", axis=1, channels=128 + 256)
    head2 = b.conv(cb(y, 256, 3, name="conv10"), 3 * (5 + num_classes), 1, pad=0,
                   name="head16", gain=0.2)
    g = size // 32
    k = 5 + num_classes
    b.output(_yolo_decode(b, head, g, 32, num_classes, "yolo32"), "boxes32",
             [BATCH, 3, k, g, g])
    b.output(_yolo_decode(b, head2, 2 * g, 16, num_classes, "yolo16"), "boxes16",
             [BATCH, 3, k, 2 * g, 2 * g])
    return b.model("tiny_yolo", f"YOLOv3-tiny-like detector size={size}")


def crnn_seq_len(width: int = 100) -> int:
    """Sequence length T that :func:`crnn` produces for an input of the given width."""
    return width // 4 - 1


def crnn(height: int = 32, width: int = 100, num_classes: int = 37, hidden: int = 256,
         seed: int = 0) -> ModelProto:
    """CRNN text recogniser (Shi et al.): conv stack -> [T, N, C] -> 2 BiLSTMs -> per-step softmax.

    Output ``probs`` [T, N, num_classes] with T = width // 4 - 1.
    """
    if height != 32:
        raise ValueError("crnn expects height 32 (the conv stack reduces it to exactly 1)")
    b = Builder(seed)
    x = b.input("image", [BATCH, 1, height, width])
    # Gain 1.2 before each max-pool, which raises the RMS (max of 2 or 4 values).
    x = b.maxpool(b.conv_bn(x, 64, 3, name="conv0", gain=1.2), 2, name="pool0")  # 16 x W/2
    x = b.maxpool(b.conv_bn(x, 128, 3, name="conv1", gain=1.2), 2, name="pool1")  # 8 x W/4
    x = b.conv_bn(x, 256, 3, name="conv2")
    x = b.conv_bn(x, 256, 3, name="conv3", gain=1.2)
    x = b.maxpool(x, (2, 1), (2, 1), name="pool2")  # 4 x W/4: keep horizontal resolution
    x = b.conv_bn(x, 512, 3, name="conv4")
    x = b.conv_bn(x, 512, 3, name="conv5", gain=1.2)
    x = b.maxpool(x, (2, 1), (2, 1), name="pool3")  # 2 x W/4
    x = b.conv_bn(x, 512, 2, pad=0, name="conv6")  # 1 x (W/4 - 1)
    x = b.squeeze(x, [2], name="squeeze", channels=512)  # [N, 512, T]
    x = b.transpose(x, [2, 0, 1], name="to_seq", channels=512)  # [T, N, 512]
    fin = 512
    for i, fout in enumerate([hidden, num_classes]):
        y, _ = b.lstm(x, fin, hidden, name=f"rnn{i}", direction="bidirectional")  # [T, 2, N, H]
        y = b.transpose(y, [0, 2, 1, 3], name=f"rnn{i}.transpose")  # [T, N, 2, H]
        y = b.reshape(y, [0, 0, 2 * hidden], name=f"rnn{i}.concat")  # [T, N, 2H]
        w = b.tensor(f"rnn{i}.embedding.weight", b.he((2 * hidden, fout), 2 * hidden, 4.0))
        y = b.op("MatMul", [y, w], f"rnn{i}.embedding")
        x = b.add(y, b.tensor(f"rnn{i}.embedding.bias", b.bias(fout)), name=f"rnn{i}.add")
        fin = fout
    x = b.op("Softmax", [x], "softmax", axis=-1)
    b.output(x, "probs", [crnn_seq_len(width), BATCH, num_classes])
    return b.model("crnn", f"CRNN {height}x{width}, {num_classes} classes")


def vgg_fc(scale: float = 1.0, seed: int = 0) -> ModelProto:
    """VGG-16's classifier head (fc6, fc7, fc8) on a flattened pool5 input.

    All dims are multiplied by ``scale``; at 1.0 it is 124M parameters (~500 MB), the bulk of
    VGG-16 and the paper's headline compression case.
    """
    d_in, d_h, d_out = (max(1, int(round(d * scale))) for d in (25088, 4096, 1000))
    b = Builder(seed)
    x = b.input("input", [BATCH, d_in])
    b.channels[x] = d_in
    x = b.relu(b.gemm(x, d_h, name="fc6"), name="relu6")
    x = b.relu(b.gemm(x, d_h, name="fc7"), name="relu7")
    x = b.gemm(x, d_out, name="fc8", gain=1.0)
    b.output(x, "logits", [BATCH, d_out])
    return b.model("vgg_fc", f"VGG-16 fc6-fc8 scale={scale}")


def with_constant_weights(seed: int = 0) -> ModelProto:
    """A small CNN whose weights are ``Constant`` nodes, as the PyTorch exporter sometimes emits."""
    b = Builder(seed, constant_weights=True)
    x = b.input("input", [BATCH, 1, 28, 28])
    x = b.relu(b.conv(x, 8, 3, name="conv1"), name="relu1")
    x = b.maxpool(x, 2, name="pool1")  # 14 x 14
    x = b.flatten(x, 8 * 14 * 14, name="flatten")
    x = b.relu(b.gemm(x, 32, name="fc1"), name="relu2")
    x = b.gemm(x, 10, name="fc2", gain=1.0)
    b.output(x, "logits", [BATCH, 10])
    return b.model("with_constant_weights", "CNN with weights in Constant nodes")


def _kmeans_1d(values: np.ndarray, k: int, iters: int = 30) -> np.ndarray:
    """1-D k-means with Deep Compression's linear initialisation; returns sorted centroids."""
    v = np.sort(values.astype(np.float64))
    k = max(1, min(k, len(v)))
    c = np.linspace(v[0], v[-1], k)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
        counts = np.bincount(idx, minlength=k)
        sums = np.bincount(idx, weights=v, minlength=k)
        nz = counts > 0
        new = c.copy()
        new[nz] = sums[nz] / counts[nz]  # empty clusters keep their centroid
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def prune_and_cluster(w: np.ndarray, sparsity: float, bits: int) -> np.ndarray:
    """Magnitude-prune ``w`` to ``sparsity`` and cluster survivors to <= 2**bits - 1 values.

    Positive and negative weights are clustered separately, so no centroid can land at (or
    cross) zero: the result has exactly the requested zeros and keeps every survivor's sign.
    Survivors are rescaled to the dense norm first, as retraining after pruning would.
    """
    flat = w.astype(np.float32).ravel()
    keep = int(round((1.0 - sparsity) * flat.size))
    out = np.zeros_like(flat)
    if keep == 0:
        return out.reshape(w.shape)
    idx = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:]
    kept = flat[idx] * (np.linalg.norm(flat) / np.linalg.norm(flat[idx]))
    k = 2 ** bits - 1
    neg = kept < 0
    # Split the codebook between signs in proportion to their counts, each sign getting >= 1.
    k_neg = min(max(round(k * neg.mean()), int(neg.any())), k - int((~neg).any()))
    for mask, kk in ((neg, k_neg), (~neg, k - k_neg)):
        if mask.any():
            c = _kmeans_1d(kept[mask], kk).astype(np.float32)
            bounds = (c[1:].astype(np.float64) + c[:-1]) / 2
            out[idx[mask]] = c[np.searchsorted(bounds, kept[mask])]
    return out.reshape(w.shape)


def pruned_clustered_mlp(sparsity: float = 0.9, bits: int = 5, seed: int = 0) -> ModelProto:
    """LeNet-300-100 with Gemm weights already pruned and weight-shared (biases stay dense)."""
    m = lenet_300_100(seed)
    for init in m.graph.initializer:
        if init.name.endswith(".weight"):
            w = prune_and_cluster(numpy_helper.to_array(init), sparsity, bits)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    m.graph.name = "pruned_clustered_mlp"
    m.doc_string = f"LeNet-300-100 pruned to {sparsity:.0%} and clustered to {bits} bits"
    return m


# ==================================================================== helpers


def save_with_external_data(model: ModelProto, path: Union[str, os.PathLike]) -> Path:
    """Save ``model`` to ``path`` with every initializer in ``<stem>.data`` beside it.

    Works on a copy because onnx's conversion strips raw data out of the proto in place, and
    removes a stale data file first: onnx 1.23 refuses to overwrite one (older versions append).
    """
    path = Path(path)
    data = path.with_name(path.stem + ".data")
    if data.exists():
        data.unlink()
    m = ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0)
    return path


def count_params(model: ModelProto) -> int:
    """Number of floating-point weights (initializers and Constant-node tensors)."""
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats)


def sample_input(model: ModelProto, batch: int = 1, seed: int = 0,
                 seq_len: int = 16) -> Dict[str, np.ndarray]:
    """A valid random feed for ``model``'s graph inputs.

    Floats are standard normal, integer inputs are token ids in [0, 1000). Symbolic dims:
    ``N`` -> ``batch``, ``T`` -> ``seq_len``, any other -> 1.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append({BATCH: batch, SEQ: seq_len}.get(d.dim_param, 1))
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.integer):
            feed[vi.name] = rng.integers(0, 1000, size=shape).astype(dtype)
        else:
            feed[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feed


# ==================================================================== registry

# Small enough to build, check and run in well under a second each.
SMALL: Dict[str, Callable[[], ModelProto]] = {
    "lenet5": lenet5,
    "lenet_300_100": lenet_300_100,
    "resnet_small": resnet_small,
    "lstm_classifier": lstm_classifier,
    "gru_classifier": gru_classifier,
    "dcgan_generator": dcgan_generator,
    "resnet18_tiny": partial(resnet18, width=8, num_classes=10, size=32),
    "mobilenet_v2_tiny": partial(mobilenet_v2, width_mult=0.25, num_classes=10, size=32),
    "resnet50_tiny": partial(resnet50, width=8, size=32, num_classes=10),
    "tiny_yolo": tiny_yolo,
    "crnn": crnn,
    "vgg_fc_small": partial(vgg_fc, scale=0.05),
    "with_constant_weights": with_constant_weights,
    "pruned_clustered_mlp": pruned_clustered_mlp,
}

# Full-size reference networks (tens to hundreds of MB): benchmarks only, never the default suite.
LARGE: Dict[str, Callable[[], ModelProto]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "resnet50": resnet50,
    "vgg_fc": vgg_fc,
}

ZOO: Dict[str, Callable[[], ModelProto]] = {**SMALL, **LARGE}
