"""How many bytes a model's weights occupy in memory in each runtime mode, from the file alone.

The runtime keeps weights in one of three forms (see ``dcrt.runtime.session``):

- ``index``: codebook + codebook indices (uint8/uint16); a pruned tensor keeps whichever is smaller
  of dense indices (pruned weights index a zero centroid) and CSR (indices + column positions:
  uint16 up to 65536 columns, int32 beyond; see :func:`position_dtype`), grouped by input for the
  weights of :func:`by_input` (some also by rows, as product-table slots: :data:`BOTH`) and as a
  matrix per direction for those of :func:`per_direction` (as product-table slots for an LSTM's or
  GRU's ``R``: :func:`table_slots`; :func:`groupings`). That holds for the
  file's SPARSE tensors and for its QUANTIZED ones with a zero centroid (:func:`pruned`): the
  converter picks the encoding that downloads smaller, and at 90 % pruning that can be QUANTIZED
  (an LSTM's 512x128 recurrent weight) while in memory the CSR takes a third of the dense indices.
- ``dense``: every weight decoded once to float32.
- ``stream``: nothing kept; each layer's weight is decoded into an index form when its node runs and
  dropped after it (peak: the largest such form, :func:`stream_bytes`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Set

import numpy as np

from .codecs import symbol_dtype
from .format.tensor import QUANTIZED, SPARSE, TensorRecord
from .graph import Graph, all_nodes, subgraphs
from .sparse import matrix_shape

MODES = ("index", "dense", "stream")


def position_dtype(columns: int) -> np.dtype:
    """dtype of a CSR weight's column positions: uint16 while every column fits (2 bytes per kept
    weight instead of 4: VGG FC6/FC7 in index mode 27.4 -> 16.9 MB), int32 beyond."""
    return np.dtype(np.uint16 if columns <= 1 << 16 else np.int32)


#: The largest product table a batch-1 product by rows builds (``_numba_index.product_table``):
#: columns x :func:`table_stride` entries, 256 KB of float32, which stays in a core's L2; its slots
#: fit uint16.
PRODUCT_TABLE_ENTRIES = 1 << 16


def table_stride(codebook_entries: int) -> int:
    """Entries a column takes in a product table: the codebook's, rounded up to a power of two, so
    that a slot (``column * stride + symbol``) splits into its column and symbol by a shift and a mask
    (the recurrent kernels expand rows so at batch 3 and more)."""
    return 1 << max(0, codebook_entries - 1).bit_length()


def product_table_pays(columns: int, codebook_entries: int, kept: int) -> bool:
    """Whether a batch-1 product by rows of a CSR weight pays for a table of every ``centroid *
    activation`` (built per call: ``columns * codebook_entries`` multiplies, vectorised), from which
    each kept weight takes its product in one load: when the table fits :data:`PRODUCT_TABLE_ENTRIES`
    and there are at least a third as many kept weights as products (LeNet-300-100's fc1: 23,520 kept,
    25,088 products; 7.5 us from the table against 9.1-10.0 by multiplying, of which ~0.5 building it)."""
    fits = columns * table_stride(codebook_entries) <= PRODUCT_TABLE_ENTRIES
    return fits and 3 * kept >= columns * codebook_entries


#: How index mode groups the kept weights of a pruned tensor in CSR form (see :func:`groupings`):
#: by the rows of the 2-D view (the default), by input (:func:`by_input`), both, as one matrix
#: per direction of a recurrent weight (:func:`per_direction`), or per direction as product-table
#: slots (:func:`table_slots`).
ROWS, INPUTS, BOTH, DIRECTIONS = "rows", "inputs", "inputs and rows", "directions"
SLOTS = "directions, as table slots"
RECURRENT = ("LSTM", "GRU", "RNN")


def _read_only_as(graph: Graph, accept: Callable[[Any, int], Any]) -> Set[str]:
    """Names that every reader, in the graph and its subgraphs, reads as ``accept(node, slot)``, and
    that are not graph outputs."""
    ok: Set[str] = set()
    other: Set[str] = set()

    def visit(g: Graph) -> None:
        other.update(v.name for v in g.outputs)
        for node in g.nodes:
            for i, name in enumerate(node.inputs):
                (ok if accept(node, i) else other).add(name)
            for _, sub in subgraphs(node):
                visit(sub)
    visit(graph)
    return ok - other


def by_input(graph: Graph) -> FrozenSet[str]:
    """Pruned 2-D initializers of a ``.dcm`` graph read only as the weight of ``Gemm(transB=1)``,
    ``x @ W.T`` (a PyTorch Linear), whose CSR form grouped by input takes at most 1/8 more bytes
    than grouped by output row.

    Index mode keeps such a pruned weight grouped by input (the file's CSC, i.e. the CSR of ``W.T``),
    so that the batch-1 product scatters the kept weights of each non-zero activation and skips the
    zero ones, as the EIE accelerator does (after a ReLU about half of them are zero). The bound
    leaves out weights with many inputs and few kept weights each, where the pointer per input
    would cost more than the skipping saves (32x1568 at 10 %: 40 % more bytes). One whose rows would
    take a product table is kept by rows as well (:data:`BOTH`, see :func:`groupings`).
    """
    gemm = _read_only_as(graph, lambda node, i: node.op_type == "Gemm" and not node.domain and i == 1
                         and node.attrs.get("transB", 0))
    return frozenset(n for n in gemm if _worth_grouping_by_input(graph.initializers.get(n)))


def per_direction(graph: Graph) -> FrozenSet[str]:
    """Pruned 3-D initializers read only as the ``W`` or ``R`` of an LSTM, GRU or RNN.

    The operator takes one direction ``[gates * hidden, inputs]`` at a time; index mode keeps a CSR
    matrix per direction, so that taking one is free (cut from a CSR over the directions it cost
    ~30 us per weight and run, each time) and column positions count within one row of inputs
    (uint16 unless a direction has more than 65,536 inputs).
    """
    recurrent = _read_only_as(graph, lambda node, i: node.op_type in RECURRENT and not node.domain and i in (1, 2))
    return frozenset(n for n in recurrent if _pruned_3d(graph.initializers.get(n)))


def table_slots(graph: Graph) -> FrozenSet[str]:
    """Of :func:`per_direction`'s weights, those read only as the ``R`` of an LSTM or GRU (whose
    compiled kernels read this form) whose rows take a product table (:func:`product_table_pays`,
    one direction's kept weights against its table).

    Each step multiplies R by a new ``h``, so the table is built per step and batch entry (256
    centroids by 128 units: ~0.8 us); each kept weight is then a uint16 slot (``column * stride +
    symbol``): one load, where the dense indices take three for every weight, pruned or not. The
    LSTM classifier's 60 %-pruned 512x128 R, one step: 12.8 -> 7.4 us, and 2 bytes a kept weight
    (0.8 a weight) against 1 a weight. A slot also names its column, so no CSR is kept beside it.
    """
    recurrent = _read_only_as(graph, lambda node, i: node.op_type in ("LSTM", "GRU") and not node.domain and i == 2)
    found = set()
    for name in recurrent & per_direction(graph):
        record = graph.initializers[name].record
        directions, columns = record.shape[0], record.shape[2]
        if product_table_pays(columns, record.stats.codebook_size + 1, record.stats.nonzero_count // directions):
            found.add(name)
    return frozenset(found)


#: Operators whose output is zero wherever their input is: a ReLU's zeros pass through them.
_KEEP_ZEROS = frozenset({"Flatten", "Reshape", "MaxPool", "Identity", "Dropout", "Squeeze", "Unsqueeze",
                         "Transpose"})


def _after_relu(producers: Dict[str, Any], name: str) -> bool:
    """Whether activation ``name`` is a Relu's output, directly or through :data:`_KEEP_ZEROS`
    operators (about half of it zeros, which the scatter by input skips); ``producers`` maps each
    value to the node computing it."""
    while name in producers:
        node = producers[name]
        if node.op_type == "Relu" and not node.domain:
            return True
        if node.op_type not in _KEEP_ZEROS or node.domain:
            return False
        name = node.inputs[0]
    return False


def groupings(graph: Graph) -> Dict[str, str]:
    """The initializers whose CSR form in index mode is not grouped by rows: :data:`DIRECTIONS` for
    :func:`per_direction` (:data:`SLOTS` for those of :func:`table_slots`); for :func:`by_input`
    :data:`INPUTS`, or :data:`BOTH` where a product by rows takes a product table
    (:func:`product_table_pays`) and some Gemm reading the weight gets its activations from
    elsewhere than a ReLU (a graph input, a pooling average: few zeros).

    A weight kept both ways (one more copy of its kept weights) computes one row of activations with
    fewer than a quarter zeros by rows from the table, the others by input, skipping the zeros: the
    table costs one load a kept weight, the scatter a load and a store of an output for each one it
    does not skip (LeNet-300-100's fc1, one core: 6.6 us from the table, 10.9 by input on dense
    activations, 4.5 by input on a digit's, 69 % zeros). The rows take a uint16 slot per kept weight
    (``column * stride + symbol``: where its product sits in the table) and a pointer per row."""
    found = {n: DIRECTIONS for n in per_direction(graph)}
    found.update({n: SLOTS for n in table_slots(graph)})
    producers = {out: node for node in graph.nodes for out in node.outputs}
    for name in by_input(graph):
        record = graph.initializers[name].record
        dense_input = any(not _after_relu(producers, node.inputs[0]) for node in graph.nodes
                          if node.op_type == "Gemm" and node.inputs[1:2] == [name])
        table = product_table_pays(record.shape[1], record.stats.codebook_size + 1, record.stats.nonzero_count)
        found[name] = BOTH if table and dense_input else INPUTS
    return found


def _worth_grouping_by_input(tensor) -> bool:
    record = getattr(tensor, "record", None)     # a .dcm graph's StoredTensor
    if record is None or len(record.shape) != 2 or not pruned(record):
        return False
    return 8 * _csr_bytes(record, INPUTS) <= 9 * _csr_bytes(record, ROWS)


def _pruned_3d(tensor) -> bool:
    record = getattr(tensor, "record", None)
    return record is not None and len(record.shape) == 3 and pruned(record)


def pruned(record: TensorRecord) -> bool:
    """Whether some weights of a compressed tensor are pruned: SPARSE, or QUANTIZED with the zero
    centroid the converter appends to the codebook for the pruned weights (its last entry)."""
    if record.encoding == SPARSE:
        return True
    return (record.encoding == QUANTIZED and record.stats.nonzero_count < record.size
            and len(record.codebook) == record.stats.codebook_size + 1 and record.codebook[-1] == 0)


def _symbol_bytes(record: TensorRecord) -> int:
    """Bytes of one symbol of a pruned tensor (its codebook plus the pruned symbol)."""
    return symbol_dtype(record.stats.codebook_size + 1).itemsize


def _csr_bytes(record: TensorRecord, grouping: str) -> int:
    """Bytes of the CSR form: per kept weight its symbol and position, per row an int32 pointer."""
    rows, columns = matrix_shape(record.shape)
    if grouping == BOTH:     # and the rows for the product table: a uint16 slot per kept weight
        return _csr_bytes(record, INPUTS) + 2 * record.stats.nonzero_count + (rows + 1) * 4
    if grouping == SLOTS:    # only the slots, a matrix per direction
        return 2 * record.stats.nonzero_count + record.shape[0] * (record.shape[1] + 1) * 4
    matrices = 1
    if grouping == INPUTS:      # the CSR of the transpose: a pointer per column, a row position per kept weight
        rows, columns = columns, rows
    elif grouping == DIRECTIONS:    # a [gates * hidden, inputs] matrix per direction
        matrices, rows, columns = record.shape[0], record.shape[1], record.shape[2]
    positions = position_dtype(columns).itemsize
    return record.stats.nonzero_count * (_symbol_bytes(record) + positions) + matrices * (rows + 1) * 4


def sparse_layout(record: TensorRecord, grouping: str = ROWS) -> str:
    """``"csr"`` or ``"dense"``: which index form the runtime keeps for a compressed tensor (CSR
    grouped as ``grouping`` says, see :func:`groupings`; only when :func:`pruned`)."""
    if not pruned(record):
        return "dense"
    grouping = INPUTS if grouping == BOTH else grouping      # the copy by rows goes with the CSR
    return "csr" if _csr_bytes(record, grouping) < record.size * _symbol_bytes(record) else "dense"


def index_bytes(record: TensorRecord, grouping: str = ROWS) -> int:
    """Resident bytes of one tensor in index mode."""
    book = 4 * (record.stats.codebook_size + 1)
    if record.encoding not in (QUANTIZED, SPARSE):
        return record.stats.original_bytes
    if sparse_layout(record, grouping) == "csr":
        return _csr_bytes(record, grouping) + book
    if record.encoding == QUANTIZED:
        return _quantized_bytes(record)
    return record.size * _symbol_bytes(record) + book


def _quantized_bytes(record: TensorRecord) -> int:
    """A QUANTIZED tensor's dense indices and its codebook as stored (the zero centroid only if pruned)."""
    return record.size * symbol_dtype(len(record.codebook)).itemsize + 4 * len(record.codebook)


#: Stream mode builds each compressed weight for one node in the index form quickest to make from the
#: file: a QUANTIZED tensor as its dense indices (as decoded), a SPARSE one as index mode keeps it but
#: without the rows as product-table slots (a second copy of the kept weights, built to be reused).
_STREAM_GROUPING = {BOTH: INPUTS, SLOTS: DIRECTIONS}


def stream_grouping(grouping: str) -> str:
    """How stream mode groups a SPARSE tensor's CSR, given its index-mode ``grouping``."""
    return _STREAM_GROUPING.get(grouping, grouping)


def stream_bytes(record: TensorRecord, grouping: str = ROWS) -> int:
    """Bytes of one tensor while stream mode holds it (for the length of its node)."""
    if record.encoding == QUANTIZED:
        return _quantized_bytes(record)
    return index_bytes(record, stream_grouping(grouping))


def dense_bytes(record: TensorRecord) -> int:
    """Resident bytes of one tensor decoded (float32 for compressed tensors)."""
    if record.encoding in (QUANTIZED, SPARSE):
        return record.size * 4
    return record.stats.original_bytes


def resident_bytes(records, grouping: Optional[Mapping[str, str]] = None,
                   graph: Optional[Graph] = None) -> Dict[str, int]:
    """Total weight bytes resident in each mode for an iterable of TensorRecords (``grouping``: what
    :func:`groupings` gives for their graph). Stream mode's is a peak: the raw tensors and the
    compressed weights of the one node that holds the most (``graph``'s nodes; without it, of the
    largest weight alone: a node holds all its weights at once, an LSTM its ``W`` and ``R``)."""
    records, grouping = list(records), grouping or {}
    raw = sum(dense_bytes(r) for r in records if r.encoding not in (QUANTIZED, SPARSE))
    held = {r.name: stream_bytes(r, grouping.get(r.name, ROWS)) for r in records
            if r.encoding in (QUANTIZED, SPARSE)}
    largest = max(held.values(), default=0)
    if graph is not None:
        largest = max([largest] + [sum(held.get(n, 0) for n in set(node.inputs)) for node in all_nodes(graph)])
    return {"index": sum(index_bytes(r, grouping.get(r.name, ROWS)) for r in records),
            "dense": sum(dense_bytes(r) for r in records),
            "stream": raw + largest}
