"""Compiled decoding kernels for the Huffman and LZW coders.

Importing this module imports numba, so the coders import it lazily, only to decode (through
:func:`dcrt.codecs.raw.numba_kernels` or their ``decode_numba``). The kernels trust the stage fields
(the callers validate them first) but not the payload: every code read is checked, every write is in
bounds, and problems are reported through return values for the caller to raise FormatError.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, nogil=True)
def huffman_chunks(buf, table, offsets, ends, chunk_size, out, final):  # pragma: no cover - compiled
    """Decode every Huffman chunk (in parallel) into ``out``.

    ``buf``: payload plus >= 3 zero bytes; ``table``: ``(length << 16) | symbol`` per 16-bit peek, 0 for
    no code; chunk ``c`` holds bits ``[offsets[c], ends[c])``. ``final[c]`` receives the bit where the
    chunk's last code ends, or -1 if a code is invalid or crosses ``ends[c]``.
    """
    count = out.size
    for c in prange(offsets.size):
        pos = np.int64(offsets[c])
        end = np.int64(ends[c])
        first = c * chunk_size
        last = min(first + chunk_size, count)
        for i in range(first, last):
            if pos >= end:
                pos = -1
                break
            b = pos >> 3
            window = (np.int64(buf[b]) << 16) | (np.int64(buf[b + 1]) << 8) | np.int64(buf[b + 2])
            entry = np.int64(table[(window >> (8 - (pos & 7))) & 0xFFFF])
            length = entry >> 16
            if length == 0:
                pos = -1
                break
            out[i] = entry & 0xFFFF
            pos += length
        if pos > end:
            pos = -1
        final[c] = pos


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
