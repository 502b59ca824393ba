"""``Coder.NONE``: every symbol as a little-endian unsigned integer of ``symbol_dtype(alphabet)``.

The payload is the symbol array itself, so :func:`decode` returns a view of it without copying
(on little-endian machines), which keeps memory-mapped files memory-mapped.

This module also holds the small helpers the other coders share: reading a payload as bytes,
checking the common stage fields and the symbols given to an encoder, and MSB-first bit packing.
"""
from __future__ import annotations

import os
import sys
import threading
from numbers import Integral
from types import ModuleType
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import FormatError
from . import Coder, Stage, symbol_dtype

MAX_ALPHABET = (1 << 32) - 1  # the schema stores the alphabet as a uint32

Payload = Union[bytes, bytearray, memoryview, np.ndarray]

_LITTLE = sys.byteorder == "little"
_PACK_BLOCK = 1 << 20  # codes packed per pass: bounds the temporaries of pack_codes
_KERNELS = None  # dcrt.codecs._numba once imported, False if it cannot be
#: Held around a parallel kernel's launch, by the decoders and by the runtime's kernels
#: (``dcrt.runtime.numba_kernels.launch``): numba's fallback threading layer (workqueue) aborts the
#: process when two threads launch parallel kernels at once.
PARALLEL_LOCK = threading.Lock()


def as_bytes(payload: Payload) -> np.ndarray:
    """``payload`` as a 1-D uint8 array, without copying; the result may be read-only."""
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1:
            raise FormatError(f"payload must be a 1-D uint8 array, not {payload.dtype} of shape {payload.shape}")
        return payload
    try:
        return np.frombuffer(payload, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"payload is not a contiguous byte buffer ({exc})") from None


def numba_kernels() -> Optional[ModuleType]:
    """The compiled kernels module (``dcrt.codecs._numba``), or None if numba is missing or disabled.

    Setting the environment variable ``DCRT_NO_NUMBA`` (to anything but ``0``) forces the numpy
    decoders; it is read on every call so tests and benchmarks can flip it.
    """
    global _KERNELS
    if os.environ.get("DCRT_NO_NUMBA", "0") not in ("", "0"):
        return None
    if _KERNELS is None:
        try:
            from . import _numba as kernels
        except Exception:  # numba absent or broken (e.g. built against another numpy): fall back to numpy
            kernels = False
        _KERNELS = kernels
    return _KERNELS or None



def check_stage(stage: Stage, coder: Coder, max_alphabet: int) -> Tuple[int, int]:
    """Validate the fields every stage has; returns ``(count, alphabet)`` as Python ints."""
    if stage.coder != coder:
        raise FormatError(f"stage is coded with {stage.coder!r}, not {coder.name}")
    count, alphabet = stage.count, stage.alphabet
    if not isinstance(count, Integral) or not isinstance(alphabet, Integral):
        raise FormatError(f"{coder.name} stage: count and alphabet must be integers, got {count!r}, {alphabet!r}")
    count, alphabet = int(count), int(alphabet)
    if count < 0:
        raise FormatError(f"{coder.name} stage: negative symbol count {count}")
    if count >= 1 << 63:    # the file's field is 64 bits unsigned; the kernels count in int64
        raise FormatError(f"{coder.name} stage: symbol count {count} is past any stream (2**63)")
    if not 0 <= alphabet <= max_alphabet:
        raise FormatError(f"{coder.name} stage: alphabet {alphabet} outside [0, {max_alphabet}]")
    if count > 0 and alphabet == 0:
        raise FormatError(f"{coder.name} stage: {count} symbols but an empty alphabet")
    return count, alphabet


def check_symbols(symbols: np.ndarray, alphabet: int, max_alphabet: int) -> np.ndarray:
    """The encoder's input as a flat integer array; ValueError unless every symbol is in ``[0, alphabet)``."""
    arr = np.asarray(symbols)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.dtype.kind not in "ui":
        raise ValueError(f"symbols must be integers, not {arr.dtype}")
    if not isinstance(alphabet, Integral) or not 0 <= int(alphabet) <= max_alphabet:
        raise ValueError(f"alphabet must be an integer in [0, {max_alphabet}], got {alphabet!r}")
    arr = arr.ravel()
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= alphabet:
            raise ValueError(f"symbols span [{lo}, {hi}], outside the alphabet [0, {alphabet})")
    return arr


def pack_codes(codes: np.ndarray, widths: np.ndarray, starts: np.ndarray, nbits: int) -> bytes:
    """Write codes of ``widths`` (1..16) bits at bit ``starts``, MSB-first, into ``ceil(nbits / 8)`` bytes.

    The codes must not overlap. Each one touches at most three bytes, so it is split into three byte
    contributions; as the bits are disjoint, adding contributions equals OR-ing them, which
    ``np.bincount`` does vectorised.
    """
    nbytes = -(-int(nbits) // 8)
    out = np.zeros(nbytes + 3, dtype=np.uint8)
    for lo in range(0, len(codes), _PACK_BLOCK):
        hi = min(lo + _PACK_BLOCK, len(codes))
        start = starts[lo:hi].astype(np.int64)
        byte = start >> 3
        first = int(byte[0])
        byte = (byte - first).astype(np.intp, copy=False)  # bincount needs intp indices (32-bit ARM)
        # Left-align each code in a 24-bit window that begins at its first byte.
        shift = 24 - (start & 7) - widths[lo:hi].astype(np.int64)
        value = codes[lo:hi].astype(np.int64) << shift
        span = int(byte[-1]) + 3
        acc = np.bincount(byte, weights=value >> 16, minlength=span)
        acc[1:] += np.bincount(byte, weights=(value >> 8) & 0xFF, minlength=span)[:-1]
        acc[2:] += np.bincount(byte, weights=value & 0xFF, minlength=span)[:-2]
        out[first : first + span] += acc.astype(np.uint8)
    return out[:nbytes].tobytes()


def encode(symbols: np.ndarray, alphabet: int) -> Tuple[bytes, Stage]:
    """Store ``symbols`` (integers in ``[0, alphabet)``) as little-endian ``symbol_dtype(alphabet)``."""
    arr = check_symbols(symbols, alphabet, MAX_ALPHABET)
    payload = arr.astype(symbol_dtype(alphabet).newbyteorder("<")).tobytes()
    return payload, Stage(Coder.NONE, count=int(arr.size), alphabet=int(alphabet))


def decode(payload: Payload, stage: Stage) -> np.ndarray:
    """The symbols of a ``Coder.NONE`` payload: a (possibly read-only) view of it on little-endian machines."""
    count, alphabet = check_stage(stage, Coder.NONE, MAX_ALPHABET)
    data = as_bytes(payload)
    dtype = symbol_dtype(alphabet)
    if data.size != count * dtype.itemsize:
        raise FormatError(f"raw stage: {count} symbols of {dtype.itemsize} bytes need "
                          f"{count * dtype.itemsize} payload bytes, got {data.size}")
    if count == 0:
        return np.empty(0, dtype=dtype)
    # view() needs a contiguous buffer; this copies only if the caller passed a strided array.
    symbols = np.ascontiguousarray(data).view(dtype.newbyteorder("<"))
    if not _LITTLE:
        symbols = symbols.astype(dtype)
    if alphabet < 1 << (8 * dtype.itemsize) and int(symbols.max()) >= alphabet:
        raise FormatError(f"raw stage: symbol {int(symbols.max())} outside the alphabet [0, {alphabet})")
    return symbols
