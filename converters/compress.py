"""Prune, share weights and entropy-code one tensor into a :class:`TensorRecord`."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from dcrt import codecs, sparse
from dcrt.codecs import EncodedStream
from dcrt.errors import ConversionError
from dcrt.format import dtypes
from dcrt.format.tensor import QUANTIZED, SPARSE, LayerStats, TensorRecord
from dcrt.format.writer import raw_record

from .cluster import assign, kmeans_1d
from .plan import LayerPlan

LOSSLESS_BITS = 32
MAX_EXACT_CODEBOOK = 1 << 16
RELATIVE_INDEX_BITS = (2, 3, 4, 5, 6, 7, 8)   # widths tried when the plan does not fix one   # a lossless codebook needs every distinct value as a centroid


PRUNED_ELSEWHERE = 0.2   # a weight with this fraction of exact zeros was pruned before dcrt saw it


def prune_mask(w: np.ndarray, plan: LayerPlan) -> np.ndarray:
    """True where a weight is kept. Exact zeros are always pruned (they cost nothing sparse).

    A weight that already has ``PRUNED_ELSEWHERE`` or more exact zeros was pruned by the user's own
    tools (tfmot, torch pruning, possibly with retraining): its mask is kept as it is, unless the
    plan gives a ``threshold`` explicitly.
    """
    keep = w != 0
    already = 1.0 - np.count_nonzero(keep) / max(w.size, 1)
    if not plan.prune or (already >= PRUNED_ELSEWHERE and plan.threshold is None):
        return keep
    magnitude = np.abs(w)
    if plan.threshold is not None:
        return keep & (magnitude > plan.threshold)
    drop = int(round(plan.sparsity * w.size)) - int(w.size - np.count_nonzero(keep))
    if drop > 0:
        # The `drop` smallest non-zero magnitudes go; ties at the threshold are broken by position,
        # so the result is deterministic. O(n) with a partition instead of a sort.
        candidates = magnitude[keep]
        threshold = np.partition(candidates, drop - 1)[drop - 1]
        below = keep & (magnitude < threshold)
        at = np.flatnonzero(keep & (magnitude == threshold))
        keep = keep & ~below
        keep.ravel()[at[:drop - int(np.count_nonzero(below))]] = False
    return keep


def share_weights(kept: np.ndarray, centroids: int, lossless: bool) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(codebook, labels)`` for the kept weights, or None when they must stay raw.

    If the weights take at most ``centroids`` distinct values (a model clustered elsewhere), or the
    plan asks for no clustering and they take at most 2^16, the codebook is exactly those values.
    """
    distinct = np.unique(kept)
    if distinct.size <= centroids or (lossless and distinct.size <= MAX_EXACT_CODEBOOK - 1):
        return distinct.astype(np.float32), np.searchsorted(distinct, kept)
    if lossless:
        return None
    return kmeans_1d(kept, centroids)


def _stream_cost(stream: Optional[EncodedStream]) -> int:
    return codecs.stream_bytes(stream) if stream is not None else 0


def _encode(symbols: np.ndarray, alphabet: int, coder: str) -> EncodedStream:
    chain = coder if coder == "auto" or codecs.usable(coder, alphabet) else "none"
    return codecs.encode(symbols, alphabet, chain)


def compress_tensor(name: str, w: np.ndarray, plan: LayerPlan) -> Tuple[TensorRecord, np.ndarray]:
    """Compress ``w`` by ``plan``; returns the record and the exact values the file decodes to."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    bad = w.size - int(np.count_nonzero(np.isfinite(w)))
    if bad:
        raise ConversionError(f"tensor {name!r} holds {bad} non-finite value(s) (inf or NaN), which cannot be "
                              "pruned or clustered: fix the model, or keep the tensor as it is with a config "
                              f"entry layers: {{{name!r}: {{skip: true}}}}")
    lossless = plan.bits >= LOSSLESS_BITS
    keep = prune_mask(w, plan)
    nonzero = int(np.count_nonzero(keep))
    pruned = nonzero < w.size
    centroids = (1 << min(plan.bits, 16)) - (1 if pruned else 0)
    shared = share_weights(w[keep], max(centroids, 1), lossless)
    if shared is None:      # lossless, too many distinct values for a codebook: float32, pruned as planned
        kept = np.where(keep, w, np.float32(0))
        return raw_record(name, kept), kept
    codebook, labels = shared
    approx = np.zeros_like(w)
    approx[keep] = codebook[labels]
    shape = tuple(int(d) for d in w.shape)

    # Candidate 1, quantized: one symbol per weight; pruned weights get a zero centroid.
    book_q = codebook
    sym = np.zeros(w.shape, np.int64)
    if pruned:
        book_q = np.concatenate([codebook, np.zeros(1, np.float32)])
        sym[:] = len(codebook)
    sym[keep] = labels
    indices_q = _encode(sym.ravel(), len(book_q), plan.coder)
    candidates = [(QUANTIZED, book_q, indices_q, None, None)]

    # Candidate 2, sparse: CSC of the kept weights with relative indices and fillers. The relative
    # index width (unless the plan fixes it) is the one whose streams have the least entropy.
    if pruned:
        rows, cols = sparse.matrix_shape(shape)
        sym2 = np.zeros((rows, cols), np.int64)
        sym2.reshape(w.shape)[keep] = labels + 1
        positions = sparse.kept_positions(sym2)
        bits = plan.relative_index_bits
        if not bits:
            gaps = sparse.zero_gaps(positions[0], positions[1])
            bits = min(RELATIVE_INDEX_BITS, key=lambda b: sparse.entries_entropy_bits(gaps, positions[2], b))
        entries, relative, counts = sparse.encode_csc(sym2, bits, positions)
        candidates.append((SPARSE, codebook, _encode(entries, len(codebook) + 1, plan.coder),
                           _encode(relative, 1 << bits, plan.coder),
                           _encode(counts, int(counts.max(initial=0)) + 1, plan.coder)))

    def cost(c) -> int:
        return 4 * len(c[1]) + sum(_stream_cost(s) for s in c[2:])

    best = min(candidates, key=cost)
    if cost(best) >= w.nbytes:    # e.g. a lossless codebook of many distinct values: raw is smaller
        return raw_record(name, approx), approx     # the values the plan asked for, pruning included
    encoding, book, indices, relative_s, counts_s = best
    stats = LayerStats(element_count=w.size, nonzero_count=nonzero, original_bytes=w.nbytes,
                       coded_bytes=cost((encoding, book, indices, relative_s, counts_s)),
                       codebook_size=len(codebook), index_bits=min(plan.bits, 16),
                       relative_index_bits=relative_s.alphabet.bit_length() - 1 if encoding == SPARSE else 0)
    rec = TensorRecord(name, dtypes.to_onnx(np.float32), shape, encoding, b"", np.asarray(book, np.float32),
                       indices, relative_s, counts_s, stats)
    rec.checksum = rec.digest()
    return rec, approx
