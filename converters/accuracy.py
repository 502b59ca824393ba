"""Fidelity of a compressed model: calibration/evaluation data, running models, comparing outputs.

``dcrt eval`` is built from the pieces here:

- :func:`load_data` reads inputs from a ``.npz`` (arrays by input name, or one array), a ``.npy``
  or a folder of ``.npy`` files, and casts them to the model's input types;
- :class:`Runner` runs a graph IR model with some weights replaced (the compressed values of one or
  more layers) through onnxruntime when it is installed, else through dcrt's own executor;
- :func:`output_metrics` compares two outputs: top-1 (and top-5) agreement, cosine similarity, PSNR,
  and accuracy against labels;
- :func:`weight_psnr` is the per-layer view of seed 003 (table 4): PSNR of the decoded weights
  against the original ones;
- :func:`evaluate` puts them together for a ``.dcm`` against its source ONNX model.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dcrt.errors import ConversionError, InputError
from dcrt.files import load_npy
from dcrt.graph import Graph, Model, ValueInfo

#: Batch size used to run data sets through a model (bounded memory, BLAS-friendly).
BATCH = 256
#: Keys of a ``.npz`` taken as labels rather than inputs (when no input has that name).
LABEL_KEYS = ("labels", "label", "y", "targets", "target")

Feeds = Dict[str, np.ndarray]
#: What reading a data file can raise besides dcrt's own errors (a damaged or truncated ``.npz``
#: is a ``BadZipFile``).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


# -- data ------------------------------------------------------------------------------------------


def _as_input(name: str, value: np.ndarray, spec: Optional[ValueInfo], where: str) -> np.ndarray:
    """``value`` cast to the input's dtype, with a batch axis added to a single sample."""
    value = np.asarray(value)
    if spec is None:
        return value
    if spec.shape is not None and value.ndim == len(spec.shape) - 1:
        value = value[None]                       # one sample saved without its batch axis
    if spec.shape is not None and value.ndim != len(spec.shape):
        raise InputError(f"{where}: input {name!r} has shape {list(value.shape)}, the model expects "
                         f"{spec.shape} (names are free dimensions)")
    if value.dtype.kind not in "biuf":
        raise InputError(f"{where}: input {name!r} holds {value.dtype} values, the model expects {spec.dtype}")
    if value.dtype != spec.dtype:
        if np.issubdtype(spec.dtype, np.floating) or np.issubdtype(value.dtype, np.integer):
            value = value.astype(spec.dtype)      # float64 from numpy, int32 token ids, ...
        else:
            raise InputError(f"{where}: input {name!r} is {value.dtype}, the model expects {spec.dtype}")
    if value.dtype.kind == "f":
        bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if bad:     # a NaN row's arg-max is 0 on both sides: it would count as agreeing
            raise InputError(f"{where}: input {name!r} holds {bad} NaN or infinite values; "
                             "give finite data (drop or fill those samples)")
    return value


def _npy_folder(path: str) -> Dict[str, List[str]]:
    files = sorted(f for f in os.listdir(path) if f.endswith(".npy"))
    if not files:
        raise InputError(f"{path}: the folder holds no .npy files")
    return {f[:-4]: [os.path.join(path, f)] for f in files}


def load_data(path: str, inputs: Sequence[ValueInfo], max_samples: Optional[int] = None
              ) -> Tuple[Feeds, Optional[np.ndarray]]:
    """Read a data set for a model with graph inputs ``inputs``; returns ``(feeds, labels or None)``.

    ``path`` is a ``.npz`` (one array per input name, or a single array for a one-input model; a
    ``labels``/``y`` array is returned as labels), a ``.npy`` (one-input models), or a folder of
    ``.npy`` files (``<input name>.npy`` each, or, for a one-input model, any number of files, each
    a sample or a batch, concatenated in name order). Floats are cast to the input's dtype; a
    single sample gets its batch axis. ``max_samples`` keeps the first samples only.
    """
    if not os.path.exists(path):
        raise InputError(f"{path}: no such data file or folder")
    specs = {v.name: v for v in inputs}
    names = list(specs)
    labels = None
    try:
        if os.path.isdir(path):
            groups = _npy_folder(path)
            if set(names) <= set(groups):
                arrays = {n: load_npy(groups[n][0]) for n in names}
            elif len(names) == 1:
                spec = specs[names[0]]
                parts = [_as_input(names[0], load_npy(p), spec, p) for ps in groups.values() for p in ps]
                arrays = {names[0]: np.concatenate(parts)}
            else:
                raise InputError(f"{path}: name the files after the model's inputs: "
                                 f"{', '.join(n + '.npy' for n in names)}")
        elif path.endswith(".npz"):
            with np.load(path) as z:
                stored = {k: z[k] for k in z.files}
            label_key = next((k for k in LABEL_KEYS if k in stored and k not in specs), None)
            if label_key:
                labels = _checked_labels(stored.pop(label_key), path)
            if set(names) <= set(stored):
                arrays = {n: stored[n] for n in names}
            elif len(names) == 1 and len(stored) == 1:
                arrays = {names[0]: next(iter(stored.values()))}
            else:
                raise InputError(f"{path} holds {', '.join(sorted(stored)) or 'no arrays'}; the model's "
                                 f"inputs are {', '.join(names)}: store one array per input name")
        elif path.endswith(".npy"):
            if len(names) != 1:
                raise InputError(f"{path}: the model has {len(names)} inputs; give a .npz with "
                                 f"one array per input ({', '.join(names)})")
            arrays = {names[0]: load_npy(path)}
        else:
            raise InputError(f"{path}: data must be a .npz, a .npy or a folder of .npy files")
    except _READ_ERRORS as e:
        raise InputError(f"{path}: cannot read the data ({_read_problem(e)})") from None
    feeds = {n: _as_input(n, a, specs[n], path) for n, a in arrays.items()}
    counts = {len(a) for a in feeds.values()}
    if len(counts) != 1:
        raise InputError(f"{path}: the inputs hold different numbers of samples "
                         f"({', '.join(f'{n}: {len(a)}' for n, a in feeds.items())})")
    if not feeds or not next(iter(counts)):
        raise InputError(f"{path}: no samples in the data")
    if labels is not None and len(labels) != counts.pop():
        raise InputError(f"{path}: {len(labels)} labels for {len(next(iter(feeds.values())))} samples")
    if max_samples is not None:
        if max_samples < 1:
            raise InputError(f"max_samples must be at least 1, not {max_samples}")
        feeds = {n: a[:max_samples] for n, a in feeds.items()}
        labels = labels[:max_samples] if labels is not None else None
    return feeds, labels


def feeds_of(data: Any, inputs: Sequence[ValueInfo], max_samples: Optional[int] = None) -> Feeds:
    """Inputs given to the Python API: a data path (:func:`load_data`, labels dropped), a mapping from
    input names to arrays, or one array for a one-input model; checked and cast as files are."""
    if isinstance(data, (str, os.PathLike)):
        return load_data(os.fspath(data), inputs, max_samples)[0]
    names = [v.name for v in inputs]
    if isinstance(data, np.ndarray) and len(names) == 1:
        data = {names[0]: data}
    if not isinstance(data, Mapping) or set(data) != set(names):
        raise InputError(f"data must be a path, or arrays by input name ({', '.join(names)}), not "
                         f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
    specs = {v.name: v for v in inputs}
    feeds = {n: _as_input(n, np.asarray(data[n]), specs[n], "the data") for n in names}
    return {n: a[:max_samples] for n, a in feeds.items()} if max_samples else feeds


def load_labels(path: str) -> np.ndarray:
    """Integer class labels from a ``.npy`` (or the single / ``labels`` array of a ``.npz``)."""
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                key = next((k for k in LABEL_KEYS if k in z.files), z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise InputError(f"{path}: store the labels as 'labels' (holds {', '.join(z.files)})")
                labels = z[key]
        else:
            labels = load_npy(path)
    except _READ_ERRORS as e:
        raise InputError(f"{path}: cannot read the labels ({_read_problem(e)})") from None
    return _checked_labels(labels, path)


def _read_problem(e: Exception) -> str:
    why = str(e)
    if isinstance(e, zipfile.BadZipFile) or "pickled" in why:    # numpy's words for a file it cannot place
        return "not a .npz or .npy file written by numpy, or a damaged one"
    return why


def _checked_labels(labels: Any, where: str) -> np.ndarray:
    """Labels as integer class indices (one-hot rows become their arg-max); InputError otherwise."""
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise InputError(f"{where}: the labels are a single value; give one class index per sample")
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = labels.argmax(1)                 # one-hot
    if labels.dtype.kind not in "biuf" or (labels.dtype.kind == "f" and not (
            np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)))):
        raise InputError(f"{where}: labels must be integer class indices (one per sample), not {labels.dtype} values")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise InputError(f"{where}: labels must be class indices from 0; found {int(labels.min())}")
    return labels.reshape(len(labels), *labels.shape[1:]) if labels.ndim > 1 else labels


def check_batch_first(graph: Graph) -> None:
    """InputError when a graph input is time-major: read straight by an LSTM, GRU or RNN of the
    default layout (``[seq, batch, features]``). The tools here take samples along the first axis,
    so they would cut its sequences into time steps."""
    inputs = {v.name for v in graph.inputs} - set(graph.initializers)
    for node in graph.nodes:
        if node.op_type in ("LSTM", "GRU", "RNN") and not node.attrs.get("layout", 0) and node.inputs[0] in inputs:
            raise InputError(f"input {node.inputs[0]!r} is time-major ([seq, batch, features]: {node.op_type} "
                             f"{node.name or node.outputs[0]!r} reads it with layout 0), and dcrt eval / sweep / "
                             "plan / --calib take samples along the first axis: export the model batch-first "
                             "(PyTorch batch_first=True, or ONNX layout=1)")


def split(feeds: Feeds, count: int) -> Tuple[Feeds, Feeds]:
    """The first ``count`` samples and the rest (calibration / held-out)."""
    return {n: a[:count] for n, a in feeds.items()}, {n: a[count:] for n, a in feeds.items()}


def sample_count(feeds: Feeds) -> int:
    return len(next(iter(feeds.values()))) if feeds else 0


def batches(feeds: Feeds, size: int = BATCH) -> Iterable[Feeds]:
    """``feeds`` cut into batches along the first axis."""
    if size < 1:
        raise InputError(f"the batch size must be at least 1, not {size}")
    n = sample_count(feeds)
    for start in range(0, max(n, 1), size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


# -- metrics ---------------------------------------------------------------------------------------


def _classes(y: np.ndarray) -> np.ndarray:
    """``y`` as ``[samples * positions, classes]``: classes on axis 1 (NCHW and [N, C] alike)."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim <= 1:
        return y.reshape(-1, 1)
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])


def topk(y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row (unordered), ``[rows, k]``."""
    k = min(k, y.shape[1])
    return np.argpartition(-y, k - 1, axis=1)[:, :k]


def psnr(reference: np.ndarray, approx: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being ``max |reference|`` (inf when equal)."""
    ref = np.asarray(reference, np.float64)
    mse = float(np.mean((ref - np.asarray(approx, np.float64)) ** 2)) if ref.size else 0.0
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    if mse == 0.0:
        return float("inf")
    if peak == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(peak * peak / mse))


def cosine(reference: np.ndarray, approx: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened (1.0 for two zero arrays)."""
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(approx, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def output_metrics(reference: np.ndarray, approx: np.ndarray,
                   labels: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Fidelity of ``approx`` against ``reference`` (one model output, samples on axis 0).

    Top-1 agreement: how often both pick the same class (axis 1); top-5 agreement: how often the
    reference's top class is among the approximation's five best. With ``labels``, top-1 and top-5
    accuracy of both.
    """
    ref, got = _classes(reference), _classes(approx)
    m: Dict[str, float] = {"cosine": cosine(reference, approx), "psnr_db": psnr(reference, approx),
                           "max_abs_error": float(np.max(np.abs(np.asarray(reference, np.float64) - approx)))
                           if np.size(reference) else 0.0}
    if ref.shape[1] > 1:
        ref_top = ref.argmax(1)
        m["top1_agreement"] = float(np.mean(ref_top == got.argmax(1)))
        m["top5_agreement"] = float(np.mean(np.any(topk(got, 5) == ref_top[:, None], axis=1)))
        if labels is not None:
            lab = _label_rows(labels, ref)
            for tag, y in (("reference", ref), ("compressed", got)):
                m[f"{tag}_top1_accuracy"] = float(np.mean(y.argmax(1) == lab))
                m[f"{tag}_top5_accuracy"] = float(np.mean(np.any(topk(y, 5) == lab[:, None], axis=1)))
    return m


def _label_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Labels, one per row of ``scores`` (``[rows, classes]``), each a class the scores have."""
    lab = np.asarray(labels).reshape(-1)
    if lab.size != scores.shape[0]:
        raise InputError(f"{lab.size} labels for {scores.shape[0]} predictions")
    if lab.size and lab.max() >= scores.shape[1]:
        raise InputError(f"label {int(lab.max())} names no class: the output has {scores.shape[1]} "
                         f"(0 to {scores.shape[1] - 1})")
    return lab


def judged_output(outputs: Sequence[np.ndarray]) -> int:
    """Which output top-1 agreement is measured on: the first with classes (two or more on axis 1),
    else the first. A one-value-per-sample output (a regression head) always "agrees" with itself,
    so a classifier output after it must not be missed."""
    return next((i for i, y in enumerate(outputs) if np.ndim(y) > 1 and np.shape(y)[1] > 1), 0)


def model_metrics(references: Sequence[np.ndarray], approx: Sequence[np.ndarray],
                  labels: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Fidelity of a whole model: :func:`output_metrics` of the judged output (:func:`judged_output`),
    with ``cosine`` the lowest of all outputs', so that compressing for a classifier output does not
    wreck a regression head beside it."""
    i = judged_output(references)
    m = output_metrics(references[i], approx[i], labels)
    m["cosine"] = min(cosine(r, a) for r, a in zip(references, approx))
    return m


def weight_psnr(original: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR (dB) of a layer's decoded weights against the original ones (seed 003, table 4)."""
    return psnr(original, decoded)


# -- running models --------------------------------------------------------------------------------


def _onnx_attribute(name: str, value: Any):
    from onnx import AttributeProto, helper, numpy_helper
    if isinstance(value, Graph):
        return helper.make_attribute(name, to_onnx_graph(value))
    if isinstance(value, list) and value and isinstance(value[0], Graph):
        return helper.make_attribute(name, [to_onnx_graph(g) for g in value])
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if isinstance(value, list) and not value:
        return helper.make_attribute(name, value, attr_type=AttributeProto.INTS)
    return helper.make_attribute(name, value)


def _onnx_value_info(v: ValueInfo):
    from onnx import helper
    return helper.make_tensor_value_info(v.name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)


def to_onnx_graph(g: Graph, as_inputs: Sequence[str] = (), extra_outputs: Sequence[str] = ()):
    """dcrt's graph IR as an ``onnx.GraphProto``.

    Initializers named in ``as_inputs`` become graph inputs; intermediate values named in
    ``extra_outputs`` become graph outputs (typed float32: they are the activations a layer reads).
    """
    from onnx import TensorProto, helper, numpy_helper
    nodes = []
    for n in g.nodes:
        proto = helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name or None, domain=n.domain or None)
        proto.attribute.extend(_onnx_attribute(k, v) for k, v in sorted(n.attrs.items()))
        nodes.append(proto)
    extra = [ValueInfo(name, np.asarray(g.initializers[name]).dtype, list(np.shape(g.initializers[name])))
             for name in as_inputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in g.initializers.items() if k not in as_inputs]
    outs = [_onnx_value_info(v) for v in g.outputs]
    declared = {v.name for v in g.outputs}
    outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs if n not in declared]
    return helper.make_graph(nodes, g.name or "graph", [_onnx_value_info(v) for v in list(g.inputs) + extra],
                             outs, inits)


def to_onnx(model: Model, as_inputs: Sequence[str] = (), extra_outputs: Sequence[str] = ()):
    """dcrt's IR model as an ``onnx.ModelProto`` (see :func:`to_onnx_graph`)."""
    from onnx import helper
    proto = helper.make_model(to_onnx_graph(model.graph, as_inputs, extra_outputs),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in model.opsets.items()],
                              producer_name="dcrt")
    proto.ir_version = 8
    return proto


def _ort_session(payload: bytes):
    import onnxruntime as ort
    return ort.InferenceSession(payload, _ort_options(), providers=["CPUExecutionProvider"])


def _ort_options():
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle onnxruntime threads spin by default and starve the numpy work done between runs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Runner:
    """Runs a graph IR model on a data set with any of its weights replaced.

    The weights that may be replaced (``variable``) become graph inputs of an onnxruntime session
    built once, so trying another compression of a layer costs one forward pass, not a new session.
    Without onnxruntime (or when it refuses the graph), dcrt's executor runs the graph instead.
    ``extra_outputs`` names intermediate values ``run`` may be asked for (the inputs of layers).
    """

    def __init__(self, model: Model, variable: Iterable[str] = (), backend: str = "auto",
                 batch_size: int = BATCH, extra_outputs: Sequence[str] = ()):
        check_batch_first(model.graph)
        self.model = model
        self.variable = [n for n in variable if n in model.graph.initializers]
        self.batch_size = batch_size
        self.output_names = [v.name for v in model.graph.outputs]
        self.input_names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
        self._session = None
        self._executor = None
        if backend in ("auto", "onnxruntime"):
            try:
                proto = to_onnx(model, self.variable, extra_outputs)
                self._session = _ort_session(proto.SerializeToString())
            except Exception:           # noqa: BLE001 - missing package or unsupported graph: fall back
                if backend == "onnxruntime":
                    raise
        if self._session is None:
            from dcrt.runtime.executor import Executor
            self._executor = Executor(model.graph, model.opsets)
        self.backend = "onnxruntime" if self._session is not None else "dcrt"

    def weight(self, name: str) -> np.ndarray:
        return np.asarray(self.model.graph.initializers[name])

    def run(self, feeds: Feeds, weights: Optional[Mapping[str, np.ndarray]] = None,
            outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """The model's outputs on ``feeds`` (batched) with ``weights`` replacing initializers."""
        weights = dict(weights or {})
        unknown = set(weights) - set(self.variable) if self._session is not None else set()
        if unknown:
            raise ValueError(f"weights {sorted(unknown)} were not declared variable")
        names = list(outputs or self.output_names)
        computed = [n for n in names if n not in feeds]     # a graph input asked for is given back
        parts: List[List[np.ndarray]] = [[] for _ in names]
        for batch in batches(feeds, self.batch_size):
            if not computed:
                got = {}
            elif self._session is not None:
                feed = dict(batch)
                feed.update({n: np.asarray(weights.get(n, self.weight(n))) for n in self.variable})
                try:
                    got = dict(zip(computed, self._session.run(computed, feed)))
                except Exception as e:  # noqa: BLE001 - onnxruntime's errors are not dcrt errors
                    raise InputError(f"onnxruntime could not run the model on the data: {e}") from None
            else:
                got = self._executor.run(batch, lambda n: weights[n] if n in weights
                                         else self.model.graph.initializers[n], computed)
            result = [batch[n] if n in batch else got[n] for n in names]
            for part, value in zip(parts, result):
                part.append(np.asarray(value))
        return [_joined(p) for p in parts]


def _joined(parts: List[np.ndarray]) -> np.ndarray:
    """The batches' values of one output as one array (a 0-d output, one per batch: the first)."""
    return np.concatenate(parts) if parts and parts[0].ndim else (parts[0] if parts else np.zeros(0))


def run_onnx_file(path: str, feeds: Feeds, batch_size: int = BATCH) -> List[np.ndarray]:
    """Outputs of the ONNX model at ``path`` through onnxruntime (the reference).

    onnxruntime reads the file itself, so external data files next to it are found.
    """
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConversionError("the reference model runs on onnxruntime: pip install 'dcrt[convert]'") from None
    try:
        sess = ort.InferenceSession(path, _ort_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors are not dcrt errors
        raise ConversionError(f"onnxruntime cannot load {path}: {e}") from None
    names = [o.name for o in sess.get_outputs()]
    parts: List[List[np.ndarray]] = [[] for _ in names]
    for batch in batches(feeds, batch_size):
        try:
            result = sess.run(names, batch)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"onnxruntime could not run {os.path.basename(path)} on the data: {e}") from None
        for part, value in zip(parts, result):
            part.append(value)
    return [_joined(p) for p in parts]


def run_dcm(path: str, feeds: Feeds, batch_size: int = BATCH, mode: str = "index") -> List[np.ndarray]:
    """Outputs of a ``.dcm`` through ``dcrt.Session`` (batched)."""
    from dcrt.runtime.session import Session
    with Session(path, mode=mode) as sess:
        parts: List[List[np.ndarray]] = [[] for _ in sess.get_outputs()]
        for batch in batches(feeds, batch_size):
            for part, value in zip(parts, sess.run(None, batch)):
                part.append(value)
    return [_joined(p) for p in parts]


# -- dcrt eval -------------------------------------------------------------------------------------


def reference_weights(reference: str) -> Dict[str, np.ndarray]:
    """The original weights as ``dcrt convert`` saw them (BatchNorm folded, same names)."""
    from . import passes
    from .convert import load_model
    model, _ = load_model(reference)
    passes.simplify(model.graph)
    return {k: np.asarray(v) for k, v in model.graph.initializers.items()}


def layer_fidelity(dcm_path: str, reference: str) -> List[Dict[str, Any]]:
    """Per compressed layer: codebook size, sparsity, bits per weight and weight PSNR / cosine."""
    from dcrt.format import open_dcm
    from dcrt.report import layer_rows
    original = reference_weights(reference)
    rows = []
    with open_dcm(dcm_path) as dcm:
        for row in layer_rows(dcm):
            if row["encoding"] == "raw" or row["layer"] not in original:
                continue
            w = original[row["layer"]]
            got = dcm.tensors[row["layer"]].decode()
            if got.shape != w.shape:
                continue
            rows.append({"layer": row["layer"], "op": row["op"], "weights": row["weights"],
                         "codebook": row["codebook"], "sparsity": row["sparsity"],
                         "bits_per_weight": row["bits_per_weight"], "ratio": row["ratio"],
                         "psnr_db": weight_psnr(w, got), "cosine": cosine(w, got)})
    return rows


def evaluate(dcm_path: str, reference: Optional[str], data: str, labels: Optional[str] = None,
             batch_size: int = BATCH, max_samples: Optional[int] = None) -> Dict[str, Any]:
    """Everything ``dcrt eval`` reports, as a dictionary.

    Runs ``data`` through the ``.dcm`` (``dcrt.Session``) and through ``reference`` (the original
    ONNX model, onnxruntime); compares each output; adds accuracy when labels are given (``labels``
    file, or a ``labels`` array inside the ``.npz``), on the output :func:`judged_output` picks, and
    the per-layer weight PSNR.
    """
    from dcrt.format import open_dcm
    with open_dcm(dcm_path) as dcm:
        graph = dcm.model.graph
        check_batch_first(graph)
        specs = [v for v in graph.inputs if v.name not in graph.initializers]
        out_names = [v.name for v in graph.outputs]
    feeds, stored_labels = load_data(data, specs, max_samples)
    y = load_labels(labels) if labels else stored_labels
    if reference is None and y is None:
        raise InputError("nothing to compare with: give --reference model.onnx and/or labels (--labels "
                         "labels.npy, or a 'labels' array in the .npz)")
    if y is not None and max_samples:
        y = y[:max_samples]
    got = run_dcm(dcm_path, feeds, batch_size)
    judged = out_names[judged_output(got)]
    report: Dict[str, Any] = {"model": dcm_path, "reference": reference, "data": data,
                              "samples": sample_count(feeds), "outputs": {}}
    if reference is not None:
        expected = run_onnx_file(reference, feeds, batch_size)
        if len(expected) != len(got):
            raise InputError(f"{reference} has {len(expected)} outputs, {dcm_path} has {len(got)}: "
                             "is it the model the .dcm was converted from?")
        for name, e, g in zip(out_names, expected, got):
            if e.shape != g.shape:
                raise InputError(f"output {name!r}: the reference gives shape {list(e.shape)}, the .dcm "
                                 f"{list(g.shape)}: is it the model the .dcm was converted from?")
            report["outputs"][name] = output_metrics(e, g, y if name == judged else None)
        report["layers"] = layer_fidelity(dcm_path, reference)
    else:
        first = _classes(got[out_names.index(judged)])
        lab = _label_rows(y, first)
        report["outputs"][judged] = {
            "compressed_top1_accuracy": float(np.mean(first.argmax(1) == lab)),
            "compressed_top5_accuracy": float(np.mean(np.any(topk(first, 5) == lab[:, None], axis=1)))}
    return report


__all__ = ["load_data", "feeds_of", "check_batch_first", "load_labels", "output_metrics", "judged_output",
           "model_metrics", "weight_psnr", "psnr", "cosine", "Runner", "run_onnx_file", "run_dcm", "evaluate",
           "layer_fidelity", "to_onnx"]
