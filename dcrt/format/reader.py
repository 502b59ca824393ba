"""Read a ``.dcm`` file: memory-mapped, structure parsed and checked at open, tensors decoded lazily.

Every value read from the file is untrusted: the buffer is size-prefixed (truncation is caught at
once), flatbuffers offsets are bounds-checked by ``np.frombuffer``/``struct``, the graph's digest is
verified at open, and each tensor's checksum is verified before its first decode. Any inconsistency
becomes a :class:`~dcrt.errors.FormatError`; never a flatbuffers or numpy traceback.

A checksum is a CRC, not a signature: a hostile file can carry valid ones. So the parse itself is
bounded too (:class:`_Limits`): the work done (tables visited, list items built) by the file's size,
subgraph nesting by ``MAX_DEPTH``, and the elements all tensor shapes claim, per tensor by
``MAX_ELEMENTS`` and in total by ``ELEMENTS_PER_BYTE`` times the file's size (at least
``MIN_ELEMENT_BUDGET``). Decoding (``dcrt.format.tensor``) then checks each stream's symbol counts
against the tensor's shape before decoding it, so no allocation exceeds what the shapes claim.
"""
from __future__ import annotations

import functools
import json
import mmap
import os
import struct
import threading
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..codecs import Coder, EncodedStream, Stage
from ..errors import FormatError, VersionError
from ..graph import Graph, Model, Node, ValueInfo, all_initializers
from . import FILE_IDENTIFIER, FORMAT_MAJOR, dtypes
from .digest import model_digest
from .fb.Model import Model as FbModel
from .tensor import ENCODING_NAMES, RAW, LayerStats, TensorRecord

MAX_RANK = 32
MAX_DIM = 1 << 40
MAX_ELEMENTS = (1 << 31) - 1      # elements of one tensor (indexable with int32, as on 32-bit ARM)
MAX_DEPTH = 64                    # subgraphs nested in subgraphs (If / Loop bodies)
# Elements all the file's tensors may claim together: ELEMENTS_PER_BYTE per byte of file, at least
# MIN_ELEMENT_BUDGET. Files the converter writes claim at most ~8 a byte (the paper's 35-49x
# compression is ~10); 256 leaves room for extreme pruning while refusing a small file that claims
# gigabytes of weights (all-zero sparse columns, an LZW bomb) with valid checksums.
# A trusted file beyond these limits can be opened after raising them (dcrt.format.reader.*).
ELEMENTS_PER_BYTE = 256
MIN_ELEMENT_BUDGET = 1 << 24


class _Limits:
    """What one parse may still spend: work units (tables and list items) and tensor elements.

    The work budget is one unit per byte of file. A table, offset or list item costs a unit and takes
    at least 4 bytes of a file; a payload byte costs a sixteenth. Files the converter writes spend
    about 0.06 units a byte (and claim at most ~8 elements a byte): only a file whose offsets share
    tables (a DAG or cycle where the reader expects a tree) can exhaust the budget, and it is refused
    instead of being parsed exponentially.
    """

    def __init__(self, file_bytes: int):
        self.work = max(int(file_bytes), 4096)
        self.elements = max(MIN_ELEMENT_BUDGET, ELEMENTS_PER_BYTE * int(file_bytes))
        self.depth = 0

    def spend(self, units: int = 1) -> None:
        self.work -= int(units)
        if self.work < 0:
            raise FormatError("the file's structure is damaged: its tables refer to each other more "
                              "often than a file of this size can hold (shared or cyclic offsets)")

    def spend_bytes(self, nbytes: int) -> None:
        """A vector the checksum will read: a sixteenth of a unit a byte, so that tables sharing one
        large payload cannot make verification read the file many times over."""
        self.spend(int(nbytes) >> 4)

    def claim(self, name: str, shape: Tuple[int, ...]) -> None:
        elements = 1
        for d in shape:
            elements *= d                     # Python ints: no overflow
        if elements > MAX_ELEMENTS:
            raise FormatError(f"tensor {name!r} has {elements} elements (shape {shape}), more than "
                              f"dcrt reads ({MAX_ELEMENTS}); the file is damaged")
        self.elements -= elements
        if self.elements < 0:
            raise FormatError(f"the tensor shapes (at {name!r}) claim more elements than a file of this "
                              f"size can hold ({ELEMENTS_PER_BYTE} a byte): the file is damaged or hostile; "
                              "if you trust it, raise dcrt.format.reader.ELEMENTS_PER_BYTE")


class StoredTensor:
    """A tensor of a ``.dcm`` file, decoded only when asked.

    ``shape``, ``dtype``, ``encoding`` and ``stats`` come from the file's table (no decoding).
    ``decode()`` gives the dense values, ``index_form()`` the codebook and per-element indices,
    ``csc()`` the sparse positions; each verifies the tensor's checksum first (once).
    """

    def __init__(self, record: TensorRecord):
        self.record = record
        self._verified = False
        self._lock = threading.Lock()

    name = property(lambda self: self.record.name)
    shape = property(lambda self: tuple(self.record.shape))
    stats = property(lambda self: self.record.stats)
    encoding = property(lambda self: ENCODING_NAMES.get(self.record.encoding, "unknown"))
    codebook = property(lambda self: self.record.codebook)

    @property
    def dtype(self) -> np.dtype:
        return self.record.dtype

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def ndim(self) -> int:
        return len(self.record.shape)

    def verify(self) -> None:
        """Check the checksum (once per tensor); raises FormatError naming the tensor."""
        if not self._verified:
            with self._lock:
                if not self._verified:
                    self.record.verify()
                    self._verified = True

    def decode(self) -> np.ndarray:
        """Dense values, of the tensor's dtype and shape."""
        self.verify()
        return self.record.decode()

    dense = decode  # what the runtime's kernels call on a weight they cannot use in index form

    def index_form(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(codebook, indices)`` with ``codebook[indices]`` the dense values (see TensorRecord)."""
        self.verify()
        return self.record.index_form()

    def csc(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sparse tensors: ``(col_ptr, row_indices, symbols)`` of the 2-D view; ``codebook[s-1]``."""
        self.verify()
        return self.record.csc()

    def entries(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sparse tensors: the stored entries ``(symbols, relative_indices, column_counts)``."""
        self.verify()
        return self.record.entries()

    def __repr__(self) -> str:
        return f"StoredTensor({self.name!r}, shape={self.shape}, {self.encoding})"


class DcmFile:
    """An open ``.dcm`` file: ``model`` (graph with :class:`StoredTensor` initializers) and facts."""

    def __init__(self, buffer, mapping: Optional[mmap.mmap] = None, path: Optional[str] = None,
                 identity: Optional[Tuple[int, int]] = None):
        self._mmap = mapping
        self._identity = identity       # (st_dev, st_ino) of the mapped file
        self.path = path
        self.file_bytes = len(buffer)
        with _as_format_error("the file's structure"):
            root = _root(buffer)
            limits = _Limits(self.file_bytes)
            self.format_version = (root.FormatMajor(), root.FormatMinor())
            self.producer = _str(root.Producer())
            graph = _graph(root.Graph(), limits, top=True)
            limits.spend(root.OpsetsLength() + root.MetadataLength())
            opsets = {_str(o.Domain()): int(o.Version())
                      for o in (root.Opsets(i) for i in range(root.OpsetsLength()))}
            metadata = {_str(kv.Key()): _str(kv.Value())
                        for kv in (root.Metadata(i) for i in range(root.MetadataLength()))}
            src = root.Source()
            self.source: Dict[str, Any] = {} if src is None else {
                "format": _str(src.Format()), "file_name": _str(src.FileName()),
                "file_bytes": src.FileBytes(), "gzip_bytes": src.GzipBytes(),
                "weight_bytes": src.WeightBytes()}
            stored = root.GraphChecksum()
        actual = model_digest(graph, lambda n, v: v.record.checksum, opsets, metadata, self.producer,
                              self.source)
        if actual != stored:
            raise FormatError("the .dcm graph is damaged (graph checksum mismatch); "
                              "download or convert the model again")
        try:
            self.plan = json.loads(metadata.pop("dcrt.plan", "null") or "null")
        except (ValueError, RecursionError) as e:
            raise FormatError(f"the .dcm's stored compression plan is not valid JSON ({type(e).__name__})") from None
        self.model = Model(graph, opsets or {"": 17}, metadata, self.producer)

    @functools.cached_property
    def tensors(self) -> Dict[str, StoredTensor]:
        """The initializers, by name: the graph's and its subgraphs' (If branches, Loop bodies);
        gathered once, the graph does not change after open."""
        return all_initializers(self.model.graph)

    def verify(self) -> Dict[str, str]:
        """Check every checksum and decode every tensor; returns ``{name: problem}`` (empty if sound)."""
        problems = {}
        for name, t in self.tensors.items():
            try:
                t.decode()
            except FormatError as e:
                problems[name] = str(e)
        return problems

    @property
    def mapped(self) -> bool:
        """Whether the tensors are read from a memory-mapped file (not from bytes given)."""
        return self._mmap is not None

    def check_size(self) -> None:
        """FormatError if the mapped file has been cut short on disk since it was opened (written over
        in place): reading a mapped page past its new end would end the process (SIGBUS). A file
        replaced by a rename or deleted is no danger: the map keeps the old one."""
        if self._identity is None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity and st.st_size < self.file_bytes:
            raise FormatError(f"{self.path} was written over while open ({st.st_size} of its {self.file_bytes} "
                              "bytes left): open it again. Replace a model in use by renaming a new file over it")

    def close(self) -> None:
        """Release the memory map (tensors must not be used afterwards)."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # numpy views still point into the map; it closes when they are gone
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_dcm(source: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> DcmFile:
    """Open a ``.dcm`` from a path (memory-mapped) or from bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        # a buffer the caller may change or resize: the tensors' views would see it (or pin it)
        mutable = isinstance(source, bytearray) or (isinstance(source, memoryview) and not source.readonly)
        return DcmFile(bytes(source) if mutable else source)
    path = os.fspath(source)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"cannot open {path}: {e.strerror}") from None
    with f:
        st = os.fstat(f.fileno())
        if st.st_size < 12:
            raise FormatError(f"{path} is not a .dcm file (only {st.st_size} bytes)")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return DcmFile(mapping, mapping, path, (st.st_dev, st.st_ino))
    except FormatError as e:
        error = FormatError(f"{path}: {e}")
    # out of the except block: its traceback, whose frames held the parse's views of the map, is gone
    try:
        mapping.close()
    except BufferError:     # a view still alive in a reference cycle: the map closes when collected
        pass
    raise error


# -- parsing ----------------------------------------------------------------------------------------
class _as_format_error:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, FormatError):
            return False
        if isinstance(error, Exception):
            raise FormatError(f"{self.what} is damaged or not a .dcm ({type(error).__name__}: {error})") from None
        return False


def _root(buffer) -> FbModel:
    n = len(buffer)
    if n < 12:
        raise FormatError(f"not a .dcm file (only {n} bytes)")
    (size,) = struct.unpack_from("<I", buffer, 0)
    if bytes(buffer[8:12]) != FILE_IDENTIFIER:
        raise FormatError("not a .dcm file (no DCM1 identifier); convert the model with `dcrt convert`")
    if size != n - 4:
        raise FormatError(f"the .dcm file is truncated or has trailing bytes: header says {size + 4} "
                          f"bytes, file has {n}; download or convert it again")
    root = FbModel.GetRootAs(buffer, 4)
    major = root.FormatMajor()
    if major > FORMAT_MAJOR:
        raise VersionError(f"this .dcm has format version {major}.{root.FormatMinor()}, newer than "
                           f"this dcrt reads ({FORMAT_MAJOR}.x); upgrade dcrt (pip install -U dcrt)")
    if major < 1:
        raise FormatError(f"invalid .dcm format version {major}")
    return root


def _str(value) -> str:
    return value.decode("utf-8") if value is not None else ""


def _array(getter, length_getter, dtype) -> np.ndarray:
    """A vector field as a numpy view (empty when absent); bounds checked by np.frombuffer."""
    if length_getter() == 0:
        return np.zeros(0, dtype=dtype)
    return getter()


def _stream(fb, limits: _Limits) -> Optional[EncodedStream]:
    if fb is None:
        return None
    stages = []
    limits.spend(1 + fb.StagesLength())
    for i in range(fb.StagesLength()):
        s = fb.Stages(i)
        try:
            coder = Coder(s.Coder())
        except ValueError:
            raise FormatError(f"unknown coder id {s.Coder()}; a newer dcrt may read this file") from None
        lengths = None if s.CodeLengthsIsNone() else _array(s.CodeLengthsAsNumpy, s.CodeLengthsLength, np.uint8)
        offsets = None if s.ChunkBitOffsetsIsNone() else _array(
            s.ChunkBitOffsetsAsNumpy, s.ChunkBitOffsetsLength, np.uint32)
        limits.spend_bytes(0 if lengths is None else lengths.nbytes)
        limits.spend_bytes(0 if offsets is None else offsets.nbytes)
        stages.append(Stage(coder, int(s.Count()), int(s.Alphabet()), lengths, int(s.ChunkSize()),
                            offsets, int(s.MaxCodeWidth())))
    payload = _array(fb.PayloadAsNumpy, fb.PayloadLength, np.uint8)
    limits.spend_bytes(payload.nbytes)
    return EncodedStream(stages, payload)


def _tensor(fb, limits: _Limits) -> TensorRecord:
    if fb is None:
        raise FormatError("a tensor table is missing")
    limits.spend()
    name = _str(fb.Name())
    if fb.ShapeLength() > MAX_RANK:
        raise FormatError(f"tensor {name!r} has rank {fb.ShapeLength()}, more than {MAX_RANK}")
    shape = tuple(int(d) for d in _array(fb.ShapeAsNumpy, fb.ShapeLength, np.int64))
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise FormatError(f"tensor {name!r} has an invalid shape {shape}")
    limits.claim(name, shape)
    if fb.Encoding() not in ENCODING_NAMES:
        raise FormatError(f"tensor {name!r} has an unknown encoding {fb.Encoding()}; a newer dcrt may read it")
    dtypes.to_numpy(fb.DataType())
    st = fb.Stats()
    stats = LayerStats() if st is None else LayerStats(
        st.ElementCount(), st.NonzeroCount(), st.OriginalBytes(), st.CodedBytes(),
        st.CodebookSize(), st.IndexBits(), st.RelativeIndexBits())
    book = None if fb.CodebookIsNone() else np.asarray(
        _array(fb.CodebookAsNumpy, fb.CodebookLength, np.float32), dtype=np.float32)
    raw = _array(fb.RawAsNumpy, fb.RawLength, np.uint8) if fb.Encoding() == RAW else b""
    limits.spend_bytes(len(raw) + (0 if book is None else book.nbytes))
    return TensorRecord(name, fb.DataType(), shape, fb.Encoding(), raw, book,
                        _stream(fb.Indices(), limits), _stream(fb.RelativeIndex(), limits),
                        _stream(fb.ColumnCounts(), limits), stats, fb.Checksum())


def _small_tensor(fb, limits: _Limits) -> np.ndarray:
    """A tensor inside an attribute (Constant value etc.): small, decoded and verified at open."""
    record = _tensor(fb, limits)
    record.verify()   # TensorRecord.decode() no longer verifies: StoredTensor does, and so must this
    return record.decode()


def _attribute(fb, limits: _Limits) -> Tuple[str, Any]:
    limits.spend()
    kind, name = fb.Type(), _str(fb.Name())
    if kind == 1:
        return name, float(np.float32(fb.F()))
    if kind == 2:
        return name, int(fb.I())
    if kind == 3:
        return name, _str(fb.S())
    if kind == 4:
        return name, _small_tensor(fb.T(), limits)
    if kind == 5:
        return name, _graph(fb.G(), limits)
    if kind == 6:
        limits.spend(fb.FloatsLength())
        return name, [float(v) for v in _array(fb.FloatsAsNumpy, fb.FloatsLength, np.float32)]
    if kind == 7:
        limits.spend(fb.IntsLength())
        return name, [int(v) for v in _array(fb.IntsAsNumpy, fb.IntsLength, np.int64)]
    if kind == 8:
        limits.spend(fb.StringsLength())
        return name, [_str(fb.Strings(i)) for i in range(fb.StringsLength())]
    if kind == 9:
        return name, [_small_tensor(fb.Tensors(i), limits) for i in range(fb.TensorsLength())]
    if kind == 10:
        return name, [_graph(fb.Graphs(i), limits) for i in range(fb.GraphsLength())]
    raise FormatError(f"attribute {name!r} has an unknown type {kind}")


def _value_info(fb, limits: _Limits) -> ValueInfo:
    limits.spend(1 + fb.ShapeLength())
    shape = None
    if fb.HasShape():
        shape = []
        for i in range(fb.ShapeLength()):
            d = fb.Shape(i)
            param = _str(d.Param())
            shape.append(param if param else (int(d.Value()) if d.Value() >= 0 else None))
    return ValueInfo(_str(fb.Name()), dtypes.to_numpy(fb.DataType()), shape)


def _graph(fb, limits: _Limits, top: bool = False) -> Graph:
    if fb is None:
        raise FormatError("the file has no graph")
    if limits.depth >= MAX_DEPTH:
        raise FormatError(f"subgraphs are nested more than {MAX_DEPTH} deep; the file is damaged")
    limits.depth += 1
    limits.spend()
    limits.spend(fb.NodesLength() + fb.InitializersLength() + fb.InputsLength() + fb.OutputsLength())
    nodes = []
    for i in range(fb.NodesLength()):
        n = fb.Nodes(i)
        limits.spend(n.AttributesLength())
        limits.spend(1 + n.InputsLength() + n.OutputsLength())
        attrs = dict(_attribute(n.Attributes(j), limits) for j in range(n.AttributesLength()))
        nodes.append(Node(_str(n.OpType()), [_str(n.Inputs(j)) for j in range(n.InputsLength())],
                          [_str(n.Outputs(j)) for j in range(n.OutputsLength())], attrs,
                          _str(n.Name()), _str(n.Domain())))
    inits = {}
    for i in range(fb.InitializersLength()):
        rec = _tensor(fb.Initializers(i), limits)
        inits[rec.name] = StoredTensor(rec)
    graph = Graph(nodes, [_value_info(fb.Inputs(i), limits) for i in range(fb.InputsLength())],
                  [_value_info(fb.Outputs(i), limits) for i in range(fb.OutputsLength())], inits,
                  _str(fb.Name()))
    limits.depth -= 1
    return graph
