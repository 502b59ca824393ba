"""Index-mode weights compute exactly what their dense expansion computes."""
from __future__ import annotations

import numpy as np
import pytest

from dcrt import sparse
from runtime_helpers import no_numba, random_weight

from dcrt.runtime import indexed, kernels
from dcrt.runtime.indexed import ByInput, IndexedWeight, SparseWeight


def forms(shape, density=0.2, seed=0):
    codebook, symbols = random_weight(shape, density, seed)     # symbols: 0 = pruned, s -> codebook[s-1]
    dense = np.concatenate([[0], codebook]).astype(np.float32)[symbols]
    rows, cols = sparse.matrix_shape(shape)
    entries = sparse.encode_csc(symbols.reshape(rows, cols), 3)
    return dense, [IndexedWeight(np.concatenate([[0], codebook]), symbols),
                   SparseWeight.from_entries(codebook, *entries, shape)]


@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_matmul_both_ways(batch, density):
    dense, weights = forms((37, 53), density, seed=batch)
    x = np.random.default_rng(1).standard_normal((batch, 53)).astype(np.float32)
    xt = np.random.default_rng(2).standard_normal((2, batch, 37)).astype(np.float32)
    for w in weights:
        np.testing.assert_allclose(w.matmul_t(x), x @ dense.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(w.matmul(xt), xt @ dense, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(w.dense(), dense)


@pytest.mark.parametrize("numba", [True, False])
def test_csr_positions_are_uint16_up_to_65536_columns(numba, monkeypatch):
    """2 bytes per kept weight's column while they fit, int32 past 65536 columns; both compute the
    same products (compiled and numpy twin), and a direction of a 3-D weight keeps the rule."""
    if not numba:
        no_numba(monkeypatch)
    for width, dtype in ((1 << 16, np.uint16), ((1 << 16) + 1, np.int32)):
        dense, (_, sw) = forms((3, width), 0.01, seed=width)
        assert sw.cols.dtype == dtype
        x = np.random.default_rng(0).standard_normal((2, width)).astype(np.float32)
        xt = np.random.default_rng(1).standard_normal((1, 3)).astype(np.float32)
        np.testing.assert_allclose(sw.matmul_t(x), x @ dense.T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sw.matmul(xt), xt @ dense, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(sw.dense(), dense)
    _, (_, sw) = forms((2, 4, 5), 0.5)
    assert sw.cols.dtype == np.uint16 and sw[1].cols.dtype == np.uint16


def test_views_rows_reshape_and_take():
    dense, weights = forms((2, 24, 6, 3, 3), 0.3)
    idx = np.array([[1, 0], [1, 1]])
    for w in weights:
        assert w.shape == dense.shape and w.ndim == 5 and w.dtype == np.float32
        np.testing.assert_array_equal(w[1].dense(), dense[1])                       # one direction
        np.testing.assert_array_equal(w[1][4:9].reshape(5, -1).dense(), dense[1, 4:9].reshape(5, -1))
        np.testing.assert_array_equal(w.take_rows(idx), dense[idx])
        x = np.random.default_rng(0).standard_normal((3, 54)).astype(np.float32)
        np.testing.assert_allclose(w[0].reshape(24, -1).matmul_t(x), x @ dense[0].reshape(24, -1).T,
                                   rtol=1e-5, atol=1e-5)


def test_numba_kernels_agree_with_numpy(monkeypatch):
    """Every compiled kernel against its numpy twin (DCRT_NO_NUMBA forces the twin)."""
    pytest.importorskip("numba")
    from dcrt.runtime.numba_kernels import kernels
    if kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    for density in (0.1, 0.6):
        dense, weights = forms((70, 130), density, seed=3)
        x = np.random.default_rng(4).standard_normal((3, 130)).astype(np.float32)
        xt = np.random.default_rng(5).standard_normal((2, 70)).astype(np.float32)
        x[0, ::3] = 0                                  # zeros are skipped by the scatter kernels
        for w in weights:
            compiled = (w.matmul_t(x), w.matmul(xt), w[10:50].matmul_t(x))
            no_numba(monkeypatch)
            twin = (w.matmul_t(x), w.matmul(xt), w[10:50].matmul_t(x))
            no_numba(monkeypatch, None)
            for c, t in zip(compiled, twin):
                np.testing.assert_allclose(c, t, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(compiled[0], x @ dense.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_numpy_twins_of_sparse_products_go_by_blocks_of_rows(batch, monkeypatch):
    """Without numba, a CSR weight's small-batch products go through blocks of whole rows (about
    ENTRY_BLOCK kept weights each, a longer row alone): rows without kept weights (first, inner,
    last) give zeros, a row longer than a block is summed whole, and ``x @ W.T`` (sums per row) and
    ``x @ W`` (each input's row added into its columns) give what the dense weight gives."""
    no_numba(monkeypatch)
    monkeypatch.setattr(indexed, "ENTRY_BLOCK", 16)
    codebook, symbols = random_weight((12, 40), 0.3, seed=batch)
    symbols[[0, 5, 11]] = 0
    symbols[7] = np.arange(40) % len(codebook) + 1               # 40 kept weights: over a block
    dense = np.concatenate([[0], codebook]).astype(np.float32)[symbols]
    w = SparseWeight.from_entries(codebook, *sparse.encode_csc(symbols, 3), symbols.shape)
    blocks = list(w._row_blocks())
    assert [b[0] for b in blocks] == [0] + [b[1] for b in blocks[:-1]] and blocks[-1][1] == 12
    assert all(b - a <= 16 or r1 - r0 == 1 for r0, r1, a, b in blocks) and (7, 8, w.row_ptr[7], w.row_ptr[8]) in blocks
    rng = np.random.default_rng(batch)
    x, xt = rng.standard_normal((batch, 40)).astype(np.float32), rng.standard_normal((batch, 12)).astype(np.float32)
    y = w.matmul_t(x)
    assert y.dtype == np.float32 and not y[:, [0, 5, 11]].any()
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w.matmul(xt), xt @ dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ByInput(w).matmul_t(xt), xt @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_by_input_computes_what_the_dense_weight_does(numba, batch, monkeypatch):
    """A Gemm weight kept grouped by input (``ByInput``): ``x @ W.T`` (the scatter, zero activations
    skipped; tiles past 32 rows), ``x @ W``, the node's prepared runner with bias and clamp, and
    ``dense`` give what the dense weight gives, compiled and numpy twin alike."""
    if not numba:
        no_numba(monkeypatch)
    codebook, symbols = random_weight((37, 53), 0.3, seed=batch)
    dense = np.concatenate([[0], codebook]).astype(np.float32)[symbols]
    w = ByInput(SparseWeight.transpose_from_entries(codebook, *sparse.encode_csc(symbols, 3), symbols.shape))
    rng = np.random.default_rng(batch)
    x = np.maximum(rng.standard_normal((batch, 53)), 0).astype(np.float32)   # after a ReLU
    x[:, ::5] = 0
    xt = rng.standard_normal((batch, 37)).astype(np.float32)
    bias = rng.standard_normal(37).astype(np.float32)
    assert w.shape == (37, 53) and w.ndim == 2 and w.nbytes == w.inner.nbytes
    np.testing.assert_array_equal(w.dense(), dense)
    np.testing.assert_allclose(w.matmul_t(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w.matmul(xt), xt @ dense, rtol=1e-5, atol=1e-5)
    expected = np.clip(x @ dense.T + bias, 0, 6)
    np.testing.assert_allclose(kernels.matmul_t(x, w, bias, (0.0, 6.0)), expected, rtol=1e-5, atol=1e-5)
    run = kernels.product_runner(x, w, bias, (0.0, 6.0), True)
    np.testing.assert_allclose(run(x, w, bias), expected, rtol=1e-5, atol=1e-5)
