"""Write a model and its coded tensors as a ``.dcm`` FlatBuffer (see ``schema/dcm.fbs``)."""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Dict, Mapping, Optional

import flatbuffers
import numpy as np

from .. import __version__
from ..codecs import EncodedStream
from ..graph import Graph, Model, Node, ValueInfo
from . import FILE_IDENTIFIER, FORMAT_MAJOR, FORMAT_MINOR, dtypes
from .digest import model_digest
from .fb import (Attribute, CoderStage, Dim, IndexStream, KeyValue, LayerStats as FbStats,
                 OpsetId, Source, Tensor)
from .fb import Graph as FbGraph
from .fb import Model as FbModel
from .fb import Node as FbNode
from .fb import ValueInfo as FbValueInfo
from .tensor import RAW, LayerStats, TensorRecord

ALIGN = 16         # raw tensor values start on 16 bytes so numpy can view a memory-mapped file in place
PAYLOAD_ALIGN = 4  # coded payloads are read as bytes (uncoded symbols as at most uint32)


def raw_record(name: str, array: np.ndarray) -> TensorRecord:
    """A tensor stored as its plain little-endian values."""
    array = np.asarray(array)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    stats = LayerStats(element_count=array.size, nonzero_count=int(np.count_nonzero(array)),
                       original_bytes=array.nbytes, coded_bytes=len(data))
    rec = TensorRecord(name, dtypes.to_onnx(array.dtype), tuple(int(d) for d in array.shape),
                       RAW, raw=data, stats=stats)
    rec.checksum = rec.digest()
    return rec


def to_bytes(model: Model, records: Optional[Mapping[str, TensorRecord]] = None,
             source: Optional[Dict[str, Any]] = None, plan: Optional[Dict[str, Any]] = None) -> bytes:
    """Serialise ``model``; initializers found in ``records`` are written coded, the rest raw."""
    return _Writer(dict(records or {})).model(model, source or {}, plan)


def write_dcm(path: str, model: Model, records: Optional[Mapping[str, TensorRecord]] = None,
              source: Optional[Dict[str, Any]] = None, plan: Optional[Dict[str, Any]] = None) -> int:
    """Write a ``.dcm`` file atomically (temporary file + rename); returns its size in bytes.

    If anything fails, no file (and no partial file) is left at ``path``.
    """
    data = to_bytes(model, records, source, plan)
    atomic_write(path, data)
    return len(data)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    A process killed mid-write (SIGKILL, power loss) leaves ``path`` as it was and a
    ``.dcrt-<pid>-*.part`` file, which the next write into that folder removes once its process is gone.
    """
    path = os.path.realpath(path)      # through a symbolic link: its target is replaced, the link kept
    folder = os.path.dirname(path)
    _remove_orphans(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".dcrt-{os.getpid()}-", suffix=".part", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)     # mkstemp makes 0600; a model file is as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def output_problem(path: str) -> Optional[str]:
    """What keeps :func:`atomic_write` from writing ``path`` (checked before any work is done), or None."""
    if not path:
        return "the output path is empty"
    target = os.path.realpath(path)
    if os.path.isdir(target):
        return f"{path} is a folder; give a file name"
    if os.path.exists(target) and not os.path.isfile(target):
        return f"{path} is not a regular file (a device, pipe or socket); give a file name"
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        return f"the folder {os.path.dirname(os.path.abspath(path))} does not exist; create it first"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    return None


def _remove_orphans(folder: str) -> None:
    """Delete the temporary files of writers that were killed (POSIX: their pid no longer exists)."""
    if os.name != "posix":
        return
    for name in os.listdir(folder):
        match = _PART.fullmatch(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)    # signal 0: does the process exist?
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        except (OSError, OverflowError):
            pass    # it exists under another user, or the name is odd: leave it


_PART = re.compile(r"\.dcrt-(\d+)-\w+\.part")


class _Writer:
    def __init__(self, records: Mapping[str, TensorRecord]):
        self.b = flatbuffers.Builder(1 << 16)
        self.records = records
        self.top: Mapping[str, Any] = {}     # the graph's own initializers, which ``records`` code

    def record(self, name: str, value) -> TensorRecord:
        """The coded record of a graph initializer, else ``value`` raw: a subgraph's initializer of the
        same name (an If branch's own ``W``) is another tensor, not the one the record codes."""
        if name in self.records and self.top.get(name) is value:
            return self.records[name]
        return raw_record(name, value)

    # -- vectors ------------------------------------------------------------------------------------
    def string(self, text: str) -> int:
        """A string stored once however often it occurs (names recur in nodes and tensors)."""
        shared = getattr(self.b, "CreateSharedString", self.b.CreateString)  # flatbuffers >= 23
        return shared(text)

    def bytes_vector(self, data, align: int = ALIGN) -> int:
        data = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(
            np.ascontiguousarray(data).view(np.uint8).ravel())
        b, n = self.b, len(data)
        b.StartVector(1, n, align)
        b.head = b.head - n
        b.Bytes[b.head:b.head + n] = data
        return b.EndVector()

    def numpy_vector(self, array, dtype: str) -> int:
        return self.b.CreateNumpyVector(np.ascontiguousarray(array, dtype=dtype))

    def offsets_vector(self, offsets) -> int:
        b = self.b
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    def strings_vector(self, strings) -> int:
        return self.offsets_vector([self.string(s) for s in strings])

    # -- tables ------------------------------------------------------------------------------------
    def stream(self, stream: Optional[EncodedStream]) -> int:
        if stream is None:
            return 0
        stages = []
        for s in stream.stages:
            lengths = self.numpy_vector(s.code_lengths, "u1") if s.code_lengths is not None else 0
            offsets = 0
            if s.chunk_bit_offsets is not None:
                if len(s.chunk_bit_offsets) and int(np.max(s.chunk_bit_offsets)) >= 1 << 32:
                    raise ValueError("a coded stream over 2^32 bits (512 MB) cannot be stored; "
                                     "split the tensor or use a smaller plan")
                offsets = self.numpy_vector(s.chunk_bit_offsets, "<u4")
            CoderStage.Start(self.b)
            CoderStage.AddCoder(self.b, int(s.coder))
            CoderStage.AddCount(self.b, int(s.count))
            CoderStage.AddAlphabet(self.b, int(s.alphabet))
            if lengths:
                CoderStage.AddCodeLengths(self.b, lengths)
            CoderStage.AddChunkSize(self.b, int(s.chunk_size))
            if offsets:
                CoderStage.AddChunkBitOffsets(self.b, offsets)
            CoderStage.AddMaxCodeWidth(self.b, int(s.max_code_width))
            stages.append(CoderStage.End(self.b))
        stage_vec = self.offsets_vector(stages)
        payload = self.bytes_vector(stream.payload, PAYLOAD_ALIGN)
        IndexStream.Start(self.b)
        IndexStream.AddStages(self.b, stage_vec)
        IndexStream.AddPayload(self.b, payload)
        return IndexStream.End(self.b)

    def tensor(self, rec: TensorRecord) -> int:
        b = self.b
        name = self.string(rec.name)
        shape = self.numpy_vector(np.asarray(rec.shape, dtype=np.int64), "<i8")
        raw = self.bytes_vector(rec.raw) if rec.encoding == RAW else 0
        book = self.numpy_vector(rec.codebook, "<f4") if rec.codebook is not None else 0
        streams = [self.stream(s) for s in (rec.indices, rec.relative_index, rec.column_counts)]
        Tensor.Start(b)
        Tensor.AddName(b, name)
        Tensor.AddDataType(b, rec.data_type)
        Tensor.AddShape(b, shape)
        Tensor.AddEncoding(b, rec.encoding)
        if raw:
            Tensor.AddRaw(b, raw)
        if book:
            Tensor.AddCodebook(b, book)
        for add, off in zip((Tensor.AddIndices, Tensor.AddRelativeIndex, Tensor.AddColumnCounts), streams):
            if off:
                add(b, off)
        Tensor.AddChecksum(b, rec.checksum)
        s = rec.stats
        Tensor.AddStats(b, FbStats.CreateLayerStats(
            b, s.element_count, s.nonzero_count, s.original_bytes, s.coded_bytes, s.codebook_size,
            s.index_bits, s.relative_index_bits))
        return Tensor.End(b)

    def attribute(self, name: str, value: Any) -> int:
        b = self.b
        kind, fields = _attribute_kind(value)
        offs = {}
        if kind == 3:
            offs["s"] = b.CreateString(value.decode("utf-8", "surrogateescape")
                                       if isinstance(value, bytes) else value)
        elif kind == 4:
            offs["t"] = self.tensor(raw_record("", value))
        elif kind == 5:
            offs["g"] = self.graph(value)
        elif kind == 6:
            offs["floats"] = self.numpy_vector(np.asarray(value, np.float32), "<f4")
        elif kind == 7:
            offs["ints"] = self.numpy_vector(np.asarray(value, np.int64).reshape(-1), "<i8")
        elif kind == 8:
            offs["strings"] = self.strings_vector(value)
        elif kind == 9:
            offs["tensors"] = self.offsets_vector([self.tensor(raw_record("", v)) for v in value])
        elif kind == 10:
            offs["graphs"] = self.offsets_vector([self.graph(g) for g in value])
        name_off = self.string(name)
        Attribute.Start(b)
        Attribute.AddName(b, name_off)
        Attribute.AddType(b, kind)
        if kind == 1:
            Attribute.AddF(b, float(value))
        elif kind == 2:
            Attribute.AddI(b, int(value))
        for key, add in (("s", Attribute.AddS), ("t", Attribute.AddT), ("g", Attribute.AddG),
                         ("floats", Attribute.AddFloats), ("ints", Attribute.AddInts),
                         ("strings", Attribute.AddStrings), ("tensors", Attribute.AddTensors),
                         ("graphs", Attribute.AddGraphs)):
            if key in offs:
                add(b, offs[key])
        return Attribute.End(b)

    def node(self, node: Node) -> int:
        b = self.b
        attrs = self.offsets_vector([self.attribute(k, node.attrs[k]) for k in sorted(node.attrs)])
        ins, outs = self.strings_vector(node.inputs), self.strings_vector(node.outputs)
        name, op, domain = (self.string(x) for x in (node.name, node.op_type, node.domain))
        FbNode.Start(b)
        FbNode.AddName(b, name)
        FbNode.AddOpType(b, op)
        FbNode.AddDomain(b, domain)
        FbNode.AddInputs(b, ins)
        FbNode.AddOutputs(b, outs)
        FbNode.AddAttributes(b, attrs)
        return FbNode.End(b)

    def value_info(self, vi: ValueInfo) -> int:
        b = self.b
        dims = []
        for d in vi.shape or []:
            param = self.string(d) if isinstance(d, str) else 0
            Dim.Start(b)
            if isinstance(d, (int, np.integer)):
                Dim.AddValue(b, int(d))
            if param:
                Dim.AddParam(b, param)
            dims.append(Dim.End(b))
        dim_vec = self.offsets_vector(dims)
        name = self.string(vi.name)
        FbValueInfo.Start(b)
        FbValueInfo.AddName(b, name)
        FbValueInfo.AddDataType(b, dtypes.to_onnx(vi.dtype))
        FbValueInfo.AddHasShape(b, vi.shape is not None)
        FbValueInfo.AddShape(b, dim_vec)
        return FbValueInfo.End(b)

    def graph(self, g: Graph) -> int:
        b = self.b
        inits = self.offsets_vector([self.tensor(self.record(n, v)) for n, v in sorted(g.initializers.items())])
        nodes = self.offsets_vector([self.node(n) for n in g.nodes])
        ins = self.offsets_vector([self.value_info(v) for v in g.inputs])
        outs = self.offsets_vector([self.value_info(v) for v in g.outputs])
        name = b.CreateString(g.name)
        FbGraph.Start(b)
        FbGraph.AddName(b, name)
        FbGraph.AddNodes(b, nodes)
        FbGraph.AddInputs(b, ins)
        FbGraph.AddOutputs(b, outs)
        FbGraph.AddInitializers(b, inits)
        return FbGraph.End(b)

    def model(self, model: Model, source: Dict[str, Any], plan: Optional[Dict[str, Any]]) -> bytes:
        b = self.b
        self.top = model.graph.initializers
        graph = self.graph(model.graph)
        opsets = []
        for domain, version in sorted(model.opsets.items()):
            d = b.CreateString(domain)
            OpsetId.Start(b)
            OpsetId.AddDomain(b, d)
            OpsetId.AddVersion(b, int(version))
            opsets.append(OpsetId.End(b))
        opset_vec = self.offsets_vector(opsets)
        meta = dict(model.metadata)
        if plan is not None:
            meta["dcrt.plan"] = json.dumps(plan, sort_keys=True, separators=(",", ":"))
        pairs = []
        for key, value in sorted(meta.items()):
            k, v = b.CreateString(key), b.CreateString(value)
            KeyValue.Start(b)
            KeyValue.AddKey(b, k)
            KeyValue.AddValue(b, v)
            pairs.append(KeyValue.End(b))
        meta_vec = self.offsets_vector(pairs)
        fmt, fname = b.CreateString(source.get("format", "")), b.CreateString(source.get("file_name", ""))
        Source.Start(b)
        Source.AddFormat(b, fmt)
        Source.AddFileName(b, fname)
        Source.AddFileBytes(b, int(source.get("file_bytes", 0)))
        Source.AddGzipBytes(b, int(source.get("gzip_bytes", 0)))
        Source.AddWeightBytes(b, int(source.get("weight_bytes", 0)))
        src = Source.End(b)
        producer_name = model.producer or f"dcrt {__version__}"
        digest = model_digest(model.graph, lambda n, v: self.record(n, v).checksum, model.opsets, meta,
                              producer_name, source)
        producer = b.CreateString(producer_name)
        FbModel.Start(b)
        FbModel.AddFormatMajor(b, FORMAT_MAJOR)
        FbModel.AddFormatMinor(b, FORMAT_MINOR)
        FbModel.AddProducer(b, producer)
        FbModel.AddGraph(b, graph)
        FbModel.AddOpsets(b, opset_vec)
        FbModel.AddMetadata(b, meta_vec)
        FbModel.AddSource(b, src)
        FbModel.AddGraphChecksum(b, digest)
        root = FbModel.End(b)
        b.FinishSizePrefixed(root, FILE_IDENTIFIER)
        return bytes(b.Output())


def _attribute_kind(value: Any):
    """ONNX AttributeType of a Python attribute value."""
    if isinstance(value, Graph):
        return 5, None
    if isinstance(value, np.ndarray):
        return 4, None
    if isinstance(value, (str, bytes)):
        return 3, None
    if isinstance(value, (bool, int, np.integer)):
        return 2, None
    if isinstance(value, (float, np.floating)):
        return 1, None
    if isinstance(value, (list, tuple)):
        items = list(value)
        if all(isinstance(v, Graph) for v in items) and items:
            return 10, None
        if all(isinstance(v, np.ndarray) for v in items) and items:
            return 9, None
        if all(isinstance(v, (str, bytes)) for v in items) and items:
            return 8, None
        if all(isinstance(v, (bool, int, np.integer)) for v in items):
            return 7, None
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
            return 6, None
    raise TypeError(f"cannot store attribute value {value!r}")
