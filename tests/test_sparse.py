"""CSC coding of pruned weights (dcrt.sparse): round trips over random matrices, every relative
index width, column blocks of any size, and damaged streams."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dcrt import sparse
from dcrt.errors import FormatError


def dense_symbols(rng, rows, cols, density):
    return np.where(rng.random((rows, cols)) < density, rng.integers(1, 17, (rows, cols)), 0).astype(np.uint8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 300), cols=st.integers(1, 40), density=st.floats(0, 1), bits=st.integers(1, 8),
       chunk=st.sampled_from([1, 7, 64, 1 << 20]), seed=st.integers(0, 2**32 - 1))
def test_round_trip(monkeypatch, rows, cols, density, bits, chunk, seed):
    monkeypatch.setattr(sparse, "CHUNK_ENTRIES", chunk)
    symbols = dense_symbols(np.random.default_rng(seed), rows, cols, density)
    entries, relative, counts = sparse.encode_csc(symbols, bits)
    assert relative.max(initial=0) < 2 ** bits
    col_ptr, row_idx, kept = sparse.decode_csc(entries, relative, counts, rows)
    assert row_idx.dtype == np.int32 and col_ptr.dtype == np.int64
    np.testing.assert_array_equal(sparse.csc_to_dense_symbols(col_ptr, row_idx, kept, rows), symbols)
    # the same CSC numpy would give: column pointers, rows ascending within each column
    cols_nz, rows_nz = np.nonzero(symbols.T)
    np.testing.assert_array_equal(row_idx, rows_nz)
    np.testing.assert_array_equal(np.diff(col_ptr), np.bincount(cols_nz, minlength=cols))


def test_fillers_bridge_long_gaps():
    symbols = np.zeros((1000, 2), np.uint8)
    symbols[999, 0] = symbols[0, 1] = 3
    entries, relative, counts = sparse.encode_csc(symbols, 2)
    assert list(counts) == [999 // 4 + 1, 1]              # 249 fillers bridge 4 rows each, then the weight
    assert (entries[:-2] == 0).all() and (relative[:-2] == 3).all()
    col_ptr, rows, kept = sparse.decode_csc(entries, relative, counts, 1000)
    assert list(rows) == [999, 0] and list(kept) == [3, 3]


@pytest.mark.parametrize("damage, message", [
    (lambda e, r, c: (e, r[:-1], c), "disagree"),
    (lambda e, r, c: (e, r, c + 1), "disagree"),
    (lambda e, r, c: (e, r + 200, c), "run past"),
    (lambda e, r, c: (e, r, np.concatenate(([c[0] + c[1]], [0], c[2:]))), "run past"),
])
def test_damaged_streams_are_format_errors(damage, message):
    symbols = dense_symbols(np.random.default_rng(0), 50, 6, 0.5)
    with pytest.raises(FormatError, match=message):
        sparse.decode_csc(*damage(*sparse.encode_csc(symbols, 3)), 50)
