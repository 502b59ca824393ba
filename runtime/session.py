"""``dcrt.Session``: run a ``.dcm`` model, with the API onnxruntime users already know.

    sess = dcrt.Session("model.dcm")             # memory-mapped; nothing decoded yet
    y = sess.run(x)                               # one input: the output (a list if several)
    ys = sess.run(None, {"input": x})             # onnxruntime style: a list of outputs

Weights are decoded lazily, on first use, and kept in one of three modes:

- ``"index"`` (default): codebook + indices (and sparse positions) stay resident; Gemm, MatMul,
  Conv and the RNN gate matrices compute from them without a dense float32 copy of the weight.
- ``"dense"``: each weight is decoded to float32 once; fastest on a machine with memory to spare.
- ``"stream"``: nothing compressed is kept: each weight is decoded into an index form (no float32
  copy) for its node, computed from as in index mode and dropped; lowest memory.

``sess.profile(feed, runs=10)`` times each node (``dcrt profile`` prints it; ``benchmarks/layers.py``
sets it beside onnxruntime's profiler).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dcrt import memory
from dcrt.errors import FormatError, InputError
from dcrt.format import open_dcm
from dcrt.format.reader import StoredTensor
from dcrt.format.tensor import QUANTIZED, SPARSE
from dcrt.graph import ValueInfo, subgraphs

from . import derived
from .executor import HOLD, Executor, op_types
from .indexed import ByInput, IndexedWeight, PerDirection, SparseWeight, TableRows, hold

MODES = memory.MODES
_ONNX_TYPE = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float64): "tensor(double)",
              np.dtype(np.float16): "tensor(float16)", np.dtype(np.int64): "tensor(int64)",
              np.dtype(np.int32): "tensor(int32)", np.dtype(np.int8): "tensor(int8)",
              np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.bool_): "tensor(bool)"}


@dataclass(frozen=True)
class NodeArg:
    """A model input or output, as onnxruntime's ``NodeArg``: name, shape (ints, names or None), type."""

    name: str
    shape: Optional[List[Any]]
    type: str
    dtype: np.dtype

    def __hash__(self) -> int:      # the shape is a list, as onnxruntime's: hashed as a tuple
        return hash((self.name, None if self.shape is None else tuple(self.shape), self.type))


@dataclass(frozen=True)
class ModelMetadata:
    """What :meth:`Session.get_modelmeta` answers, under onnxruntime's names where it has them:
    ``producer_name`` (the ``.dcm``'s: ``"dcrt 0.1.0"``), ``graph_name`` and ``custom_metadata_map``
    (the source model's ``metadata_props``); then the file's ``format_version``, ``opsets`` and
    ``source`` (format, file name, its bytes and gzip'd bytes, its weights' bytes). The source's own
    producer, domain, description and version are not kept by the conversion."""

    producer_name: str
    graph_name: str
    custom_metadata_map: Dict[str, str]
    format_version: Tuple[int, int]
    opsets: Dict[str, int]
    source: Dict[str, Any]

    def __hash__(self) -> int:      # equal metadata hash alike; the dicts are left out
        return hash((self.producer_name, self.graph_name, self.format_version))


@dataclass(frozen=True)
class NodeTime:
    """One node of :meth:`Session.profile`: its name (or first output), its op type ("Conv+Relu"
    when an activation runs in its pass), how its weight is held (:func:`held_as`; "" for none) and
    the median seconds of its function (in stream mode with the decoding of its weight)."""

    name: str
    op_type: str
    weight: str
    seconds: float


def held_as(value: Any) -> str:
    """How a session holds a weight: ``float32`` (an array's dtype), ``indices uint8`` (codebook
    indices), ``CSR 10%`` (kept weights by row), ``CSR 10% by input``, ``CSR 10% per direction``,
    ``table slots 40% per direction`` (a recurrent ``R`` as product-table slots); ``decoded per run``
    for None."""
    if value is None:
        return "decoded per run"
    if isinstance(value, np.ndarray):
        return str(value.dtype)
    if isinstance(value, IndexedWeight):
        return f"indices {value.indices.dtype}"
    inner = value.inner if isinstance(value, ByInput) else value
    matrices = inner.matrices if isinstance(inner, PerDirection) else (inner,)
    if not all(isinstance(m, (SparseWeight, TableRows)) for m in matrices):
        return type(value).__name__
    kept = sum(m.nnz for m in matrices) / max(1, sum(int(np.prod(m.shape)) for m in matrices))
    if isinstance(matrices[0], TableRows):
        return f"table slots {kept:.0%} per direction"
    suffix = {ByInput: " by input", PerDirection: " per direction"}.get(type(value), "")
    if isinstance(value, ByInput) and value.rows is not None:
        suffix += " and by rows"
    return f"CSR {kept:.0%}{suffix}"


def _shares_memory(y: np.ndarray, others) -> bool:
    """Whether ``y`` may share memory with one of ``others``: only an array that is a view can share
    with another one (numpy's bounds test skipped for two arrays that own their data)."""
    for v in others:
        if v is y or ((y.base is not None or v.base is not None) and np.may_share_memory(y, v)):
            return True
    return False


def _node_arg(v: ValueInfo) -> NodeArg:
    return NodeArg(v.name, None if v.shape is None else list(v.shape),
                   _ONNX_TYPE.get(v.dtype, f"tensor({v.dtype})"), v.dtype)


def indexed_weight(t: StoredTensor, grouping: str = memory.ROWS):
    """The index-mode form of a compressed tensor (see ``dcrt.memory.sparse_layout``), its CSR
    grouped as ``dcrt.memory.groupings`` says."""
    if memory.sparse_layout(t.record, grouping) != "csr":
        return IndexedWeight(*t.index_form())
    if t.record.encoding != SPARSE:     # a pruned QUANTIZED tensor: its dense indices regrouped
        book, indices = t.index_form()
        if grouping == memory.DIRECTIONS:
            return PerDirection([SparseWeight.from_indices(book, d) for d in indices])
        if grouping == memory.SLOTS:
            return PerDirection([TableRows(SparseWeight.from_indices(book, d)) for d in indices])
        if grouping in (memory.INPUTS, memory.BOTH):
            rows = TableRows(SparseWeight.from_indices(book, indices)) if grouping == memory.BOTH else None
            return ByInput(SparseWeight.from_indices(book, indices.T), rows)
        return SparseWeight.from_indices(book, indices)
    entries = t.entries()
    try:
        if grouping in (memory.INPUTS, memory.BOTH):
            rows = TableRows(SparseWeight.from_entries(t.codebook, *entries, t.shape)) if grouping == memory.BOTH \
                else None
            return ByInput(SparseWeight.transpose_from_entries(t.codebook, *entries, t.shape), rows)
        weight = SparseWeight.from_entries(t.codebook, *entries, t.shape)
    except FormatError as error:
        raise FormatError(f"tensor {t.name!r}: {error}") from None
    if grouping == memory.SLOTS:
        return PerDirection([TableRows(weight[d]) for d in range(weight.shape[0])])
    return PerDirection.split(weight) if grouping == memory.DIRECTIONS else weight


def stream_weight(t: StoredTensor, grouping: str = memory.ROWS):
    """Stream mode's form of a compressed tensor, built for one node and dropped after it: an index
    form, the one quickest to make from the file (``dcrt.memory.stream_bytes``), which the node's
    kernels compute from as in index mode. Against decoding to float32 (until session 21) a fraction
    of the memory and of the time: VGG-16 FC6-8 at batch 1, one core, 299 -> 30 ms a run, peak
    allocation 490 -> 20 MB."""
    if t.record.encoding == QUANTIZED:
        return IndexedWeight(*t.index_form())
    return indexed_weight(t, memory.stream_grouping(grouping))


#: The one execution provider dcrt is (``providers=`` and ``get_providers()``, as onnxruntime's).
PROVIDERS = ["CPUExecutionProvider"]


class Session:
    """An inference session over a ``.dcm`` file (path, bytes or bytearray).

    ``providers`` is accepted as onnxruntime's, so that code written for it runs unchanged: dcrt is
    its own CPU provider, and a list without ``"CPUExecutionProvider"`` is an InputError; so is a
    ``sess_options`` (dcrt's threads follow ``NUMBA_NUM_THREADS`` and ``OMP_NUM_THREADS``).
    """

    def __init__(self, model: Union[str, os.PathLike, bytes, bytearray, memoryview], mode: str = "index", *,
                 providers: Optional[Sequence[Any]] = None, sess_options: Any = None):
        if sess_options is not None or hasattr(mode, "intra_op_num_threads"):   # onnxruntime's options
            raise InputError("Session's second argument is the memory mode (index, dense or stream), not "
                             "onnxruntime's SessionOptions: leave it out (threads: NUMBA_NUM_THREADS and "
                             "OMP_NUM_THREADS, or numba.set_num_threads)")
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if providers is not None and not any(p == PROVIDERS[0] or (isinstance(p, tuple) and p[:1] == (PROVIDERS[0],))
                                             for p in providers):
            raise InputError(f"dcrt computes on the CPU only: providers={PROVIDERS} (got {list(providers)})")
        self.mode = mode
        self._file = open_dcm(model)
        m = self._file.model
        self._executor = Executor(m.graph, m.opsets, chain=mode != "stream")
        self._tensors: Dict[str, StoredTensor] = m.graph.initializers
        self._nested = any(subgraphs(node) for node in m.graph.nodes)     # If / Loop bodies
        self._grouping = memory.groupings(m.graph)   # CSR weights not kept by rows in index mode
        self._inputs = [_node_arg(v) for v in m.graph.inputs]
        self._outputs = [_node_arg(v) for v in m.graph.outputs]
        self._expected = {i.name: i for i in self._inputs}
        # (axis, size) of each input's fixed dimensions (names are free): what run checks
        self._fixed_dims = {i.name: tuple((a, d) for a, d in enumerate(i.shape or ()) if isinstance(d, int))
                            for i in self._inputs}
        self._output_names = [o.name for o in self._outputs]
        self._cache: Dict[str, Any] = {}
        self._nested_cache: Dict[StoredTensor, Any] = {}    # subgraphs' own weights, by tensor
        self._lock = threading.Lock()
        self._closed = False

    # -- model facts ---------------------------------------------------------------------------
    def get_inputs(self) -> List[NodeArg]:
        """The model's inputs (name, shape, type)."""
        return list(self._inputs)

    def get_providers(self) -> List[str]:
        """``["CPUExecutionProvider"]``, as onnxruntime's CPU session answers."""
        return list(PROVIDERS)

    def get_outputs(self) -> List[NodeArg]:
        """The model's outputs (name, shape, type)."""
        return list(self._outputs)

    def get_modelmeta(self) -> ModelMetadata:
        """Producer, graph name, metadata, format version, opsets and the source model's facts."""
        f = self._file
        return ModelMetadata(f.producer, f.model.graph.name, dict(f.model.metadata), tuple(f.format_version),
                             dict(f.model.opsets), dict(f.source))

    def resident_bytes(self) -> Dict[str, int]:
        """Weight bytes resident in each mode (estimated from the file) and ``"now"`` (held by this session)."""
        report = memory.resident_bytes((t.record for t in self._file.tensors.values()), self._grouping,
                                       self._file.model.graph)
        with self._lock:
            held = list(self._cache.values()) + list(self._nested_cache.values())
        report["now"] = sum(getattr(v, "nbytes", 0) for v in held) + derived.cached_bytes(held)
        return report

    # -- weights -------------------------------------------------------------------------------
    def _weight(self, name: str) -> Any:
        value = self._cache.get(name)
        if value is not None:
            return value
        t = self._tensors.get(name)
        if t is None:     # e.g. an If branch of a damaged or hostile graph that never produced it
            raise FormatError(f"the graph reads {name!r}, which no node produces and the file does not store")
        return self._held(t, self._cache, name)

    def _nested_weight(self, t: StoredTensor) -> Any:
        """A subgraph's own initializer, held as the graph's are (``executor.HOLD``)."""
        value = self._nested_cache.get(t)
        return value if value is not None else self._held(t, self._nested_cache, t)

    def _held(self, t: StoredTensor, cache: Dict[Any, Any], key: Any) -> Any:
        """``t`` as this session's mode holds it, kept in ``cache[key]`` (stream mode: its compressed
        tensors for the length of their node only)."""
        compressed = t.record.encoding in (QUANTIZED, SPARSE)
        self._file.check_size()     # the file is read below: a FormatError, not SIGBUS, if it shrank
        if self.mode == "stream" and compressed:
            return stream_weight(t, self._grouping.get(t.name, memory.ROWS))
        with self._lock:       # one thread decodes; the others wait and reuse it
            value = cache.get(key)
            if value is None:
                if compressed and self.mode == "index":
                    value = hold(indexed_weight(t, self._grouping.get(t.name, memory.ROWS)))
                else:
                    value = t.decode()
                    if not compressed and self._file.mapped:
                        # a raw tensor is a view of the map: copied, runs read only memory of their
                        # own once every weight is decoded (stream mode: but its compressed ones)
                        value = np.array(value)
                if isinstance(value, np.ndarray):
                    # a constant: no operator may change it, and kernels may keep what they derive
                    # from it (runtime/derived.py: the Winograd form of a 3x3 convolution's weight, ...)
                    value.setflags(write=False)
                cache[key] = value
        return value

    def _run_graph(self, feeds: Dict[str, np.ndarray], names: Optional[List[str]],
                   times: Optional[List[float]] = None) -> Dict[str, np.ndarray]:
        # the weights decoded so far go in as given values (one dict lookup per read, not a call
        # of _weight each: ~0.3 us per weight read); a feed with an initializer's name wins
        if not self._nested:
            return self._executor.run({**self._cache, **feeds}, self._weight, names, times)
        token = HOLD.set(self._nested_weight)
        try:
            return self._executor.run({**self._cache, **feeds}, self._weight, names, times)
        finally:
            HOLD.reset(token)

    # -- running -------------------------------------------------------------------------------
    def run(self, output_names: Any = None, input_feed: Optional[Mapping[str, Any]] = None, run_options: Any = None):
        """Run the model.

        ``run(None, {"name": x})`` / ``run(["out"], feed)``: a list of outputs, as onnxruntime
        (whose ``run_options`` is accepted and has nothing to set here).
        ``run(x)`` for a one-input model: the output array, or a list when there are several.
        """
        if output_names is not None and type(output_names) is not list:
            if isinstance(output_names, str):
                raise InputError(f"output names are a list: run([{output_names!r}], feed)")
            if isinstance(output_names, Mapping):
                raise InputError("a feed goes second, after the output names: run(None, {name: array})")
        short = input_feed is None and output_names is not None and not (
            isinstance(output_names, (list, tuple)) and all(isinstance(n, str) for n in output_names))
        if short:
            if len(self._inputs) != 1:
                raise InputError(f"the model has {len(self._inputs)} inputs "
                                 f"({', '.join(i.name for i in self._inputs)}); pass a dict: run(None, {{name: array}})")
            input_feed, output_names = {self._inputs[0].name: output_names}, None
        if input_feed is None:
            raise InputError("no inputs given: run(None, {name: array}) or run(x)")
        if self._closed:
            raise InputError("the session is closed: open the model again")
        feeds = self._check(input_feed)
        names = self._output_names
        if output_names:        # None or [] : every output, as onnxruntime
            names = list(output_names)
            bad = [n for n in names if n not in self._output_names]
            if bad:
                raise InputError(f"unknown output(s) {', '.join(bad)}; the model's outputs are "
                                 f"{', '.join(sorted(self._output_names))}")
        results = self._run_graph(feeds, names)
        # the caller owns what it gets, each output its own array: one that is a weight (or a view of
        # one) is read-only here, the session's constant, and one that is an input or a view of it
        # (Identity, Reshape), or shares memory with another output, would change with them: copied
        outputs = []
        for n in names:
            y = results[n]
            if not y.flags.writeable or _shares_memory(y, feeds.values()) or _shares_memory(y, outputs):
                y = y.copy()
            outputs.append(y)
        if short:
            return outputs[0] if len(outputs) == 1 else outputs
        return outputs

    def profile(self, input_feed: Any, runs: int = 10) -> List[NodeTime]:
        """Time each node over ``runs`` runs on ``input_feed`` (``{name: array}``, or the array of a
        one-input model), after one untimed
        run that decodes the weights and prepares the kernels: the median seconds of each node's
        function (in stream mode with the decoding of its weights), in execution order; the
        executor's bookkeeping between nodes is not counted."""
        if runs < 1:
            raise InputError(f"runs must be at least 1, not {runs}")
        if not isinstance(input_feed, Mapping) and len(self._inputs) == 1:     # profile(x), as run(x)
            input_feed = {self._inputs[0].name: input_feed}
        feeds = self._check(input_feed)
        self.run(None, feeds)
        steps = self._executor.steps()
        samples = np.empty((runs, len(steps)))
        for r in range(runs):
            times = [0.0] * len(steps)
            self._run_graph(feeds, None, times)
            samples[r] = times
        seconds = np.median(samples, axis=0)
        rows = []
        for step, t in zip(steps, seconds):
            held = ", ".join(self._held_as(step.inputs[i]) for i in sorted(step.raw) if step.inputs[i] in self._tensors)
            if self.mode == "stream" and held:
                held = "decoded per run: " + held
            rows.append(NodeTime(step.node.name or step.outputs[0], op_types(step), held, float(t)))
        return rows

    def _held_as(self, name: str) -> str:
        """:func:`held_as` for a stored tensor; in stream mode, a compressed one's form for its node
        (built once more to be described)."""
        value, t = self._cache.get(name), self._tensors[name]
        if value is None and self.mode == "stream" and t.record.encoding in (QUANTIZED, SPARSE):
            return held_as(stream_weight(t, self._grouping.get(name, memory.ROWS)))
        return held_as(value)

    def _check(self, feed: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """The feed as arrays, or InputError naming the unknown, mistyped or missing input."""
        expected, fixed = self._expected, self._fixed_dims
        if type(feed) is not dict and not isinstance(feed, Mapping):
            raise InputError(f"the feed must be a dict {{input name: array}}, not {type(feed).__name__}; "
                             "run(x) takes the array of a one-input model")
        feeds = {}
        for name, value in feed.items():
            arg = expected.get(name)
            if arg is None:
                raise InputError(f"unknown input(s) {', '.join(repr(n) for n in feed if n not in expected)}; "
                                 f"the model's inputs are {self._described()}")
            try:
                x = value if type(value) is np.ndarray else np.asarray(value)
            except ValueError as e:     # a ragged list
                raise InputError(f"input {name!r} is not an array ({e})") from None
            if x.dtype != arg.dtype:
                raise InputError(f"input {name!r} must be {arg.dtype} ({arg.type}), got {x.dtype}; "
                                 f"convert it with x.astype(np.{arg.dtype.name})")
            if arg.shape is not None:
                shape = x.shape
                wrong = len(shape) != len(arg.shape)
                if not wrong:
                    for i, d in fixed[name]:        # a loop, not any(...): 0.3 us less a call
                        if shape[i] != d:
                            wrong = True
                            break
                if wrong:
                    raise InputError(f"input {name!r} must have shape {arg.shape} "
                                     f"(names are free dimensions), got {list(shape)}")
            feeds[name] = x
        if len(feeds) != len(expected):
            raise InputError(f"missing input(s) {', '.join(n for n in expected if n not in feed)}; "
                             f"expected {self._described()}")
        return feeds

    def _described(self) -> str:
        return ", ".join(f"{i.name} {i.type} {i.shape}" for i in self._inputs)

    def close(self) -> None:
        """Drop decoded weights and unmap the file; the session cannot run afterwards."""
        self._closed = True
        self._cache.clear()
        self._nested_cache.clear()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        raise InputError("a Session cannot be pickled or copied (it maps its file): send the model's path or "
                         "bytes and open a Session where it runs")

    def __repr__(self) -> str:
        source = self._file.path or f"{self._file.file_bytes} bytes"
        return f"<dcrt.Session {source} mode={self.mode}{' closed' if self._closed else ''}>"
