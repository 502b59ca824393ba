"""Compiled decoding kernels for the Huffman and LZW coders.

Importing this module imports numba, so the coders import it lazily, only to decode (through
:func:`dcrt.codecs.raw.numba_kernels` or their ``decode_numba``). The kernels trust the stage fields
(the callers validate them first) but not the payload: every code read is checked, every write is in
bounds, and problems are reported through return values for the caller to raise FormatError.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import njit


_U = np.uint64
_LANES = 4  # chunks one thread decodes interleaved: independent chains hide the lookup latency


@njit(inline="always")
def _huffman_long(window, peek, ranges, order):  # pragma: no cover - compiled
    """``(length << 16) | symbol`` of a code longer than ``peek`` bits at the top of the 64-bit
    ``window``, or -1: each longer length in turn, by its canonical range (``ranges``:
    ``huffman._canonical_ranges``)."""
    for n in range(peek + 1, ranges.shape[1]):
        k = np.int64(window >> _U(64 - n)) - ranges[0, n]
        if k < ranges[2, n]:    # k >= 0: no shorter code matched, and canonical codes grow with length
            return (np.int64(n) << 16) | np.int64(order[ranges[1, n] + k])
    return np.int64(-1)


@njit(inline="always")
def _huffman_next(words, table, peek, ranges, order, pos, end):  # pragma: no cover - compiled
    """``(length << 16) | symbol`` of the code at bit ``pos``, or -1 if none or ``pos >= end``.

    ``words``: the payload as big-endian uint64 words plus one zero word, so that the 64 bits from
    any ``pos`` are two loads and three shifts (a byte at a time took 1.4x as long: ResNet-50's
    streams 44 -> 32 ms on one core). ``table`` answers for codes of up to ``peek`` bits
    (1 <= peek <= 16), :func:`_huffman_long` for longer."""
    if pos >= end:  # also keeps every read inside ``words``
        return np.int64(-1)
    w = _U(pos) >> _U(6)
    s = _U(pos) & _U(63)
    window = (words[w] << s) | ((words[w + _U(1)] >> _U(1)) >> (_U(63) - s))  # no shift by 64
    entry = np.int64(table[window >> _U(64 - peek)])
    return entry if entry >= 0x10000 else _huffman_long(window, peek, ranges, order)


@njit(inline="always")
def _huffman_chunk(words, table, peek, ranges, order, offsets, ends, chunk_size, out, final,
                   c):  # pragma: no cover - compiled
    """Decode chunk ``c`` alone (see huffman_chunks)."""
    pos = np.int64(offsets[c])
    end = np.int64(ends[c])
    first = c * chunk_size
    for i in range(first, min(first + chunk_size, out.size)):
        entry = _huffman_next(words, table, peek, ranges, order, pos, end)
        if entry < 0:
            final[c] = -1
            return
        out[_U(i)] = entry & 0xFFFF
        pos += entry >> 16
    final[c] = pos if pos <= end else -1


@njit(cache=True, parallel=True, nogil=True)
def huffman_chunks(words, table, peek, ranges, order, offsets, ends, chunk_size, out,
                   final):  # pragma: no cover - compiled
    """Decode every Huffman chunk into ``out``: groups of four chunks on parallel threads.

    ``words``, ``table``, ``peek``, ``ranges`` and ``order``: see :func:`_huffman_next`; chunk ``c``
    holds bits ``[offsets[c], ends[c])``. ``final[c]`` receives the bit where the chunk's last code
    ends, or -1 if a code is invalid or crosses ``ends[c]``.
    """
    count = out.size
    nchunks = offsets.size
    for g in prange((nchunks + _LANES - 1) // _LANES):
        c = g * _LANES
        if c + _LANES > nchunks or (c + _LANES) * chunk_size > count:
            for k in range(c, min(c + _LANES, nchunks)):  # a partial group, or the short last chunk
                _huffman_chunk(words, table, peek, ranges, order, offsets, ends, chunk_size, out, final, k)
            continue
        # Four chunks interleaved, written out by hand so the four positions stay in registers.
        p0, p1 = np.int64(offsets[c]), np.int64(offsets[c + 1])
        p2, p3 = np.int64(offsets[c + 2]), np.int64(offsets[c + 3])
        e0, e1 = np.int64(ends[c]), np.int64(ends[c + 1])
        e2, e3 = np.int64(ends[c + 2]), np.int64(ends[c + 3])
        o0 = _U(c * chunk_size)     # unsigned: no wraparound test on every store
        o1, o2, o3 = o0 + _U(chunk_size), o0 + _U(2 * chunk_size), o0 + _U(3 * chunk_size)
        ok = True
        for i in range(chunk_size):
            a0 = _huffman_next(words, table, peek, ranges, order, p0, e0)
            a1 = _huffman_next(words, table, peek, ranges, order, p1, e1)
            a2 = _huffman_next(words, table, peek, ranges, order, p2, e2)
            a3 = _huffman_next(words, table, peek, ranges, order, p3, e3)
            if (a0 | a1 | a2 | a3) < 0:
                ok = False
                break
            u = _U(i)
            out[o0 + u] = a0 & 0xFFFF
            out[o1 + u] = a1 & 0xFFFF
            out[o2 + u] = a2 & 0xFFFF
            out[o3 + u] = a3 & 0xFFFF
            p0 += a0 >> 16
            p1 += a1 >> 16
            p2 += a2 >> 16
            p3 += a3 >> 16
        final[c] = p0 if ok and p0 <= e0 else -1
        final[c + 1] = p1 if ok and p1 <= e1 else -1
        final[c + 2] = p2 if ok and p2 <= e2 else -1
        final[c + 3] = p3 if ok and p3 <= e3 else -1


@njit(cache=True, nogil=True)
def lzw_walk(buf, nbits, alphabet, max_width, count, out, write):  # pragma: no cover - compiled
    """Decode variable-width LZW codes until ``count`` symbols; returns ``(status, bits_read)``.

    status: 0 ok, 1 payload ends too early, 2 invalid code, 3 a code's string overruns ``count``.
    With ``write`` false nothing is written (``out`` may be empty): a cheap pass that validates the
    codes and proves the payload really holds ``count`` symbols before ``out`` is allocated.
    A dictionary entry is stored as where its string first occurs in the output and its length.
    """
    capacity = np.int64(1) << max_width
    start = np.zeros(capacity, dtype=np.int64)
    size = np.zeros(capacity, dtype=np.int64)
    pos = np.int64(0)
    k = np.int64(0)
    o = np.int64(0)
    width = 0
    prev_start = np.int64(0)
    prev_len = np.int64(0)
    while o < count:
        created = alphabet + k - 1  # entry of step k: previous string plus this string's first symbol
        if k >= 1 and created < capacity:
            start[created] = prev_start
            size[created] = prev_len + 1
        while width < max_width and (alphabet + k) >> width != 0:
            width += 1
        if pos + width > nbits:
            return 1, pos
        b = pos >> 3
        window = (np.int64(buf[b]) << 16) | (np.int64(buf[b + 1]) << 8) | np.int64(buf[b + 2])
        code = (window >> (24 - (pos & 7) - width)) & ((np.int64(1) << width) - 1)
        pos += width
        if code >= min(alphabet + k, capacity):
            return 2, pos
        if code < alphabet:
            length = np.int64(1)
            if write:
                out[o] = code
        else:
            length = size[code]
            if o + length > count:
                return 3, pos
            if write:
                src = start[code]
                for j in range(length):  # forwards: the string may end in its own first symbol
                    out[o + j] = out[src + j]
        prev_start = o
        prev_len = length
        o += length
        k += 1
    return 0, pos
