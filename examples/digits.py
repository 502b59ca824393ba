"""Deep Compression on real handwritten digits: the seed-001 table, reproduced end to end.

    python examples/digits.py [--quick] [--models mlp,cnn] [--out examples/models/digits] [--no-finetune]

About 30 seconds on 2 cores once numba's kernels are cached (``--quick``: fewer epochs); numpy, onnx and
scikit-learn only.

1. Data: scikit-learn's digits (1,797 8x8 scans shipped inside the package, no download), each
   upsampled to 20x20 and centred in 28x28 like MNIST, so the networks are the paper's own
   LeNet-300-100 (266,610 weights) and Caffe LeNet-5 (431,080 weights). 70 % train, 30 % test.
2. Train both with a small numpy trainer (Adam, softmax cross-entropy) and export them to ONNX
   with ``onnx.helper``.
3. Compress with dcrt at the settings of seed 001: uncompressed (lossless ``.dcm``), quantized
   only, pruned only, pruned + quantized (the paper's per-layer pruning rates and bits), plus
   pruned + quantized with data-aware centroids (``dcrt.converters.calibrate``, least squares on
   256 training images), a plan chosen by ``dcrt.converters.budget`` for the paper's size (1/40,
   1/39 of the ONNX file) with data-aware centroids - and, unless ``--no-finetune``, the paper's
   retraining loop: iterative pruning with retraining under the mask, clustering, training of the
   shared centroids (gradients summed per cluster), export, convert (dcrt then keeps the clustered
   weights exactly).
4. Print the table: non-zero weights, .dcm size, gzip'd size, ratio against the ONNX file, test
   accuracy (run by ``dcrt.Session``), and the paper's 40x / 39x for comparison.
"""
from __future__ import annotations

import abc
import argparse
import gzip
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import dcrt

# -- the paper's settings (Han, Mao & Dally 2016, tables 2 and 3) -------------------------------------
# fraction of weights pruned and codebook bits per layer; LeNet-300-100 ~40x, LeNet-5 ~39x, no loss
PAPER = {
    "lenet_300_100": {"sparsity": {"fc1.weight": 0.92, "fc2.weight": 0.91, "fc3.weight": 0.74},
                      "bits": {"fc1.weight": 6, "fc2.weight": 6, "fc3.weight": 6},
                      "ratio": 40, "error": (1.64, 1.58)},
    "lenet5": {"sparsity": {"conv1.weight": 0.34, "conv2.weight": 0.88, "fc1.weight": 0.92, "fc2.weight": 0.81},
               "bits": {"conv1.weight": 8, "conv2.weight": 8, "fc1.weight": 5, "fc2.weight": 5},
               "ratio": 39, "error": (0.80, 0.74)},
}


# -- data ------------------------------------------------------------------------------------------


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear resampling as a matrix (pixel centres aligned): ``out = A @ in``."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    a = np.zeros((n_out, n_in), np.float32)
    for i, p in enumerate(np.clip(pos, 0, n_in - 1)):
        lo = int(np.floor(p))
        hi = min(lo + 1, n_in - 1)
        a[i, lo] += 1 - (p - lo)
        a[i, hi] += p - lo
    return a


def load_digits_28(test_fraction: float = 0.3, seed: int = 0) -> Tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)``: images ``[N, 1, 28, 28]`` in [0, 1], int64 labels.

    A stratified split (same class balance in both parts), fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    d = load_digits()
    a = _interp_matrix(20, 8)
    small = d.images.astype(np.float32) / 16.0
    big = np.einsum("ij,njk,lk->nil", a, small, a)          # 8x8 -> 20x20
    x = np.zeros((len(big), 1, 28, 28), np.float32)
    x[:, 0, 4:24, 4:24] = np.clip(big, 0.0, 1.0)             # centred like MNIST's 20x20 digits
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:int(round(test_fraction * len(idx)))]] = True
    return x[~test], y[~test], x[test], y[test]


# -- a small numpy trainer -------------------------------------------------------------------------


class Layer(abc.ABC):
    """A layer with named parameters; ``forward`` caches what ``backward`` needs."""

    params: Dict[str, np.ndarray] = {}
    input_grad = True        # False for the first layer: nobody needs the gradient of the images

    @abc.abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """The layer's output for ``x``."""

    @abc.abstractmethod
    def backward(self, g: np.ndarray) -> np.ndarray:
        """Accumulate the parameters' gradients from the output gradient ``g``; return the input's."""


class Dense(Layer):
    """``y = x @ W.T + b`` with ``W [out, in]`` (ONNX Gemm, transB=1, as PyTorch stores it)."""

    def __init__(self, name: str, n_in: int, n_out: int, rng: np.random.Generator):
        self.name = name
        self.params = {f"{name}.weight": (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32),
                       f"{name}.bias": np.zeros(n_out, np.float32)}
        self.grads: Dict[str, np.ndarray] = {}

    def forward(self, x):
        self.x = x
        return x @ self.params[f"{self.name}.weight"].T + self.params[f"{self.name}.bias"]

    def backward(self, g):
        self.grads = {f"{self.name}.weight": g.T @ self.x, f"{self.name}.bias": g.sum(0)}
        return g @ self.params[f"{self.name}.weight"] if self.input_grad else None


class Conv(Layer):
    """Valid 2-D convolution, stride 1, ``W [out, in, k, k]``, via im2col."""

    def __init__(self, name: str, c_in: int, c_out: int, k: int, rng: np.random.Generator):
        self.name, self.k = name, k
        fan_in = c_in * k * k
        weight = rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / fan_in)
        self.params = {f"{name}.weight": weight.astype(np.float32),
                       f"{name}.bias": np.zeros(c_out, np.float32)}
        self.grads: Dict[str, np.ndarray] = {}

    def forward(self, x):
        n, c, h, w = x.shape
        k = self.k
        self.shape = x.shape
        oh, ow = h - k + 1, w - k + 1
        cols = sliding_window_view(x, (k, k), axis=(2, 3))            # [N, C, OH, OW, k, k]
        self.cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * k * k)
        wm = self.params[f"{self.name}.weight"].reshape(len(self.params[f"{self.name}.bias"]), -1)
        y = self.cols @ wm.T + self.params[f"{self.name}.bias"]
        return y.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)

    def backward(self, g):
        n, c, h, w = self.shape
        k = self.k
        cout, oh, ow = g.shape[1], g.shape[2], g.shape[3]
        gm = g.transpose(0, 2, 3, 1).reshape(-1, cout)
        weight = self.params[f"{self.name}.weight"]
        self.grads = {f"{self.name}.weight": (gm.T @ self.cols).reshape(weight.shape),
                      f"{self.name}.bias": gm.sum(0)}
        if not self.input_grad:
            return None
        dcols = (gm @ weight.reshape(cout, -1)).reshape(n, oh, ow, c, k, k).transpose(0, 3, 4, 5, 1, 2)
        dx = np.zeros(self.shape, np.float32)
        for i in range(k):                      # col2im: scatter each tap back
            for j in range(k):
                dx[:, :, i:i + oh, j:j + ow] += dcols[:, :, i, j]
        return dx


class MaxPool2(Layer):
    """2x2 max pooling, stride 2."""

    def forward(self, x):
        n, c, h, w = x.shape
        blocks = x.reshape(n, c, h // 2, 2, w // 2, 2)
        y = blocks.max(axis=(3, 5))
        self.mask = blocks == y[:, :, :, None, :, None]
        return y

    def backward(self, g):
        n, c, h2, w2 = g.shape
        return (self.mask * g[:, :, :, None, :, None]).reshape(n, c, 2 * h2, 2 * w2).astype(np.float32)


class ReLU(Layer):
    def forward(self, x):
        self.on = x > 0
        return x * self.on

    def backward(self, g):
        return g * self.on


class Flatten(Layer):
    def forward(self, x):
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, g):
        return g.reshape(self.shape)


@dataclass
class Net:
    """A sequential network, its ONNX input shape and the layer list used to export it."""

    name: str
    layers: List[Layer]
    input_shape: List          # e.g. ["N", 784] or ["N", 1, 28, 28]

    @property
    def params(self) -> Dict[str, np.ndarray]:
        out: Dict[str, np.ndarray] = {}
        for layer in self.layers:
            out.update(layer.params)
        return out

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = x.reshape([len(x)] + [d for d in self.input_shape[1:]])
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def __post_init__(self) -> None:
        self.layers[0].input_grad = False

    def backward(self, g: np.ndarray) -> Dict[str, np.ndarray]:
        for layer in reversed(self.layers):
            g = layer.backward(g)
        grads: Dict[str, np.ndarray] = {}
        for layer in self.layers:
            grads.update(getattr(layer, "grads", {}))
        return grads

    def set(self, name: str, value: np.ndarray) -> None:
        for layer in self.layers:
            if name in layer.params:
                layer.params[name] = value.astype(np.float32)


def lenet_300_100(seed: int = 0) -> Net:
    """LeNet-300-100: 784-300-100-10 with ReLU (266,610 weights)."""
    rng = np.random.default_rng(seed)
    return Net("lenet_300_100", [Dense("fc1", 784, 300, rng), ReLU(), Dense("fc2", 300, 100, rng), ReLU(),
                                 Dense("fc3", 100, 10, rng)], ["N", 784])


def lenet5(seed: int = 0) -> Net:
    """Caffe LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, ReLU, fc 10 (431,080 weights)."""
    rng = np.random.default_rng(seed)
    return Net("lenet5", [Conv("conv1", 1, 20, 5, rng), MaxPool2(), Conv("conv2", 20, 50, 5, rng), MaxPool2(),
                          Flatten(), Dense("fc1", 800, 500, rng), ReLU(), Dense("fc2", 500, 10, rng)],
               ["N", 1, 28, 28])


def softmax_xent(logits: np.ndarray, y: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
    p[np.arange(len(y)), y] -= 1
    return loss, (p / len(y)).astype(np.float32)


class Adam:
    """Adam on a dict of arrays (the weights, or the shared centroids when fine-tuning them)."""

    def __init__(self, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999):
        self.lr, self.b1, self.b2, self.t = lr, b1, b2, 0
        self.m: Dict[str, np.ndarray] = {}
        self.v: Dict[str, np.ndarray] = {}

    def step(self, values: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, g in grads.items():
            m = self.m.setdefault(k, np.zeros_like(g))
            v = self.v.setdefault(k, np.zeros_like(g))
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            mhat = m / (1 - self.b1 ** self.t)
            vhat = v / (1 - self.b2 ** self.t)
            values[k] = (values[k] - self.lr * mhat / (np.sqrt(vhat) + 1e-8)).astype(np.float32)


@dataclass
class Shared:
    """Weight sharing of one layer: ``W = codebook[labels]`` where kept, 0 where pruned."""

    labels: np.ndarray         # int, -1 where pruned
    codebook: np.ndarray

    def weight(self) -> np.ndarray:
        w = np.zeros(self.labels.shape, np.float32)
        kept = self.labels >= 0
        w[kept] = self.codebook[self.labels[kept]]
        return w


def train(net: Net, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 1e-3, batch: int = 64,
          seed: int = 0, masks: Optional[Dict[str, np.ndarray]] = None,
          shared: Optional[Dict[str, Shared]] = None, log: Optional[Callable[[str], None]] = None) -> None:
    """Minibatch Adam.

    ``masks``: pruned weights stay zero (their gradient is dropped, as in the paper's retraining).
    ``shared``: those layers train their centroids only: each centroid moves by the sum of the
    gradients of the weights that share it (the paper's "trained quantization").
    """
    with _one_blas_thread():
        _train(net, x, y, epochs, lr, batch, seed, masks, shared, log)


def _one_blas_thread():
    """Small matrices train faster on one BLAS thread, and far faster on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits   # installed with scikit-learn
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _train(net, x, y, epochs, lr, batch, seed, masks, shared, log) -> None:
    rng = np.random.default_rng(seed)
    opt = Adam(lr)
    values = net.params
    centroids = {k: s.codebook.astype(np.float32).copy() for k, s in (shared or {}).items()}
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss, g = softmax_xent(net.forward(x[idx]), y[idx])
            total += loss * len(idx)
            grads = net.backward(g)
            for k, mask in (masks or {}).items():
                grads[k] = grads[k] * mask
            ctr_grads = {}
            for k, s in (shared or {}).items():
                kept = s.labels >= 0
                ctr_grads[k] = np.bincount(s.labels[kept], weights=grads.pop(k)[kept],
                                           minlength=len(s.codebook)).astype(np.float32)
            opt.step(values, grads)
            if ctr_grads:
                opt.step(centroids, ctr_grads)
                for k, s in shared.items():
                    s.codebook = centroids[k]
                    values[k] = s.weight()
            for k, mask in (masks or {}).items():
                values[k] = values[k] * mask
            for k, v in values.items():
                net.set(k, v)
        if log:
            log(f"    epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")


def accuracy(net: Net, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.concatenate([net.forward(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]) == y))


def prune(net: Net, sparsity: Dict[str, float]) -> Dict[str, np.ndarray]:
    """Magnitude pruning: zero the smallest weights of each layer up to its sparsity; the keep-masks.

    Weights already zero stay zero, so calling it with rising rates prunes iteratively.
    """
    masks = {}
    for name, s in sparsity.items():
        w = net.params[name]
        drop = int(round(s * w.size))
        order = np.argsort(np.abs(w).ravel(), kind="stable")     # zeros first, then by magnitude
        mask = np.ones(w.size, np.float32)
        mask[order[:drop]] = 0.0
        masks[name] = mask.reshape(w.shape) * (w != 0)
        net.set(name, w * masks[name])
    return masks


def cluster(net: Net, bits: Dict[str, int]) -> Dict[str, Shared]:
    """k-means (dcrt's, linear initialisation) on each layer's kept weights."""
    from dcrt.converters.cluster import kmeans_1d
    shared = {}
    for name, b in bits.items():
        w = net.params[name]
        kept = w != 0
        codebook, labels = kmeans_1d(w[kept], (1 << b) - 1)
        full = np.full(w.shape, -1, np.int64)
        full[kept] = labels
        shared[name] = Shared(full, codebook)
        net.set(name, shared[name].weight())
    return shared


# -- ONNX export -----------------------------------------------------------------------------------


def to_onnx(net: Net, path: str) -> None:
    """Write ``net`` as an ONNX model (opset 17, input ``input``, output ``logits``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes, x = [], "input"
    for i, layer in enumerate(net.layers):
        out = f"{getattr(layer, 'name', type(layer).__name__.lower() + str(i))}_out"
        if isinstance(layer, Dense):
            nodes.append(helper.make_node("Gemm", [x, f"{layer.name}.weight", f"{layer.name}.bias"], [out],
                                          name=layer.name, transB=1))
        elif isinstance(layer, Conv):
            nodes.append(helper.make_node("Conv", [x, f"{layer.name}.weight", f"{layer.name}.bias"], [out],
                                          name=layer.name, kernel_shape=[layer.k, layer.k]))
        elif isinstance(layer, MaxPool2):
            nodes.append(helper.make_node("MaxPool", [x], [out], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2]))
        elif isinstance(layer, ReLU):
            nodes.append(helper.make_node("Relu", [x], [out], name=f"relu{i}"))
        elif isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", [x], [out], name=f"flatten{i}", axis=1))
        x = out
    nodes[-1].output[0] = "logits"
    inits = [numpy_helper.from_array(v, k) for k, v in net.params.items()]
    graph = helper.make_graph(nodes, net.name,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, net.input_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dcrt-digits")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


# -- compression and the table ---------------------------------------------------------------------


@dataclass
class Row:
    setting: str
    nonzero: int
    weights: int
    file_bytes: int
    gzip_bytes: int
    accuracy: float
    coded_bytes: int = 0       # all tensors as coded in the file (the paper's "weights" size)
    original_bytes: int = 0    # the same tensors as float32
    note: str = ""


def _gz(path: str) -> int:
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), 9, mtime=0))


def _dcm_accuracy(path: str, x: np.ndarray, y: np.ndarray) -> float:
    sess = dcrt.Session(path)
    name = sess.get_inputs()[0].name
    shape = sess.get_inputs()[0].shape
    feed = x.reshape([len(x)] + [int(d) for d in shape[1:]])
    return float(np.mean(np.concatenate([sess.run(None, {name: feed[i:i + 256]})[0].argmax(1)
                                         for i in range(0, len(feed), 256)]) == y))


def _counts(path: str) -> Tuple[int, int]:
    """(non-zero, total) weights over the compressible layers of a .dcm (biases not counted)."""
    info = dcrt.open_dcm(path)
    nz = total = 0
    for t in info.tensors.values():
        if t.ndim >= 2:
            s = t.stats
            total += s.element_count
            nz += s.nonzero_count
    return nz, total


def _row(setting: str, path: str, x, y, note: str = "") -> Row:
    from dcrt.report import inspect
    nz, total = _counts(path)
    t = inspect(path)["total"]
    return Row(setting, nz, total, os.path.getsize(path), _gz(path), _dcm_accuracy(path, x, y),
               t["coded_bytes"], t["original_bytes"], note)


def paper_config(model: str, bits: Optional[int] = None, prune: bool = True) -> Dict:
    """A dcrt plan with the paper's per-layer pruning rates and bits (or ``bits`` everywhere)."""
    p = PAPER[model]
    layers = {}
    for name in p["sparsity"]:
        opts = {"bits": bits or p["bits"][name]}
        if prune:
            opts["sparsity"] = p["sparsity"][name]
        else:
            opts["prune"] = False
        layers[name] = opts
    return {"layers": layers}


def compress_rows(onnx_path: str, folder: str, x_test, y_test, calib: Optional[np.ndarray] = None,
                  finetuned_onnx: Optional[str] = None, budget: bool = False) -> List[Row]:
    """Convert one model at the seed-001 settings and measure each ``.dcm`` on the test split.

    With ``calib``: a row with data-aware centroids, and with ``budget`` one more whose per-layer
    sparsity and bits were chosen by ``dcrt plan`` for the paper's size (1/39 or 1/40 of the ONNX
    file), with data-aware centroids too: no retraining at all.
    """
    model = os.path.basename(onnx_path)[:-5]
    rows = []

    def convert(tag: str, **kw) -> str:
        out = os.path.join(folder, f"{model}.{tag}.dcm")
        dcrt.convert(onnx_path if "source" not in kw else kw.pop("source"), out, force=True, **kw)
        return out

    rows.append(_row("U: uncompressed (lossless .dcm)", convert("U", prune=False, bits=32), x_test, y_test))
    rows.append(_row("U+Q: quantized", convert("UQ", config=paper_config(model, prune=False)), x_test, y_test))
    rows.append(_row("P: pruned", convert("P", config=paper_config(model, bits=32)), x_test, y_test))
    rows.append(_row("P+Q: pruned + quantized", convert("PQ", config=paper_config(model)), x_test, y_test))
    if calib is not None:
        rows.append(_row("P+Q, data-aware centroids", calibrated(onnx_path, os.path.join(folder, f"{model}.PQcal"),
                                                                  calib, paper_config(model)), x_test, y_test,
                         f"{len(calib)} training images"))
    if calib is not None and budget:
        from dcrt.converters.budget import plan_for_budget
        target = os.path.getsize(onnx_path) // PAPER[model]["ratio"]
        shape = [len(calib)] + ([784] if model == "lenet_300_100" else [1, 28, 28])
        chosen = plan_for_budget(onnx_path, {"input": calib.reshape(shape)}, target_size=target)
        out = calibrated(onnx_path, os.path.join(folder, f"{model}.budget"), calib, chosen.config)
        rows.append(_row(f"budget {target / 1000:.1f} KB (1/{PAPER[model]['ratio']}), data-aware", out,
                         x_test, y_test, "dcrt plan --target-size + --calib"))
    if finetuned_onnx:
        # weights already pruned and clustered: dcrt keeps them exactly (no second pruning)
        cfg = paper_config(model, prune=False)
        rows.append(_row("P+Q, retrained (paper loop)", convert("PQft", source=finetuned_onnx, config=cfg),
                         x_test, y_test))
    return rows


def calibrated(onnx_path: str, stem: str, calib: np.ndarray, config: Dict) -> str:
    """P+Q with centroids refined by least squares on ``calib`` (``dcrt.converters.calibrate``).

    Until ``dcrt convert --calib`` exists, the refined weights (already pruned and clustered) go
    through an ONNX file: dcrt recognises such weights and stores them exactly.
    """
    import onnx
    from onnx import numpy_helper

    from dcrt.converters import passes
    from dcrt.converters.calibrate import calibrate
    from dcrt.converters.onnx_frontend import from_onnx
    from dcrt.converters.plan import make_plan
    model = from_onnx(onnx_path)
    passes.simplify(model.graph)
    plans = make_plan(model.graph, None, config)
    spec = model.graph.inputs[0]
    feeds = {spec.name: calib.reshape([len(calib)] + [int(d) for d in spec.shape[1:]])}
    cal = calibrate(model, plans, feeds)
    proto = onnx.load(onnx_path)
    for t in proto.graph.initializer:
        if t.name in cal.weights:
            t.CopyFrom(numpy_helper.from_array(cal.weights[t.name], t.name))
    src = stem + ".onnx"
    onnx.save(proto, src)
    out = stem + ".dcm"
    keep = {"layers": {n: ({"skip": True} if p.skip else {"bits": p.bits, "prune": False}) for n, p in plans.items()}}
    dcrt.convert(src, out, config=keep, force=True)
    return out


def finetune(net: Net, x, y, epochs: int, lr: float = 1e-3, steps: int = 3, log=None) -> Net:
    """The paper's loop on a trained ``net``: prune, retrain with the mask, cluster, train the centroids.

    Pruning is iterative, as in Han et al.: ``steps`` rounds each prune towards the target rates
    (a geometric schedule of the kept fraction) and retrain for ``epochs`` epochs; then k-means
    and ``epochs`` epochs of centroid training.
    """
    p = PAPER[net.name]
    masks: Dict[str, np.ndarray] = {}
    for step in range(1, steps + 1):
        rates = {n: 1.0 - (1.0 - s) ** (step / steps) for n, s in p["sparsity"].items()}
        masks = prune(net, rates)
        train(net, x, y, epochs, lr=lr, masks=masks, seed=step, log=log)
    shared = cluster(net, p["bits"])
    train(net, x, y, epochs, lr=lr / 3, masks=masks, shared=shared, seed=steps + 1, log=log)
    return net


def print_table(model: str, onnx_path: str, rows: Sequence[Row], trained_accuracy: float,
                out=None) -> None:
    """The seed-001 table of one model, as Markdown, with the paper's figures under it."""
    out = out or sys.stdout
    onnx_bytes, onnx_gz = os.path.getsize(onnx_path), _gz(onnx_path)
    p = PAPER[model]
    print(f"\n{model}: ONNX {onnx_bytes / 1000:.1f} KB ({onnx_gz / 1000:.1f} KB gzip'd), "
          f"test accuracy {100 * trained_accuracy:.2f} % (numpy), {len(rows)} settings", file=out)
    head = ("| setting | non-zero weights | pruning | weights coded KB | weights ratio | .dcm KB | gzip KB "
            "| vs ONNX file | vs ONNX gzip | test acc % | change |")
    print(head, file=out)
    print("|---|" + "---:|" * 10, file=out)
    base = rows[0].accuracy
    for r in rows:
        print(f"| {r.setting} | {r.nonzero:,} | {r.weights / max(r.nonzero, 1):.1f}x | {r.coded_bytes / 1000:.1f} | "
              f"{r.original_bytes / max(r.coded_bytes, 1):.1f}x | {r.file_bytes / 1000:.1f} | "
              f"{r.gzip_bytes / 1000:.1f} | "
              f"{onnx_bytes / r.file_bytes:.1f}x | {onnx_gz / r.gzip_bytes:.1f}x | {100 * r.accuracy:.2f} | "
              f"{100 * (r.accuracy - base):+.2f} |", file=out)
    print(f"paper (MNIST, with retraining): {p['ratio']}x, top-1 error {p['error'][0]} % -> {p['error'][1]} %",
          file=out)


def run(models: Sequence[str] = ("mlp", "cnn"), epochs: Optional[Dict[str, int]] = None, folder: Optional[str] = None,
        finetune_epochs: Optional[Dict[str, int]] = None, calib_count: int = 256, log=print) -> Dict[str, Dict]:
    """Train, export, compress and measure; returns ``{model: {"rows", "accuracy", "onnx"}}``.

    ``epochs``: training epochs per model (``mlp``, ``cnn``); ``finetune_epochs``: epochs per
    step of the retraining loop (none when empty).
    """
    epochs = {"mlp": 30, "cnn": 12, **(epochs or {})}
    finetune_epochs = finetune_epochs or {}
    folder = folder or tempfile.mkdtemp(prefix="dcrt-digits-")
    os.makedirs(folder, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_28()
    log(f"digits: {len(x_train)} training / {len(x_test)} test images, 28x28")
    results = {}
    for key in models:
        net = lenet_300_100() if key == "mlp" else lenet5()
        t0 = time.perf_counter()
        train(net, x_train, y_train, epochs[key], log=None)
        acc = accuracy(net, x_test, y_test)
        log(f"{net.name}: trained {epochs[key]} epochs in {time.perf_counter() - t0:.1f} s, "
            f"test accuracy {100 * acc:.2f} %")
        path = os.path.join(folder, f"{net.name}.onnx")
        to_onnx(net, path)
        tuned = None
        if finetune_epochs.get(key):
            t0 = time.perf_counter()
            finetune(net, x_train, y_train, finetune_epochs[key])
            tuned = os.path.join(folder, f"{net.name}.finetuned.onnx")
            to_onnx(net, tuned)
            log(f"{net.name}: prune/retrain/cluster/fine-tune in {time.perf_counter() - t0:.1f} s, "
                f"test accuracy {100 * accuracy(net, x_test, y_test):.2f} %")
        calib = x_train[np.random.default_rng(0).permutation(len(x_train))[:calib_count]]
        rows = compress_rows(path, folder, x_test, y_test, calib, tuned, budget=True)
        results[net.name] = {"rows": rows, "accuracy": acc, "onnx": path}
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn", help="mlp (LeNet-300-100), cnn (LeNet-5) or both")
    ap.add_argument("--out", help="folder for the .onnx and .dcm files (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="few epochs")
    ap.add_argument("--no-finetune", action="store_true", help="skip the prune/retrain/cluster/fine-tune loop")
    a = ap.parse_args(argv)
    epochs = {"mlp": 8, "cnn": 3} if a.quick else None
    tune = {} if a.no_finetune else ({"mlp": 2, "cnn": 1} if a.quick else {"mlp": 15, "cnn": 5})
    results = run([m.strip() for m in a.models.split(",")], epochs, a.out, tune)
    for name, r in results.items():
        print_table(name, r["onnx"], r["rows"], r["accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
