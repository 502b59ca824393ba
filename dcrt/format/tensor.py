"""A stored tensor: how its values are coded, its checksum, and how to decode it.

:class:`TensorRecord` is the in-memory form of a ``Tensor`` table of ``schema/dcm.fbs``. The writer
builds records from compressed weights; the reader builds them from a memory-mapped file, with the
payloads as read-only views into the file, so nothing is copied or decoded until asked for.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .. import codecs, sparse
from ..codecs import EncodedStream
from ..errors import FormatError
from . import dtypes

RAW, QUANTIZED, SPARSE = 0, 1, 2
ENCODING_NAMES = {RAW: "raw", QUANTIZED: "quantized", SPARSE: "sparse"}


@dataclass
class LayerStats:
    """Per-tensor statistics stored in the file (the ``LayerStats`` struct)."""

    element_count: int = 0
    nonzero_count: int = 0
    original_bytes: int = 0
    coded_bytes: int = 0
    codebook_size: int = 0
    index_bits: int = 0
    relative_index_bits: int = 0

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned."""
        return 1.0 - self.nonzero_count / self.element_count if self.element_count else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Coded bits per weight of the dense tensor (32 for float32 stored raw)."""
        return 8.0 * self.coded_bytes / self.element_count if self.element_count else 0.0

    @property
    def ratio(self) -> float:
        """Compression ratio: original bytes over coded bytes."""
        return self.original_bytes / self.coded_bytes if self.coded_bytes else 1.0

    def pack(self) -> bytes:
        return struct.pack("<QQQQIBB", self.element_count, self.nonzero_count, self.original_bytes,
                           self.coded_bytes, self.codebook_size, self.index_bits,
                           self.relative_index_bits)


@dataclass
class TensorRecord:
    """One tensor as the file stores it."""

    name: str
    data_type: int                        # ONNX TensorProto.DataType code
    shape: Tuple[int, ...]
    encoding: int = RAW
    raw: object = b""                     # RAW: little-endian values (bytes or uint8 view)
    codebook: Optional[np.ndarray] = None  # float32 centroids
    indices: Optional[EncodedStream] = None
    relative_index: Optional[EncodedStream] = None
    column_counts: Optional[EncodedStream] = None
    stats: LayerStats = field(default_factory=LayerStats)
    checksum: int = 0

    @property
    def dtype(self) -> np.dtype:
        return dtypes.to_numpy(self.data_type)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def digest(self) -> int:
        """CRC-32 over every field and payload, in a fixed order (what ``checksum`` must equal)."""
        crc = zlib.crc32(self.name.encode())
        crc = zlib.crc32(struct.pack(f"<iB{len(self.shape)}q", self.data_type, self.encoding,
                                     *self.shape), crc)
        crc = zlib.crc32(self.raw, crc)
        if self.codebook is not None:
            crc = zlib.crc32(np.ascontiguousarray(self.codebook, dtype="<f4").tobytes(), crc)
        for stream in (self.indices, self.relative_index, self.column_counts):
            if stream is None:
                crc = zlib.crc32(b"-", crc)
                continue
            for s in stream.stages:
                crc = zlib.crc32(struct.pack("<BQIIB", int(s.coder), s.count, s.alphabet,
                                             s.chunk_size, s.max_code_width), crc)
                for side, dtype in ((s.code_lengths, "u1"), (s.chunk_bit_offsets, "<u8")):
                    if side is not None:   # hashed in one width whatever width the file stores
                        crc = zlib.crc32(np.ascontiguousarray(side, dtype=dtype).tobytes(), crc)
            crc = zlib.crc32(stream.payload, crc)
        return zlib.crc32(self.stats.pack(), crc)

    def verify(self) -> None:
        """Raise :class:`FormatError` naming the tensor if its checksum does not match."""
        if self.digest() != self.checksum:
            raise FormatError(f"tensor {self.name!r} is damaged (checksum mismatch); "
                              "the .dcm file was corrupted: download or convert it again")

    # -- decoding -------------------------------------------------------------------------------
    # Decoding trusts the payloads: call verify() first (StoredTensor does, once per tensor).
    def decode(self) -> np.ndarray:
        """The tensor's values as a dense array of its dtype."""
        with _damage(self.name):
            if self.encoding == RAW:
                data = np.frombuffer(self.raw, dtype=self.dtype.newbyteorder("<"))
                if data.size != self.size:
                    raise FormatError(f"tensor {self.name!r}: {data.size} raw values for shape {self.shape}")
                return data.astype(self.dtype).reshape(self.shape)
            codebook, symbols = self.index_form()
            return codebook[symbols].astype(self.dtype, copy=False)

    def symbols(self) -> np.ndarray:
        """The decoded index stream (QUANTIZED: one per element; SPARSE: one per entry)."""
        if self.encoding == QUANTIZED:
            return _decode_stream(self.indices, self.name, "indices", exact=self.size)
        # SPARSE: every entry (kept weight or filler) takes at least one row of its column
        return _decode_stream(self.indices, self.name, "indices", at_most=self.size)

    def index_form(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(codebook, indices)`` with ``indices`` shaped like the tensor: ``value = codebook[indices]``.

        For a sparse tensor the codebook gets a leading 0.0 for the pruned weights.
        """
        if self.encoding == QUANTIZED:
            sym = self.symbols()
            if sym.size != self.size:
                raise FormatError(f"tensor {self.name!r}: {sym.size} indices for shape {self.shape}")
            book = self._codebook()
            if sym.size and int(sym.max()) >= len(book):
                raise FormatError(f"tensor {self.name!r}: an index points past its codebook")
            return book, sym.reshape(self.shape)
        if self.encoding == SPARSE:
            rows, cols = sparse.matrix_shape(self.shape)
            col_ptr, row_idx, sym = self.csc()
            dense = sparse.csc_to_dense_symbols(col_ptr, row_idx, sym, rows)
            book = np.concatenate([np.zeros(1, np.float32), self._codebook()])
            return book, dense.reshape(self.shape)
        raise FormatError(f"tensor {self.name!r} is stored raw and has no codebook indices")

    def entries(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SPARSE: the stored CSC entries ``(symbols, relative_indices, column_counts)``, fillers
        included (see :mod:`dcrt.sparse`); checked against each other and the codebook, but whether
        the relative indices stay within the rows is left to their decoder (``sparse.decode_csc``)."""
        if self.encoding != SPARSE:
            raise FormatError(f"tensor {self.name!r} is not stored sparse")
        rows, cols = sparse.matrix_shape(self.shape)
        with _damage(self.name):
            sym = self.symbols()
            rel = _decode_stream(self.relative_index, self.name, "relative_index", exact=len(sym))
            counts = _decode_stream(self.column_counts, self.name, "column_counts", exact=cols)
            if len(counts) != cols or int(np.sum(counts, dtype=np.int64)) != len(sym) or (counts < 0).any():
                raise FormatError(f"{len(counts)} column counts of {int(np.sum(counts, dtype=np.int64))} "
                                  f"entries for {cols} columns and {len(sym)} entries")
            if sym.size and int(sym.max()) > len(self._codebook()):
                raise FormatError("an index points past the codebook")
            return sym, rel, counts

    def csc(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SPARSE: ``(col_ptr, row_indices, symbols)`` of the kept weights over the 2-D view.

        A symbol ``s`` stands for ``codebook[s - 1]``.
        """
        entries = self.entries()
        with _damage(self.name):
            return sparse.decode_csc(*entries, sparse.matrix_shape(self.shape)[0])

    def _codebook(self) -> np.ndarray:
        book = self.codebook if self.codebook is not None else np.zeros(0, np.float32)
        return np.asarray(book, dtype=np.float32)


class _damage:
    """Turn any unexpected error while decoding into a FormatError naming the tensor."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None:
            return False
        if isinstance(error, FormatError):
            if self.name not in str(error):
                raise FormatError(f"tensor {self.name!r}: {error}") from error
            return False
        if isinstance(error, (ValueError, IndexError, TypeError, OverflowError, KeyError,
                              MemoryError, struct.error)):
            raise FormatError(f"tensor {self.name!r} is damaged and cannot be decoded ({error})") from error
        return False


def _decode_stream(stream: Optional[EncodedStream], name: str, what: str, exact: Optional[int] = None,
                   at_most: Optional[int] = None) -> np.ndarray:
    if stream is None:
        raise FormatError(f"tensor {name!r} has no {what} stream")
    _check_counts(stream, name, what, exact, at_most)
    with _damage(name):
        return codecs.decode(stream)


def _check_counts(stream: EncodedStream, name: str, what: str, exact: Optional[int],
                  at_most: Optional[int]) -> None:
    """Refuse, before decoding anything, symbol counts the tensor's shape cannot need.

    Stage 0 decodes to the stream's symbols: ``exact`` (or ``at_most``) of them, as the shape says.
    Stage k > 0 decodes to the payload bytes of stage k - 1, which cannot be more than that stage's
    symbols can fill (Huffman and LZW codes are at most 16 bits; uncoded symbols at most 4 bytes).
    So the largest array a decoder makes is bounded by the shape, which the reader has bounded.
    """
    stages = stream.stages
    count = int(stages[0].count) if stages else 0
    if not stages and len(stream.payload):
        raise FormatError(f"tensor {name!r}: {what} stream has no coder stage but a payload")
    if (exact is not None and count != exact) or (at_most is not None and count > at_most):
        need = f"{exact}" if exact is not None else f"at most {at_most}"
        raise FormatError(f"tensor {name!r}: {what} stream has {count} symbols, its shape needs {need}")
    for k, (before, stage) in enumerate(zip(stages, stages[1:]), start=1):
        if int(before.coder) == int(codecs.Coder.NONE):
            most = int(before.count) * codecs.symbol_dtype(int(before.alphabet)).itemsize
        else:
            most = (int(before.count) * 16 + 7) // 8
        if int(stage.count) > most:
            raise FormatError(f"tensor {name!r}: {what} stream's stage {k} decodes to "
                              f"{int(stage.count)} bytes, more than its previous stage's {int(before.count)} "
                              "symbols can take")
