"""How many bytes a model's weights occupy in memory in each runtime mode, from the file alone.

The runtime keeps weights in one of three forms (see ``dcrt.runtime.session``):

- ``index``: codebook + codebook indices (uint8/uint16); a sparse tensor keeps whichever is smaller
  of dense indices (pruned weights index a zero centroid) and CSR (indices + column positions:
  uint16 up to 65536 columns, int32 beyond; see :func:`position_dtype`).
- ``dense``: every weight decoded once to float32.
- ``stream``: nothing kept; each layer is decoded when used and dropped (peak: the largest layer).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .codecs import symbol_dtype
from .format.tensor import QUANTIZED, SPARSE, TensorRecord
from .sparse import matrix_shape

MODES = ("index", "dense", "stream")


def position_dtype(columns: int) -> np.dtype:
    """dtype of a CSR weight's column positions: uint16 while every column fits (2 bytes per kept
    weight instead of 4: VGG FC6/FC7 in index mode 27.4 -> 16.9 MB), int32 beyond."""
    return np.dtype(np.uint16 if columns <= 1 << 16 else np.int32)


def _csr_bytes(record: TensorRecord, width: int) -> int:
    rows, columns = matrix_shape(record.shape)
    return record.stats.nonzero_count * (width + position_dtype(columns).itemsize) + (rows + 1) * 8


def sparse_layout(record: TensorRecord) -> str:
    """``"csr"`` or ``"dense"``: which index form the runtime keeps for a sparse tensor."""
    width = symbol_dtype(record.stats.codebook_size + 1).itemsize
    return "csr" if _csr_bytes(record, width) < record.size * width else "dense"


def index_bytes(record: TensorRecord) -> int:
    """Resident bytes of one tensor in index mode."""
    book = 4 * (record.stats.codebook_size + 1)
    if record.encoding == QUANTIZED:
        return record.size * symbol_dtype(len(record.codebook)).itemsize + book
    if record.encoding == SPARSE:
        width = symbol_dtype(record.stats.codebook_size + 1).itemsize
        if sparse_layout(record) == "csr":
            return _csr_bytes(record, width) + book
        return record.size * width + book
    return record.stats.original_bytes


def dense_bytes(record: TensorRecord) -> int:
    """Resident bytes of one tensor decoded (float32 for compressed tensors)."""
    if record.encoding in (QUANTIZED, SPARSE):
        return record.size * 4
    return record.stats.original_bytes


def resident_bytes(records) -> Dict[str, int]:
    """Total weight bytes resident in each mode for an iterable of TensorRecords."""
    records = list(records)
    raw = sum(dense_bytes(r) for r in records if r.encoding not in (QUANTIZED, SPARSE))
    largest = max((dense_bytes(r) for r in records if r.encoding in (QUANTIZED, SPARSE)), default=0)
    return {"index": sum(index_bytes(r) for r in records),
            "dense": sum(dense_bytes(r) for r in records),
            "stream": raw + largest}


def array_bytes(*arrays) -> int:
    """Bytes held by numpy arrays (views of a memory-mapped file count as zero: they are file pages)."""
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray) and a.flags.owndata)
