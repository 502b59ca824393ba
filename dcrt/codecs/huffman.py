"""``Coder.HUFFMAN``: canonical Huffman codes of at most 16 bits, in independently decodable chunks.

Format (what a stage and its payload mean):

* ``code_lengths[s]`` is the code length of symbol ``s`` in bits (0: ``s`` does not occur). Codes are
  canonical: assigned in increasing order of ``(length, symbol)``, each code being the previous one
  plus one, shifted left when the length grows. The decoder rebuilds them from the lengths alone.
* The payload is the concatenation of the symbols' codes, most significant bit first within each
  byte, zero-padded to a whole byte.
* The symbols are cut into chunks of ``chunk_size`` (the last may be shorter); chunk ``i`` starts at
  bit ``chunk_bit_offsets[i]``, so chunks decode independently of each other, in parallel.

:func:`decode_numpy` peeks 16 bits at a time into a table of 2^16 entries that gives the symbol and
the length of the code starting there, and advances every chunk by one symbol per Python-level step.
:func:`decode_numba` decodes chunks in a compiled loop, four interleaved per thread (their
independent dependency chains overlap in the CPU) and groups of four on parallel threads; it peeks
at most :data:`PRIMARY_BITS` bits into a table (8 KB, in L1 cache) and finds the rare longer codes by
their canonical ranges, one length after another.
:func:`decode` picks the compiled one when numba is importable and ``DCRT_NO_NUMBA`` is not set.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import List, Optional, Tuple

import numpy as np

from ..errors import FormatError
from . import Coder, Stage, symbol_dtype
from .raw import PARALLEL_LOCK, Payload, as_bytes, check_stage, check_symbols, numba_kernels, pack_codes

MAX_ALPHABET = 1 << 16
MAX_CODE_LENGTH = 16
MIN_CHUNK_SIZE = 2048  # smaller chunks cost more in offsets (4 bytes each) than they gain in parallelism
MAX_CHUNK_SIZE = 8192
MAX_DECODE_CHUNK_SIZE = 1 << 20  # largest chunk a decoder accepts (the encoder writes <= MAX_CHUNK_SIZE)

_TARGET_CHUNKS = 32
_PEEK = MAX_CODE_LENGTH  # bits looked at per table lookup (decode_numpy)
#: Bits decode_numba looks up in its table: longer codes (rare: that is why they are long) take a
#: canonical search. A 16-bit table (256 KB) spills L1 and L2 and was most of a small stream's decoding.
PRIMARY_BITS = 11
_GROUP_BITS = 1 << 25    # decode_numpy's per-bit array (a byte a bit) covers this many payload bits at a time
_BLOCK = 1 << 18    # decode_numpy makes its temporaries for this many payload bytes, or visited positions, at a time
_ROW_TABLE_MIN_BITS = 1 << 18  # below this, building the per-byte row table costs more than it saves


def chunk_size_for(count: int) -> int:
    """Symbols per chunk: about 32 chunks per stream, as a power of two clamped to [1024, 8192]."""
    per_chunk = -(-int(count) // _TARGET_CHUNKS)
    size = 1 << max(per_chunk - 1, 0).bit_length()
    return min(max(size, MIN_CHUNK_SIZE), MAX_CHUNK_SIZE)


# --------------------------------------------------------------------------------------------------
# Code construction


def code_lengths(freqs: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (uint8, 0 for absent symbols) for symbol frequencies, limited to ``max_length``.

    A lone symbol gets length 1. Lengths over the limit are redistributed with the method of JPEG
    (ITU T.81, Annex K.3), which keeps Kraft's sum at exactly 1; the resulting length multiset is then
    handed out longest-first to the least frequent symbols, so the code stays close to optimal.
    """
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(freqs.size, dtype=np.uint8)
    used = np.flatnonzero(freqs)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    if used.size > 1 << max_length:
        raise ValueError(f"{used.size} symbols do not fit in codes of at most {max_length} bits")
    # Least frequent first; ties broken by symbol so that encoding is deterministic.
    order = used[np.argsort(freqs[used], kind="stable")]
    depths = _tree_depths(freqs[order].tolist())
    counts = np.bincount(depths, minlength=max_length + 1).tolist()
    if len(counts) > max_length + 1:
        _limit_depths(counts, max_length)
    lengths[order] = np.repeat(np.arange(max_length, 0, -1), counts[max_length:0:-1])
    return lengths


def _tree_depths(weights: List[int]) -> List[int]:
    """Leaf depths of a Huffman tree for ``weights`` sorted ascending (two-queue construction, O(n))."""
    n = len(weights)
    weight = weights + [0] * (n - 1)
    parent = [0] * (2 * n - 1)
    leaf, inner = 0, n  # next unused leaf, next unused internal node
    for node in range(n, 2 * n - 1):
        total = 0
        for _ in range(2):
            # Internal nodes are created in non-decreasing weight order, so the two smallest
            # candidates are at the heads of the two queues. Preferring leaves on ties keeps depths low.
            if leaf < n and (inner == node or weight[leaf] <= weight[inner]):
                child, leaf = leaf, leaf + 1
            else:
                child, inner = inner, inner + 1
            parent[child] = node
            total += weight[child]
        weight[node] = total
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # parents always have larger indices than their children
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def _limit_depths(counts: List[int], max_length: int) -> None:
    """Rewrite ``counts[l]`` (leaves at depth l, Kraft sum 1) in place so that no leaf is deeper than max_length."""
    for length in range(len(counts) - 1, max_length, -1):
        while counts[length] > 0:
            # Two sibling leaves at the bottom: one takes its parent's place, the other pairs up with
            # a shallower leaf, which becomes an internal node. Kraft's sum does not change.
            j = length - 2
            while counts[j] == 0:
                j -= 1
            counts[length] -= 2
            counts[length - 1] += 1
            counts[j + 1] += 2
            counts[j] -= 1
    del counts[max_length + 1:]


def _canonical_order(lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Used symbols sorted by (length, symbol), and their lengths as int64."""
    used = np.flatnonzero(lengths)
    order = used[np.argsort(lengths[used], kind="stable")]
    return order, lengths[order].astype(np.int64)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (uint32, right-aligned) of every symbol, from the code lengths (<= 16).

    In (length, symbol) order each code's 16-bit interval ``[code << (16 - len), (code + 1) << (16 - len))``
    starts where the previous one ends, so the codes are a cumulative sum.
    """
    lengths = np.asarray(lengths)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    order, ln = _canonical_order(lengths)
    span = np.int64(1) << (_PEEK - ln)
    codes[order] = (np.cumsum(span) - span) >> (_PEEK - ln)
    return codes


def kraft_sum(lengths: np.ndarray) -> float:
    """Kraft's sum of the used code lengths (a prefix code exists iff it is <= 1)."""
    ln = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(np.exp2(-ln[ln > 0])))


# --------------------------------------------------------------------------------------------------
# Encoding


def encode(symbols: np.ndarray, alphabet: int) -> Tuple[bytes, Stage]:
    """Huffman-code ``symbols`` (integers in ``[0, alphabet)``, ``alphabet <= 2**16``)."""
    symbols = check_symbols(symbols, alphabet, MAX_ALPHABET)
    alphabet = int(alphabet)
    symbols = symbols.astype(np.intp, copy=False)  # bincount refuses uint64
    count = int(symbols.size)
    chunk = chunk_size_for(count)
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
    if count == 0:
        return b"", Stage(Coder.HUFFMAN, count=0, alphabet=alphabet, code_lengths=lengths,
                          chunk_size=chunk, chunk_bit_offsets=np.zeros(0, np.uint64))
    codes = canonical_codes(lengths)
    width = lengths[symbols].astype(np.int64)
    ends = np.cumsum(width)
    starts = ends - width
    payload = pack_codes(codes[symbols], width, starts, int(ends[-1]))
    stage = Stage(Coder.HUFFMAN, count=count, alphabet=alphabet, code_lengths=lengths,
                  chunk_size=chunk, chunk_bit_offsets=starts[::chunk].astype(np.uint64))
    return payload, stage


# --------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Checked:
    """A stage whose fields agree with each other and with the payload size."""

    data: np.ndarray     # payload bytes
    count: int
    alphabet: int
    lengths: np.ndarray  # int64 code length per symbol
    chunk_size: int
    offsets: np.ndarray  # int64 start bit of every chunk
    ends: np.ndarray     # int64 bit where every chunk must end (the last: the payload's bit size)


def _check(payload: Payload, stage: Stage) -> _Checked:
    """Validate ``stage`` against itself and the payload; FormatError says what is inconsistent."""
    count, alphabet = check_stage(stage, Coder.HUFFMAN, MAX_ALPHABET)
    data = as_bytes(payload)
    nbits = 8 * int(data.size)
    if stage.code_lengths is None:
        raise FormatError("Huffman stage has no code lengths")
    lengths = np.asarray(stage.code_lengths)
    if lengths.ndim != 1 or lengths.size != alphabet or (lengths.size and lengths.dtype.kind not in "ui"):
        raise FormatError(f"Huffman stage: code_lengths must be {alphabet} integers, "
                          f"got {lengths.dtype} of shape {lengths.shape}")
    lengths = lengths.astype(np.int64)
    used = lengths[lengths != 0]
    if used.size and (used.min() < 0 or used.max() > MAX_CODE_LENGTH):
        raise FormatError(f"Huffman stage: code lengths must be in [0, {MAX_CODE_LENGTH}]")
    if int(np.sum(np.int64(1) << (_PEEK - used))) > 1 << _PEEK:
        raise FormatError("Huffman stage: code lengths violate Kraft's inequality (not a prefix code)")
    chunk = stage.chunk_size
    if not isinstance(chunk, Integral) or not 1 <= int(chunk) <= MAX_DECODE_CHUNK_SIZE:
        raise FormatError(f"Huffman stage: chunk_size {chunk!r} outside [1, {MAX_DECODE_CHUNK_SIZE}]")
    chunk = int(chunk)
    nchunks = -(-count // chunk)
    given = stage.chunk_bit_offsets
    offsets = np.asarray(given) if given is not None else np.zeros(0, dtype=np.uint64)
    if offsets.ndim != 1 or offsets.size != nchunks or (nchunks and offsets.dtype.kind not in "ui"):
        raise FormatError(f"Huffman stage: {count} symbols in chunks of {chunk} need {nchunks} chunk offsets, "
                          f"got {offsets.size}")
    if count == 0:
        if data.size:
            raise FormatError(f"Huffman stage: no symbols but {data.size} payload bytes")
        return _Checked(data, 0, alphabet, lengths, chunk, np.zeros(0, np.int64), np.zeros(0, np.int64))
    if used.size == 0:
        raise FormatError(f"Huffman stage: {count} symbols but no symbol has a code")
    if (offsets.dtype.kind == "i" and int(offsets.min()) < 0) or int(offsets.max()) > nbits:
        raise FormatError(f"Huffman stage: chunk offsets outside the payload's {nbits} bits")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0:
        raise FormatError(f"Huffman stage: the first chunk starts at bit {int(offsets[0])}, not 0")
    ends = np.append(offsets[1:], nbits)
    sizes = np.full(nchunks, chunk, dtype=np.int64)
    sizes[-1] = count - chunk * (nchunks - 1)
    bits = ends - offsets
    # Every code has between min(used) and max(used) bits; this also bounds count by the payload size.
    if np.any(bits < sizes * int(used.min())) or np.any(bits[:-1] > sizes[:-1] * int(used.max())):
        raise FormatError(f"Huffman stage: chunk offsets do not fit {count} symbols of "
                          f"{int(used.min())}..{int(used.max())} bits in {data.size} payload bytes")
    if nbits - 8 >= int(offsets[-1]) + int(sizes[-1]) * int(used.max()):
        raise FormatError(f"Huffman stage: {data.size} payload bytes are more than {count} symbols can fill")
    return _Checked(data, count, alphabet, lengths, chunk, offsets, ends)


def _decode_table(lengths: np.ndarray) -> np.ndarray:
    """uint32 ``(length << 16) | symbol`` for every 16-bit peek; 0 where no code starts (incomplete code)."""
    return _short_codes(*_canonical_order(lengths), _PEEK)


def _short_codes(order: np.ndarray, ln: np.ndarray, peek: int) -> np.ndarray:
    """uint32 ``(length << 16) | symbol`` for every ``peek``-bit value that starts with a code of at
    most ``peek`` bits; 0 for the others (a longer code starts there, or none)."""
    short = ln <= peek
    # Canonical codes tile [0, 2^peek) in (length, symbol) order, the short ones first: a run-length expansion.
    table = np.repeat(((ln[short] << 16) | order[short]).astype(np.uint32),
                      (np.int64(1) << (peek - ln[short])).astype(np.intp, copy=False))
    if table.size < 1 << peek:
        table = np.concatenate([table, np.zeros((1 << peek) - table.size, np.uint32)])
    return table


def _canonical_ranges(ln: np.ndarray) -> np.ndarray:
    """int64 ``[3, longest + 1]``: for each length ``l``, the value of its first code (``l`` bits),
    where its codes start in the canonical order, and how many there are. A code of length ``l``
    with value ``v`` is symbol ``order[start[l] + v - first[l]]`` when ``0 <= v - first[l] < count[l]``."""
    count = np.bincount(ln).astype(np.int64)       # int64: shifted by up to 15 bits below
    lengths = np.arange(count.size, dtype=np.int64)
    span = count << (_PEEK - lengths)       # each length's share of the 16-bit code space
    first = (np.cumsum(span) - span) >> (_PEEK - lengths)
    return np.stack([first, np.cumsum(count) - count, count])


def _padded(data: np.ndarray) -> np.ndarray:
    """A copy of the payload with zero bytes after it, so that a peek at any bit stays in bounds."""
    buf = np.zeros(data.size + 5, dtype=np.uint8)
    buf[: data.size] = data
    return buf


def _words(data: np.ndarray) -> np.ndarray:
    """The payload as native uint64 words read big-endian, then a zero word: the compiled decoder
    reads the 64 bits from any bit position in two loads (``_numba._huffman_next``)."""
    words = np.zeros(data.size // 8 + 2, dtype=">u8")
    words.view(np.uint8)[: data.size] = data
    return words.astype(np.uint64)


def _check_end(end: int, data: np.ndarray) -> None:
    """The last chunk must end in the payload's last byte: no truncation, no trailing bytes."""
    if not 8 * data.size - 8 < end <= 8 * data.size:
        raise FormatError(f"Huffman stage: the codes end at bit {end} but the payload has {data.size} bytes")


def decode(payload: Payload, stage: Stage) -> np.ndarray:
    """Decode a Huffman payload with the numba kernel if available, else with :func:`decode_numpy`."""
    if numba_kernels() is not None:
        return decode_numba(payload, stage)
    return decode_numpy(payload, stage)


def decode_numba(payload: Payload, stage: Stage) -> np.ndarray:
    """Decode with the compiled kernel (chunks on parallel threads); ImportError if numba is missing."""
    from . import _numba

    c = _check(payload, stage)
    out = np.empty(c.count, dtype=symbol_dtype(c.alphabet))
    if c.count == 0:
        return out
    final = np.empty(c.offsets.size, dtype=np.int64)
    order, ln = _canonical_order(c.lengths)
    peek = min(int(ln[-1]), PRIMARY_BITS)
    words, table, ranges = _words(c.data), _short_codes(order, ln, peek), _canonical_ranges(ln)
    with PARALLEL_LOCK:     # one decode at a time uses every core anyway
        _numba.huffman_chunks(words, table, peek, ranges, order, c.offsets, c.ends, c.chunk_size, out, final)
    bad = np.flatnonzero(final[:-1] != c.ends[:-1])
    if final[-1] < 0 or bad.size:
        chunk = int(bad[0]) if bad.size else c.offsets.size - 1
        raise FormatError(f"Huffman stage: chunk {chunk} does not decode to its bit range "
                          "(damaged payload, code lengths or chunk offsets)")
    _check_end(int(final[-1]), c.data)
    return out


def decode_numpy(payload: Payload, stage: Stage) -> np.ndarray:
    """Decode with numpy only: all chunks advance together, one symbol per Python-level step.

    Rather than peeking at each chunk's position in every step, it first computes, for *every* bit
    position ``p`` of the payload, the length of the code that would start at ``p`` (vectorised,
    through a per-byte table; a byte a bit, so that a group of chunks spans up to 4 MB of payload and
    there are few groups, each costing a step per symbol of a chunk). A step is then a gather and an
    add over the chunks, ``pos += at[pos]``; symbols are looked up at the end, for all the positions visited.
    """
    c = _check(payload, stage)
    out = np.empty(c.count, dtype=symbol_dtype(c.alphabet))
    if c.count == 0:
        return out
    table = _decode_table(c.lengths)
    lens = (table >> 16).astype(np.uint8)
    rows = _row_table(lens) if 8 * c.data.size >= _ROW_TABLE_MIN_BITS else None
    buf = _padded(c.data)
    # Big-endian 32-bit window starting at every byte (bits [8b, 8b + 32)): a strided, unaligned
    # view of the bytes, made native and contiguous by one copy.
    w32 = np.ndarray((c.data.size + 2,), dtype=">u4", buffer=buf, strides=(1,)).astype(np.uint32)
    first = 0
    for last in _groups(c.offsets, c.ends):
        _decode_group(c, first, last, w32, table, lens, rows, out)
        first = last
    return out


def _groups(offsets: np.ndarray, ends: np.ndarray) -> List[int]:
    """Split the chunks into runs of about _GROUP_BITS payload bits; returns each run's end index."""
    bounds, start = [], 0
    for i in range(1, offsets.size + 1):
        if i == offsets.size or ends[i] - offsets[start] > _GROUP_BITS:
            bounds.append(i)
            start = i
    return bounds


def _row_table(lens: np.ndarray) -> np.ndarray:
    """For each 16-bit value and bit offset o < 8, the length of the code starting at o (0: needs more bits).

    Returned as one uint64 per 16-bit value (8 lengths, one per byte), so a single gather yields the
    code lengths at all 8 bit positions of a payload byte.
    """
    rows = np.empty((8, 1 << _PEEK), dtype=np.uint8)
    for o in range(8):
        # At offset o only the low 16 - o bits of the value are payload: peek (value << o) & 0xFFFF,
        # i.e. every 2^o-th table entry, repeated.
        ln = np.tile(lens[:: 1 << o], 1 << o)
        rows[o] = np.where(ln <= _PEEK - o, ln, 0)
    return np.ascontiguousarray(rows.T).view(np.uint64).ravel()


def _decode_group(c: _Checked, first: int, last: int, w32: np.ndarray, table: np.ndarray,
                  lens: np.ndarray, rows: Optional[np.ndarray], out: np.ndarray) -> None:
    """Decode chunks ``[first, last)`` into ``out``."""
    base_byte = int(c.offsets[first]) >> 3
    base = 8 * base_byte  # positions below are counted from this bit
    limit = int(c.ends[last - 1]) - base
    nbytes = -(-limit // 8)
    win = w32[base_byte: base_byte + nbytes + 2]  # spare windows: a chunk that stepped past its end peeks there
    # at[p]: the length of the code starting at bit p of the group, the step to the next one; 0 where
    # no code starts (and past the group's bytes): a chunk reaching such a position stays there. Its
    # last step is then 0, or that of the chunk after, which starts there (chunks are not empty).
    at = np.zeros(8 * nbytes + _PEEK, dtype=np.uint8)
    for lo in range(0, nbytes, _BLOCK):     # the temporaries a block of bytes at a time
        hi = min(lo + _BLOCK, nbytes)
        part = at[8 * lo: 8 * hi]
        if rows is not None:
            np.take(rows, (win[lo:hi] >> 16).astype(np.intp, copy=False), out=part.view(np.uint64))
            hard = np.flatnonzero(part == 0)  # a long code at a high bit offset, or no code at all
            bit = hard + 8 * lo
            part[hard] = lens[(win[bit >> 3] >> (16 - (bit & 7)).astype(np.uint32)) & 0xFFFF]
        else:
            part[:] = lens[((win[lo:hi, None] >> np.arange(16, 8, -1, dtype=np.uint32)) & 0xFFFF).ravel()]

    lanes = last - first
    steps = min(c.chunk_size, c.count - first * c.chunk_size)
    pos = np.empty((steps, lanes), dtype=np.int32)
    pos[0] = c.offsets[first:last] - base
    step_rows = list(pos)
    take, add, moved = at.take, np.add, np.empty(lanes, np.uint8)
    for i in range(1, steps):  # one symbol of every chunk per step
        before = step_rows[i - 1]
        add(before, take(before, out=moved, mode="clip"), out=step_rows[i])     # (never clipped)

    sizes = np.minimum(c.chunk_size, c.count - np.arange(first, last, dtype=np.int64) * c.chunk_size)
    final = pos[sizes - 1, np.arange(lanes)]
    step = at[final]
    end = final.astype(np.int64) + step + base
    bad = np.flatnonzero(end[:-1] != c.ends[first: last - 1])
    is_last = last == c.offsets.size
    if bad.size or step[-1] == 0 or (not is_last and end[-1] != c.ends[last - 1]):
        chunk = first + (int(bad[0]) if bad.size else lanes - 1)
        raise FormatError(f"Huffman stage: chunk {chunk} does not decode to its bit range "
                          "(damaged payload, code lengths or chunk offsets)")
    if is_last:
        _check_end(int(end[-1]), c.data)
    del at, step_rows, take  # the per-bit array is most of the memory: free it first

    start = first * c.chunk_size
    full = lanes if sizes[-1] == steps else lanes - 1
    chunks = out[start: start + full * steps].reshape(full, steps)     # column j of a step is chunk first + j
    short = out[start + full * steps:]      # the stream's short last chunk, if any
    codes = (table & 0xFFFF).astype(out.dtype)
    block = max(1, _BLOCK // lanes)
    for s in range(0, steps, block):        # the temporaries a block of steps at a time
        p = pos[s: s + block]
        # the 16-bit peek at every visited position, in place: shifting a uint32 left drops the bits before it
        peek = win.take((p >> 3).astype(np.intp, copy=False))
        peek <<= (p & 7).view(np.uint32)
        peek >>= 16
        symbols = codes.take(peek.astype(np.intp, copy=False))
        chunks[:, s: s + block] = symbols[:, :full].T
        if full < lanes:
            short[s: s + block] = symbols[: max(0, min(short.size - s, block)), -1]
