"""``Coder.LZW``: variable-width LZW, as in Unix ``compress`` and GIF but without clear codes.

Format:

* The dictionary starts with the ``alphabet`` single-symbol strings (codes ``0 .. alphabet-1``).
* Code ``k`` of the payload (counting from 0) is written with ``min(max_code_width,
  bit_length(alphabet + k))`` bits, MSB-first, i.e. just wide enough for the entry that step ``k``
  adds; so widths start at ``ceil(log2(alphabet + 1))`` and grow by one bit at each power of two.
* After emitting code ``k`` the encoder adds entry ``alphabet + k`` = (string of code k) + (first
  symbol of the next string), unless the dictionary holds ``2**max_code_width`` entries, after which it
  is frozen (there is no reset). The payload is zero-padded to a whole byte.

The stage records ``count`` (symbols decoded) but not the number of codes: decoding stops after
``count`` symbols, and the padding must then be shorter than a byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import FormatError
from . import Coder, Stage, symbol_dtype
from .raw import Payload, as_bytes, check_stage, check_symbols, numba_kernels, pack_codes

MAX_ALPHABET = 1 << 15
MAX_CODE_WIDTH = 16


def min_code_width(alphabet: int) -> int:
    """Narrowest ``max_code_width`` that can code ``alphabet`` symbols (its dictionary must hold them)."""
    return max(1, (int(alphabet) - 1).bit_length())


def code_widths(n: int, alphabet: int, max_code_width: int = MAX_CODE_WIDTH) -> np.ndarray:
    """Bit width of each of the first ``n`` codes: ``min(max_code_width, bit_length(alphabet + k))``."""
    next_entry = np.minimum(alphabet + np.arange(n, dtype=np.int64), np.int64(1) << max_code_width)
    powers = np.int64(1) << np.arange(max_code_width + 1, dtype=np.int64)
    bit_length = np.searchsorted(powers, next_entry, side="right")  # number of powers of two <= x
    return np.minimum(bit_length, max_code_width).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Encoding


def encode(symbols: np.ndarray, alphabet: int, max_code_width: int = MAX_CODE_WIDTH) -> Tuple[bytes, Stage]:
    """LZW-code ``symbols`` (integers in ``[0, alphabet)``, ``alphabet <= 2**15``)."""
    symbols = check_symbols(symbols, alphabet, MAX_ALPHABET)
    alphabet = int(alphabet)
    if not min_code_width(alphabet) <= max_code_width <= MAX_CODE_WIDTH:
        raise ValueError(f"max_code_width must be in [{min_code_width(alphabet)}, {MAX_CODE_WIDTH}] "
                         f"for alphabet {alphabet}, got {max_code_width}")
    stage = Stage(Coder.LZW, count=int(symbols.size), alphabet=alphabet, max_code_width=max_code_width)
    if symbols.size == 0:
        return b"", stage
    codes = np.array(_lzw_codes(symbols.tolist(), alphabet, 1 << max_code_width), dtype=np.int64)
    widths = code_widths(codes.size, alphabet, max_code_width)
    ends = np.cumsum(widths)
    return pack_codes(codes, widths, ends - widths, int(ends[-1])), stage


def _lzw_codes(seq: Sequence[int], alphabet: int, capacity: int) -> List[int]:
    """The LZW code sequence of ``seq`` (a plain Python loop: this runs on the host, once per model)."""
    entries = {}  # (prefix code << 16) | next symbol -> code; an int key hashes faster than a tuple
    lookup = entries.get
    emitted: List[int] = []
    emit = emitted.append
    next_code = alphabet
    prefix = seq[0]
    for i in range(1, len(seq)):
        symbol = seq[i]
        key = (prefix << 16) | symbol  # symbols < 2**15 and codes < 2**16, so keys are unique
        code = lookup(key)
        if code is not None:
            prefix = code
            continue
        emit(prefix)
        if next_code < capacity:
            entries[key] = next_code
            next_code += 1
        prefix = symbol
    emit(prefix)
    return emitted


# --------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Checked:
    data: np.ndarray
    count: int
    alphabet: int
    max_code_width: int


def _check(payload: Payload, stage: Stage) -> _Checked:
    """Validate the stage fields against each other and the payload; FormatError says what is wrong."""
    count, alphabet = check_stage(stage, Coder.LZW, MAX_ALPHABET)
    data = as_bytes(payload)
    width = stage.max_code_width
    if not isinstance(width, Integral) or not min_code_width(alphabet) <= int(width) <= MAX_CODE_WIDTH:
        raise FormatError(f"LZW stage: max_code_width {width!r} outside "
                          f"[{min_code_width(alphabet)}, {MAX_CODE_WIDTH}] for alphabet {alphabet}")
    if count == 0 and data.size:
        raise FormatError(f"LZW stage: no symbols but {data.size} payload bytes")
    if count > 0 and data.size == 0:
        raise FormatError(f"LZW stage: {count} symbols but an empty payload")
    return _Checked(data, count, alphabet, int(width))


def _check_end(bits: int, data: np.ndarray) -> None:
    """After the last code only padding may remain, less than one byte."""
    if -(-bits // 8) != data.size:
        raise FormatError(f"LZW stage: the codes end at bit {bits} but the payload has {data.size} bytes")


_STATUS = {
    1: "the payload ends before {count} symbols are decoded (truncated)",
    2: "invalid code (not yet in the dictionary) before {count} symbols are decoded",
    3: "a code's string runs past the stage's {count} symbols",
}


def decode(payload: Payload, stage: Stage) -> np.ndarray:
    """Decode an LZW payload with the numba kernel if available, else with :func:`decode_numpy`."""
    if numba_kernels() is not None:
        return decode_numba(payload, stage)
    return decode_numpy(payload, stage)


def decode_numba(payload: Payload, stage: Stage) -> np.ndarray:
    """Decode with the compiled kernel; ImportError if numba is missing."""
    from . import _numba

    c = _check(payload, stage)
    dtype = symbol_dtype(c.alphabet)
    if c.count == 0:
        return np.empty(0, dtype=dtype)
    buf = np.zeros(c.data.size + 3, dtype=np.uint8)
    buf[: c.data.size] = c.data
    args = (buf, 8 * c.data.size, c.alphabet, c.max_code_width, c.count)
    # A dry run first: `count` comes from an untrusted file, so allocate only once the payload is
    # known to expand to exactly that many symbols.
    status, bits = _numba.lzw_walk(*args, np.empty(0, dtype=dtype), False)
    if status:
        raise FormatError("LZW stage: " + _STATUS[status].format(count=c.count))
    _check_end(int(bits), c.data)
    out = np.empty(c.count, dtype=dtype)
    _numba.lzw_walk(*args, out, True)
    return out


def decode_numpy(payload: Payload, stage: Stage) -> np.ndarray:
    """Decode with numpy only, vectorised (no Python loop per code or per symbol).

    1. Code ``k``'s width depends only on ``k``, so all codes are read at once.
    2. A code ``>= alphabet`` names the entry made at step ``code - alphabet + 1``: the string that
       code number ``p = code - alphabet`` of the payload stood for, plus one symbol. So each string
       is one longer than its parent's (code number ``p``); lengths are tree depths, found by pointer
       jumping.
    3. Every output symbol is a copy of an earlier one (or a literal code); pointer jumping again
       resolves each to its literal.
    """
    c = _check(payload, stage)
    dtype = symbol_dtype(c.alphabet)
    if c.count == 0:
        return np.empty(0, dtype=dtype)
    alphabet, count, data = c.alphabet, c.count, c.data
    nbits = 8 * data.size
    capacity = 1 << c.max_code_width

    # 1. Every code the payload can hold (each string has >= 1 symbol, so at most `count` are needed).
    widths = code_widths(min(count, nbits // int(code_widths(1, alphabet, c.max_code_width)[0])),
                         alphabet, c.max_code_width)
    ends = np.cumsum(widths)
    n = int(np.searchsorted(ends, nbits, side="right"))
    widths, ends = widths[:n], ends[:n]
    codes = _read_codes(data, ends - widths, widths)
    invalid = np.flatnonzero(codes >= np.minimum(alphabet + np.arange(n, dtype=np.int64), capacity))
    if invalid.size:
        codes = codes[: int(invalid[0])]

    # 2. String lengths, and how many codes make `count` symbols.
    lengths = _string_lengths(codes, alphabet)
    total = np.cumsum(lengths)
    used = int(np.searchsorted(total, count, side="left")) + 1
    if used > codes.size:
        reason = 2 if invalid.size else 1
        raise FormatError("LZW stage: " + _STATUS[reason].format(count=count))
    if total[used - 1] != count:
        raise FormatError("LZW stage: " + _STATUS[3].format(count=count))
    _check_end(int(ends[used - 1]), data)
    codes, lengths = codes[:used], lengths[:used]
    starts = total[:used] - lengths

    # 3. Output: where each symbol is copied from, then chase the copies down to literals.
    index = np.int32 if count < 1 << 31 else np.int64
    emission = np.repeat(np.arange(used, dtype=index), lengths.astype(np.intp, copy=False))
    position = np.arange(count, dtype=index)
    offset = position - starts[emission]
    literal = codes < alphabet
    parent = np.where(literal, 0, codes - alphabet)[emission]
    # An entry is its parent's string (same offsets) plus the first symbol of the string after the parent.
    source = np.where(offset < lengths[emission] - 1, starts[parent] + offset,
                      starts[np.minimum(parent + 1, used - 1)])
    source = np.where(literal[emission], position, source).astype(index)
    while True:
        hop = source[source]
        if np.array_equal(hop, source):
            break
        source = hop
    return codes[emission[source]].astype(dtype)


def _read_codes(data: np.ndarray, starts: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The MSB-first codes of ``widths`` (<= 16) bits at bit ``starts`` of ``data``, as int64."""
    buf = np.zeros(data.size + 3, dtype=np.int64)
    buf[: data.size] = data
    byte = starts >> 3
    window = (buf[byte] << 16) | (buf[byte + 1] << 8) | buf[byte + 2]
    return (window >> (24 - (starts & 7) - widths)) & ((np.int64(1) << widths) - 1)


def _string_lengths(codes: np.ndarray, alphabet: int) -> np.ndarray:
    """Length of each code's string: 1 for a literal, else one more than that of code number
    ``code - alphabet`` (its parent), computed by list ranking."""
    n = codes.size
    copied = codes >= alphabet
    ancestor = np.where(copied, codes - alphabet, np.arange(n, dtype=np.int64))
    depth = copied.astype(np.int64)
    while True:
        hop = ancestor[ancestor]
        if np.array_equal(hop, ancestor):  # every ancestor is a literal (a root)
            break
        depth += depth[ancestor]
        ancestor = hop
    return depth + 1
