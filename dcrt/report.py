"""Size and per-layer reports (``dcrt size``, ``dcrt inspect``) computed from a ``.dcm`` file alone."""
from __future__ import annotations

import gzip
import os
from typing import Any, Dict, List, Optional

from .errors import ConversionError, FormatError
from .files import read_bytes
from .format import DcmFile, open_dcm
from .format.tensor import QUANTIZED, SPARSE
from .graph import all_nodes
from .memory import ROWS, dense_bytes, groupings, index_bytes, resident_bytes, stream_bytes


def layer_rows(dcm: DcmFile, grouping: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """One row per stored tensor, in graph order, from the stored stats (no decoding); ``grouping``:
    ``dcrt.memory.groupings`` of the graph, when the caller has it."""
    graph, tensors = dcm.model.graph, dcm.tensors      # subgraphs' weights too
    order, ops = [], {}
    for node in all_nodes(graph):
        for name in node.inputs:
            if name in tensors and name not in ops:
                ops[name] = node.op_type
                order.append(name)
    order += sorted(set(tensors) - set(ops))
    grouping = groupings(graph) if grouping is None else grouping
    rows = []
    for name in order:
        t = tensors[name]
        s, rec = t.stats, t.record
        coded = rec.encoding in (QUANTIZED, SPARSE)
        g = grouping.get(name, ROWS)
        rows.append({
            "layer": name, "op": ops.get(name, ""), "shape": list(t.shape), "encoding": t.encoding,
            "weights": s.element_count, "sparsity": s.sparsity, "codebook": s.codebook_size,
            "index_bits": s.index_bits if coded else 0, "coder": rec.indices.name() if rec.indices else "-",
            "bits_per_weight": s.bits_per_weight, "original_bytes": s.original_bytes,
            "coded_bytes": s.coded_bytes, "ratio": s.ratio,
            # running memory of this tensor in each mode (stream: while its node runs)
            "memory_bytes": {"index": index_bytes(rec, g), "dense": dense_bytes(rec), "stream": stream_bytes(rec, g)}})
    return rows


def totals(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Totals over rows: weights, bytes, average bits per weight, compression ratio."""
    weights = sum(r["weights"] for r in rows)
    nonzero = sum(r["weights"] * (1 - r["sparsity"]) for r in rows)
    orig, coded = sum(r["original_bytes"] for r in rows), sum(r["coded_bytes"] for r in rows)
    return {"layers": len(rows), "weights": weights, "sparsity": 1 - nonzero / weights if weights else 0.0,
            "original_bytes": orig, "coded_bytes": coded,
            "bits_per_weight": 8.0 * coded / weights if weights else 0.0,
            "ratio": orig / coded if coded else 1.0}


def slice_bytes(dcm: DcmFile, grouping: Optional[Dict[str, str]] = None) -> int:
    """Bytes of the 32-row slices that a session adds, at its first batch-1 run on x86 with AVX-512
    and numba, to the pruned recurrent weights it holds (an LSTM's or GRU's ``R``:
    ``runtime/indexed.py``'s ``SlicedRows``), beside their index form: not in the index-mode
    figure, which holds on every machine. Built from the decoded weights as the session builds
    them (the LSTM classifier's ``R``: 68 KB against its 55 KB of table slots)."""
    from .runtime.indexed import hold, sliced_bytes
    from .runtime.ops.rnn import candidate_split
    from .runtime.session import indexed_weight
    grouping = groupings(dcm.model.graph) if grouping is None else grouping
    held: Dict[str, Any] = {}
    for node in all_nodes(dcm.model.graph):
        name = node.inputs[2] if node.op_type in ("LSTM", "GRU") and len(node.inputs) > 2 else ""
        t = dcm.tensors.get(name)
        if t is None or t.record.encoding not in (QUANTIZED, SPARSE):
            continue
        if name not in held:
            held[name] = hold(indexed_weight(t, grouping.get(name, ROWS)))
        split = candidate_split(bool(node.attrs.get("linear_before_reset", 0)), t.shape[-1]) \
            if node.op_type == "GRU" else 0
        for m in getattr(held[name], "matrices", ()):
            m.held_slices(split)
    return sum(sliced_bytes(m) for w in held.values() for m in getattr(w, "matrices", ()))


def _memory(dcm: DcmFile, grouping: Dict[str, str]) -> Dict[str, int]:
    """The weight bytes of each mode (``memory.resident_bytes``) and the slices (:func:`slice_bytes`)."""
    records = (t.record for t in dcm.tensors.values())
    return {**resident_bytes(records, grouping, dcm.model.graph), "slices": slice_bytes(dcm, grouping)}


def inspect(path: str) -> Dict[str, Any]:
    """Everything ``dcrt inspect`` shows, as a dictionary."""
    with open_dcm(path) as dcm:
        g = dcm.model.graph
        grouping = groupings(g)
        rows = layer_rows(dcm, grouping)
        memory = _memory(dcm, grouping)
        return {"file": path, "producer": dcm.producer, "format_version": "%d.%d" % dcm.format_version,
                "opsets": dcm.model.opsets, "source": dcm.source,
                "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": v.shape} for v in g.inputs],
                "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": v.shape} for v in g.outputs],
                "nodes": len(g.nodes), "plan": dcm.plan, "layers": rows,
                "total": {**totals(rows), "memory_bytes": memory}}


def gzip_size(data: bytes) -> int:
    """Bytes after ``gzip -9``: what an app store or a download actually moves."""
    return len(gzip.compress(data, 9, mtime=0))


def size(path: str, original: Optional[str] = None) -> Dict[str, Any]:
    """Download / extracted / in-memory sizes of a ``.dcm``, against the original model."""
    try:
        data = read_bytes(path)
    except OSError as e:
        raise FormatError(f"cannot open {path}: {e.strerror}") from None
    try:
        with open_dcm(data) as dcm:
            memory = _memory(dcm, groupings(dcm.model.graph))
            source = dict(dcm.source)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    if original:
        try:
            blob = b"".join(read_bytes(p) for p in [original] + _external_files(original))
        except OSError as e:
            raise ConversionError(f"cannot read the original model {original}: {e.strerror or e}") from None
        except Exception as e:      # onnx's DecodeError for a damaged or non-ONNX file
            raise ConversionError(f"{original} is not a readable ONNX model ({type(e).__name__}: {e}); "
                                  "give the .onnx file the .dcm was converted from") from None
        source.update(file_name=os.path.basename(original), file_bytes=len(blob), gzip_bytes=gzip_size(blob))
    report = {"file": path, "download_bytes": gzip_size(data), "extracted_bytes": len(data),
              "memory_bytes": memory, "original": source}
    if source.get("file_bytes"):
        report["download_ratio"] = source["gzip_bytes"] / report["download_bytes"]
        report["extracted_ratio"] = source["file_bytes"] / report["extracted_bytes"]
    return report


def _external_files(path: str) -> List[str]:
    """External data files beside an ONNX model (only when onnx is installed)."""
    if not path.lower().endswith(".onnx"):
        return []
    try:
        import onnx
    except ImportError:
        return []
    from .converters.onnx_frontend import external_files
    return external_files(onnx.load(path, load_external_data=False), os.path.dirname(os.path.abspath(path)))


def human(n: float) -> str:
    """Bytes as B / KB / MB (powers of 1000, like app stores)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"
