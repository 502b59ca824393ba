"""Sparse index coding of pruned weights: CSC with relative row indices and filler entries.

The weight is viewed as a 2-D matrix (``shape[0]`` rows, ``prod(shape[1:])`` columns) and stored
column by column, as in the Deep Compression paper (section 2): for each kept weight we store its
codebook symbol and its *relative index*, the number of zero rows skipped since the previous entry
of the same column. A relative index has ``bits`` bits; when a gap of zeros is longer than
``2**bits - 1``, *filler* entries (relative index at its maximum, symbol 0 = zero) bridge it.
The number of entries in each column (fillers included) is stored too; column pointers are their
prefix sums, so every column can be found without decoding the others.

Symbols: 0 is the filler/zero, ``s >= 1`` is a kept weight with value ``codebook[s - 1]``.
Everything here is vectorised numpy: no Python loop per weight.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import FormatError


def matrix_shape(shape) -> Tuple[int, int]:
    """The 2-D view a sparse tensor is stored in: ``shape[0]`` rows by the product of the rest."""
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if shape else 1
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return rows, cols


def kept_positions(symbols: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cols, rows, kept_symbols)`` of the non-zero symbols of a 2-D array, column by column."""
    if symbols.ndim != 2:
        raise ValueError("a sparse tensor is coded over a 2-D view")
    cols, rows = np.nonzero(symbols.T)     # column-major order, rows ascending within a column
    return cols, rows, symbols.T[cols, rows]


def zero_gaps(cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Zeros skipped before each kept weight within its column (the relative index before fillers)."""
    first = np.ones(len(rows), dtype=bool)
    first[1:] = cols[1:] != cols[:-1]
    previous_end = np.zeros(len(rows), dtype=np.int64)
    previous_end[1:] = rows[:-1] + 1
    return rows - np.where(first, 0, previous_end)


def encode_csc(symbols: np.ndarray, bits: int, positions=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Code a 2-D array of symbols (0 = pruned) as CSC entries.

    Returns ``(entry_symbols, relative_indices, column_counts)``: one symbol and one relative index
    per stored entry (kept weights and fillers, column by column, rows ascending), and the number of
    entries of every column. ``positions`` (from :func:`kept_positions`) saves recomputing them when
    several widths are tried.
    """
    cols, rows, kept = positions if positions is not None else kept_positions(symbols)
    step = 1 << bits                       # a filler bridges 2**bits - 1 zeros plus itself
    gaps = zero_gaps(cols, rows)
    fillers = gaps // step
    per_kept = fillers + 1
    total = int(per_kept.sum())
    entry_symbols = np.zeros(total, dtype=kept.dtype)
    relative = np.full(total, step - 1, dtype=np.int64)
    at = np.cumsum(per_kept) - 1           # where each kept weight lands, after its fillers
    entry_symbols[at] = kept
    relative[at] = gaps - fillers * step
    counts = np.bincount(cols, weights=per_kept, minlength=symbols.shape[1]).astype(np.int64)
    return entry_symbols, relative, counts


def entries_entropy_bits(gaps: np.ndarray, kept: np.ndarray, bits: int) -> float:
    """Order-0 entropy (bits) of the symbol and relative-index streams for a relative index width.

    Used to pick the width without entropy-coding every candidate: fillers add entries (symbol 0,
    relative index at its maximum) to both streams.
    """
    step = 1 << bits
    fillers = gaps // step
    n_fill = int(fillers.sum())
    rel_counts = np.bincount(gaps - fillers * step, minlength=step).astype(np.float64)
    rel_counts[step - 1] += n_fill
    sym_counts = np.bincount(kept.astype(np.int64), minlength=1).astype(np.float64)  # none kept: zeros
    sym_counts[0] += n_fill

    def h(counts):
        total = counts.sum()
        p = counts[counts > 0] / total
        return float(-(p * np.log2(p)).sum() * total)
    return h(rel_counts) + h(sym_counts) + 8 * step   # + a code-length table of 2**bits bytes


CHUNK_ENTRIES = 1 << 20     # decode_csc works through the entries in column blocks of about this many


def decode_csc(entry_symbols: np.ndarray, relative: np.ndarray, counts: np.ndarray,
               rows: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_csc` without the fillers.

    Returns ``(col_ptr, row_indices, symbols)`` of the kept weights (standard CSC: int64 column
    pointers, int32 row indices). The entries are decoded in blocks of whole columns, so that
    the int64 temporaries stay about :data:`CHUNK_ENTRIES` long whatever the tensor's size: opening
    a 100M-weight layer costs little more than its final arrays.
    Raises :class:`FormatError` when the entries do not fit a matrix with ``rows`` rows.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if len(entry_symbols) != len(relative) or counts.sum() != len(relative) or (counts < 0).any():
        raise FormatError("sparse index streams disagree: entry count, relative indices and "
                          "column counts do not match")
    if rows > np.iinfo(np.int32).max:
        raise FormatError(f"a sparse tensor with {rows} rows is beyond the format's limits")
    entry_symbols = np.asarray(entry_symbols)
    col_start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=col_start[1:])
    keep = entry_symbols != 0
    kept_per_col = np.zeros(len(counts), dtype=np.int64)
    row_out = np.empty(int(np.count_nonzero(keep)), dtype=np.int32)
    # blocks of whole columns with about CHUNK_ENTRIES entries (a longer column is a block of its own)
    firsts = np.searchsorted(col_start, np.arange(0, len(relative), CHUNK_ENTRIES), "right") - 1
    bounds = np.unique(np.concatenate(([0], firsts, [len(counts)])))
    at = 0
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        e0, e1 = col_start[c0], col_start[c1]
        advance = np.cumsum(np.asarray(relative[e0:e1], dtype=np.int64) + 1)
        base = np.concatenate(([0], advance))[col_start[c0:c1] - e0]   # rows passed before each column
        col_of = np.repeat(np.arange(c1 - c0), counts[c0:c1].astype(np.intp))  # intp: 32-bit ARM
        row = advance - base[col_of] - 1
        if len(row) and row.max() >= rows:
            raise FormatError(f"sparse relative indices run past the matrix's {rows} rows")
        kept = keep[e0:e1]
        row_out[at:at + np.count_nonzero(kept)] = row[kept]
        at += np.count_nonzero(kept)
        kept_per_col[c0:c1] = np.bincount(col_of[kept], minlength=c1 - c0)
    col_ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(kept_per_col, out=col_ptr[1:])
    return col_ptr, row_out, entry_symbols[keep]


def csc_to_dense_symbols(col_ptr: np.ndarray, row_indices: np.ndarray, symbols: np.ndarray,
                         rows: int, dtype=None) -> np.ndarray:
    """Scatter CSC symbols into a dense ``rows x cols`` symbol matrix (0 where pruned)."""
    cols = len(col_ptr) - 1
    out = np.zeros((rows, cols), dtype=dtype or symbols.dtype)
    col_of = np.repeat(np.arange(cols), np.diff(col_ptr).astype(np.intp))
    out[row_indices, col_of] = symbols
    return out
