"""Every numba kernel against its numpy twin (``DCRT_NO_NUMBA=1`` selects the twins), plus the rules
the fast paths must keep: no dense copy of a compressed weight in index mode, fused activations that
change nothing, parallel forms that agree with the serial ones."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc
import weakref

import numpy as np
import pytest

from runtime_helpers import no_numba, random_weight

from dcrt import sparse
from dcrt.errors import DcrtError, FormatError
from dcrt.graph import Graph, Node, ValueInfo
from dcrt.runtime import derived, indexed, kernels, numba_kernels, winograd
from dcrt.runtime.executor import Executor
from dcrt.runtime.indexed import IndexedWeight, SparseWeight
from dcrt.runtime.ops import OPS

pytestmark = pytest.mark.skipif(numba_kernels.kernels() is None and not os.environ.get("DCRT_NO_NUMBA"),
                                reason="numba is not installed")
RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def both(fn, monkeypatch):
    """``fn()`` with the numba kernels, then with their numpy twins."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: no compiled kernels to compare")
    compiled = fn()
    no_numba(monkeypatch)
    try:
        assert numba_kernels.kernels() is None
        twin = fn()
    finally:
        no_numba(monkeypatch, None)
    return compiled, twin


def test_no_numba_is_read_once_and_on_reset(monkeypatch):
    """``DCRT_NO_NUMBA`` is read at the first use and again by ``reset`` (not on every call: ~0.7 us)."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    monkeypatch.setenv("DCRT_NO_NUMBA", "1")
    assert numba_kernels.kernels() is not None          # not re-read by kernels()
    numba_kernels.reset()
    assert numba_kernels.kernels() is None and numba_kernels.threads() == 1
    monkeypatch.setenv("DCRT_NO_NUMBA", "0")
    numba_kernels.reset()
    assert numba_kernels.kernels() is not None


def fresh_python(tmp_path, source: str, *args, **env) -> str:
    """Run ``source`` in a new Python process (``env`` added to the environment); its stdout, stripped."""
    script = tmp_path / "fresh.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_cached_kernels_load_without_numba_compiler_setup(dcm_path, tmp_path):
    """A fresh process loads the cached kernels without numba's compiler set-up (``dcrt._jit``): a model's
    first result imports none of numba's lowering modules (``numba.np.arraymath`` imports
    ``scipy.linalg``), not even the one its kernels' array allocations come from (``numba.np.arrayobj``)
    or a slice assignment's (``numba.cpython.slicing``: unicode and hashing with it, 26 ms and 1.8 MB),
    and parses no kernel's bitcode, and equals the result of a process that did the set-up first. A
    function compiled afterwards that calls a kernel so loaded links it (its bitcode parsed then)."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    source = f"""
        import sys
        import numba
        import numpy as np
        if sys.argv[1] == "setup":
            from numba.core.registry import cpu_target
            cpu_target.target_context.refresh()
        import dcrt
        from dcrt.runtime.numba_kernels import kernels as compiled
        kernels = compiled()
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        ys = [dcrt.Session({str(dcm_path("resnet18_tiny"))!r}, mode=mode).run(x) for mode in ("index", "dense")]
        np.save(sys.argv[2], np.stack(ys))
        # an LSTM at batch 1 from a pruned R in slices (the kernel is loaded wherever numba runs)
        from dcrt.runtime.indexed import SparseWeight
        kept = np.arange(80 * 20).reshape(80, 20) % 7 == 0
        sw = SparseWeight(np.ones(3, np.float32), np.concatenate([[0], np.cumsum(kept.sum(1))]).astype(np.int32),
                          np.nonzero(kept)[1].astype(np.uint16), np.ones(kept.sum(), np.uint8), (80, 20))
        h = np.zeros((1, 20), np.float32)
        kernels.lstm_sliced(np.zeros((3, 1, 80), np.float32), *sw.sliced().arrays, np.zeros(0, np.float32),
                            np.float32(np.inf), False, h, h.copy(), np.empty((3, 1, 20), np.float32))
        loaded = [o.library for d in (kernels.expand, kernels.bias_clamp) for o in d.overloads.values()]
        parsed = sum(lib.__dict__.get("_shared_module") is not None for lib in loaded)
        print("arraymath" if "numba.np.arraymath" in sys.modules else
              "arrayobj" if "numba.np.arrayobj" in sys.modules else
              "slicing" if "numba.cpython.slicing" in sys.modules else
              f"light, {{len(loaded)}} loaded, {{parsed}} parsed")

        expand = kernels.expand

        @numba.njit
        def linked(i, c, o):
            expand(i, c, o)
            return o.sum()
        before = len(kernels.expand.overloads)
        assert linked(np.arange(6, dtype=np.uint8).reshape(2, 3), np.arange(8, dtype=np.float32),
                      np.empty((2, 3), np.float32)) == 15 and len(kernels.expand.overloads) == before
    """

    def fresh(how):
        out = tmp_path / f"{how}.npy"
        return fresh_python(tmp_path, source, how, out), np.load(out)
    fresh("light")      # compiles whatever is not cached yet
    light, y = fresh("light")
    setup, y_setup = fresh("setup")
    assert light.startswith("light, ") and light.endswith(" loaded, 0 parsed") and light != "light, 0 loaded, 0 parsed"
    assert setup == "arraymath"
    np.testing.assert_array_equal(y, y_setup)


def test_one_profile_run_fills_the_cache_a_deployed_run_loads(dcm_path, tmp_path):
    """README's advice for devices: ``dcrt profile model.dcm --runs 1`` in a fresh numba cache compiles
    every kernel a later ``dcrt run`` of the model needs, so that run loads them all and writes nothing."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    model, cache = dcm_path("lenet_300_100"), tmp_path / "numba_cache"
    np.save(tmp_path / "x.npy", rand(1, 784))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))

    def dcrt_cli(*args):
        proc = subprocess.run([sys.executable, "-m", "dcrt", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    def files():
        return {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    dcrt_cli("profile", model, "--runs", "1")
    compiled = files()
    assert sum(p.suffix == ".nbi" for p in compiled) >= 3        # the products, the Huffman decoder...
    dcrt_cli("run", model, "--input", tmp_path / "x.npy")
    assert files() == compiled


def test_numba_runtime_machine_code_is_kept_beside_the_kernels(dcm_path, tmp_path):
    """numba's runtime (NRT) is compiled in the first process only: later ones load its machine code from
    the cache folder (a damaged file is compiled and written again), and run the cached kernels and
    kernels compiled afresh (which link against the runtime) with the same results."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    folder = tmp_path / "cache"
    folder.mkdir()
    source = f"""
        import sys
        import numba
        import numpy as np
        from numba.core.codegen import CPUCodeLibrary
        from numba.core.registry import cpu_target
        from dcrt import _jit
        compiled = []
        finalize = CPUCodeLibrary.finalize
        CPUCodeLibrary.finalize = lambda self: (compiled.append(self.name), finalize(self))[1]
        _jit._start_runtime(cpu_target.target_context, sys.argv[1])
        import dcrt
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        y = dcrt.Session({str(dcm_path("resnet18_tiny"))!r}, mode="index").run(x)
        assert numba.njit(lambda n: np.ones(n).sum())(7) == 7
        np.save(sys.argv[2], y)
        print("compiled" if "nrt" in compiled else "loaded")
    """

    def fresh(name):
        out = tmp_path / f"{name}.npy"
        return fresh_python(tmp_path, source, folder, out), np.load(out)
    first, y = fresh("first")
    [kept] = folder.iterdir()
    assert first == "compiled" and kept.name.startswith("numba-runtime-") and kept.suffix == ".nbo"
    code = kept.read_bytes()
    second, y2 = fresh("second")
    assert second == "loaded" and kept.read_bytes() == code
    kept.write_bytes(code[:len(code) // 2])
    third, y3 = fresh("third")
    assert third == "compiled" and kept.read_bytes() == code and list(folder.iterdir()) == [kept]
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(y3, y)


def test_cached_kernel_is_stale_when_a_module_it_inlines_from_changes(tmp_path):
    """A kernel cached by ``dcrt._jit.njit`` compiles again when a private module of its folder changes
    (``_numba_conv`` inlines ``_simd``'s shuffles, ``_numba_rnn`` ``_numba_index``'s sums): numba itself
    checks only the kernel's own file, so an edited helper kept its old code in the cache."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    package = tmp_path / "kernels_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_numba_kernel.py").write_text(textwrap.dedent("""
        from dcrt._jit import njit
        from ._helper import scale

        @njit(cache=True)
        def kernel(v):
            return scale(v)
    """))
    helper = package / "_helper.py"
    source = """
        import sys
        sys.path.insert(0, sys.argv[1])
        from kernels_pkg._numba_kernel import kernel
        print(kernel(5.0), len(kernel.stats.cache_hits))
    """
    for factor, loaded in ((2, "0"), (2, "1"), (3, "0"), (3, "1")):     # compiled, cached, compiled, cached
        helper.write_text(f"from dcrt._jit import njit\n\n\n@njit(inline='always')\ndef scale(v):\n"
                          f"    return v * {factor}\n")
        assert fresh_python(tmp_path, source, tmp_path, NUMBA_CACHE_DIR=str(tmp_path / "cache")) \
            == f"{5.0 * factor} {loaded}"


def test_cached_kernel_load_falls_back_to_numbas_way(monkeypatch):
    """A cached load that fails without numba's set-up is done again numba's way (refresh first)."""
    from numba.core.caching import FunctionCache
    from dcrt import _jit
    k = numba_kernels.kernels()
    if k is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    codebook = rand(16)
    out = np.empty((3, 4), np.float32)
    k.expand(np.arange(12, dtype=np.uint8).reshape(3, 4), codebook, out)
    np.testing.assert_array_equal(out.ravel(), codebook[:12])
    kernel = k.expand
    assert isinstance(kernel._cache, _jit._LoadCache)
    sig = kernel.signatures[0]
    failures, numbas = [], []
    load = FunctionCache._load_overload

    def fail_light_load(self, sig, ctx):
        failures.append(sig)
        raise KeyError("a type numba has not registered yet")

    def numbas_load(self, sig, ctx):
        numbas.append(sig)
        return load(self, sig, ctx)
    monkeypatch.setattr(_jit._LoadCache, "_load_light", fail_light_load)
    monkeypatch.setattr(FunctionCache, "_load_overload", numbas_load)
    cres = kernel._cache.load_overload(sig, kernel.targetctx)
    assert failures == numbas == [sig] and cres is not None and cres.signature.args == sig


def test_huffman_and_runtime_parallel_kernels_share_one_lock(tmp_path):
    """numba's workqueue threading layer aborts the process when two threads launch parallel kernels
    at once: the Huffman decoder and the runtime's parallel kernels take the same lock."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set")
    source = """
        import threading
        import numpy as np
        from dcrt.codecs import huffman
        from dcrt.runtime.numba_kernels import PARALLEL_WORK, kernels, launch
        symbols = np.random.default_rng(0).integers(0, 200, 1 << 20)
        payload, stage = huffman.encode(symbols, 200)
        k = kernels()
        idx = np.zeros((4096, PARALLEL_WORK // 4096 + 1), np.uint8)
        codebook, out = np.ones(256, np.float32), np.empty(idx.shape, np.float32)

        def decode():
            for _ in range(40):
                assert np.array_equal(huffman.decode(payload, stage), symbols)

        def expand():
            for _ in range(40):
                launch(k, "expand", idx.size, idx, codebook, out)
        threads = [threading.Thread(target=decode), threading.Thread(target=expand)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("ok")
    """
    assert fresh_python(tmp_path, source, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2") == "ok"


def test_numba_disable_jit_means_the_numpy_kernels(dcm_path, tmp_path):
    """With ``NUMBA_DISABLE_JIT=1`` numba gives plain Python functions: dcrt runs its numpy kernels, with
    the result ``DCRT_NO_NUMBA=1`` gives (it failed, looking for compiled kernels that were not)."""
    pytest.importorskip("numba")
    source = f"""
        import sys
        import numpy as np
        import dcrt
        from dcrt.codecs.raw import numba_kernels
        from dcrt.runtime.numba_kernels import kernels
        assert kernels() is None and numba_kernels() is None
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        np.save(sys.argv[1], dcrt.Session({str(dcm_path("resnet18_tiny"))!r}).run(x))
    """
    outs = []
    for flag in ("NUMBA_DISABLE_JIT", "DCRT_NO_NUMBA"):
        out = tmp_path / f"{flag}.npy"
        fresh_python(tmp_path, source, out, **{flag: "1"})
        outs.append(np.load(out))
    np.testing.assert_array_equal(*outs)


def weights(shape, density, seed=0, centroids=31):
    """The same random pruned weight as dense float32, IndexedWeight and SparseWeight (CSR)."""
    codebook, symbols = random_weight(shape, density, seed, centroids)
    book = np.concatenate([[0], codebook]).astype(np.float32)
    dense = book[symbols]
    entries = sparse.encode_csc(symbols.reshape(shape[0], -1), 4)
    return dense, IndexedWeight(book, symbols), SparseWeight.from_entries(codebook, *entries, shape)


@pytest.mark.parametrize("batch", [1, 2, 4, 5, 12, 40, 64])   # 16-lane registers: 1, 3 and 4 of them
@pytest.mark.parametrize("epilogue", [False, True])
def test_fc_kernels_agree(batch, epilogue, monkeypatch):
    dense, iw, sw = weights((37, 70), 0.3, seed=batch)
    x = rand(batch, 70)
    x[0, ::3] = 0                                   # the scatter kernels skip zero activations
    xt = rand(batch, 37)
    bias_t, bias = (rand(37), rand(70)) if epilogue else (None, None)
    clamp = (-0.5, 1.5) if epilogue else None
    for w in (iw, sw):
        got, twin = both(lambda: (kernels.matmul_t(x, w, bias_t, clamp), kernels.matmul(xt, w, bias, clamp)),
                         monkeypatch)
        ref_t, ref = x @ dense.T, xt @ dense
        if epilogue:
            ref_t, ref = np.clip(ref_t + bias_t, *clamp), np.clip(ref + bias, *clamp)
        for g, t, r in zip(got, twin, (ref_t, ref)):
            np.testing.assert_allclose(g, t, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zeros", [0, 19, 20, 60])
@pytest.mark.parametrize("epilogue", [False, True])
def test_dual_kernel_agrees(zeros, epilogue, monkeypatch):
    """A Gemm weight held both ways (``ByInput`` with ``TableRows``): one row of activations with under
    a quarter zeros goes by rows from the product table, equal bit for bit to the dot products by rows
    (the same products summed in the same order); one with more goes by input, equal bit for bit to
    the scatter. Both agree with the numpy twin (by input) and with the dense product, through
    ``matmul_t`` and through a prepared runner alike. 80 inputs: 19 zeros go by rows, 20 by input."""
    codebook, symbols = random_weight((37, 80), 0.3, seed=zeros)
    entries = sparse.encode_csc(symbols, 4)
    rows = SparseWeight.from_entries(codebook, *entries, (37, 80))
    w = indexed.ByInput(SparseWeight.transpose_from_entries(codebook, *entries, (37, 80)), indexed.TableRows(rows))
    dense = np.concatenate([[0], codebook]).astype(np.float32)[symbols]
    x = rand(1, 80) + 5                                 # no zeros but those set here
    x[0, RNG.permutation(80)[:zeros]] = 0
    bias, clamp = (rand(37), (-1.0, 2.0)) if epilogue else (None, None)
    got, twin = both(lambda: w.matmul_t(x, bias, clamp), monkeypatch)
    ran = w.product_runner(x, True, clamp)(x, w, bias)
    same_path = rows.matmul_t(x, bias, clamp) if 4 * zeros < 80 else w.inner.matmul(x, bias, clamp)
    np.testing.assert_array_equal(got, same_path)
    np.testing.assert_array_equal(ran, got)
    want = x @ dense.T + (0 if bias is None else bias)
    want = want if clamp is None else np.clip(want, *clamp)
    for y in (got, twin):
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


def test_table_rows_refuse_a_table_too_large():
    """``TableRows`` slots are uint16: a codebook and width past ``PRODUCT_TABLE_ENTRIES`` products
    (file stats that disagree with the tensor) is a FormatError, not wrapped slots."""
    codebook, symbols = random_weight((4, 3000), 0.5, centroids=30)
    with pytest.raises(FormatError, match="product table over 65536 entries"):
        indexed.TableRows(SparseWeight.from_entries(codebook, *sparse.encode_csc(symbols, 4), (4, 3000)))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("epilogue", [False, True])
def test_table_rows_products_agree(batch, epilogue, monkeypatch):
    """A weight held only as product-table slots (a recurrent ``R``, ``dcrt.memory.SLOTS``): ``x @ W.T``
    by ``slot_matmul_t`` (a table per row of ``x``) and by its numpy twin, whole and for a slice of
    rows (the GRU's step loop takes ``R[:2H]``), against the dense product; an empty row gives 0.
    The slots give back the CSR they were made of, and ``x @ W`` goes through it."""
    codebook, symbols = random_weight((37, 70), 0.4, seed=batch)
    symbols[5] = 0                                          # a row with no kept weight
    rows = SparseWeight.from_entries(codebook, *sparse.encode_csc(symbols, 4), (37, 70))
    w = indexed.TableRows(rows)
    dense = np.concatenate([[0], codebook]).astype(np.float32)[symbols]
    x, xt = rand(batch, 70), rand(batch, 37)
    bias, clamp = (rand(37), (-0.5, 1.5)) if epilogue else (None, None)
    part = w[3:20]
    got, twin = both(lambda: (w.matmul_t(x, bias, clamp), part.matmul_t(x), w.matmul(xt)), monkeypatch)
    want = x @ dense.T + (0 if bias is None else bias)
    want = want if clamp is None else np.clip(want, *clamp)
    for y in (got, twin):
        np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(y[1], x @ dense[3:20].T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(y[2], xt @ dense, rtol=1e-5, atol=1e-4)
    back = w.sparse()
    for a, b in zip(back.arrays, rows.arrays):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(part.dense(), dense[3:20])
    strided = np.zeros((17, 140), np.float32)[:, ::2]           # a tile into a view that is not contiguous
    np.testing.assert_array_equal(w.expand_rows(3, 20, strided), dense[3:20])
    assert w.nnz == np.count_nonzero(symbols) and part.shape == (17, 70)
    with pytest.raises(IndexError, match="contiguous row slices"):
        w[1]


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("transposed", [False, True])
def test_csr_from_entries_agrees(monkeypatch, bits, transposed):
    """The CSR form by rows (numba: two-pass placement; numpy: decode_csc + stable argsort) and by
    columns, the transpose's, for Gemm weights (numba: one pass; numpy: decode_csc) are the same
    arrays in both builds and expand to the weight; both refuse relative indices that run past the rows."""
    codebook, symbols = random_weight((50, 60) if transposed else (50, 3, 4, 5), 0.2, seed=7)
    entries = sparse.encode_csc(symbols.reshape(50, -1), bits)
    make = SparseWeight.transpose_from_entries if transposed else SparseWeight.from_entries
    got, twin = both(lambda: make(codebook, *entries, symbols.shape), monkeypatch)
    for name in ("row_ptr", "cols", "symbols"):
        np.testing.assert_array_equal(getattr(got, name), getattr(twin, name))
    dense = np.concatenate([[0], codebook]).astype(np.float32)[symbols]
    np.testing.assert_array_equal(got.dense(), dense.T if transposed else dense)
    assert got.cols.dtype == twin.cols.dtype == np.uint16 and got.row_ptr.dtype == twin.row_ptr.dtype == np.int32
    sym, rel, counts = entries
    too_far = (sym, rel, np.concatenate(([counts[0] + counts[1]], [0], counts[2:])))
    for off in ("0", "1"):
        no_numba(monkeypatch, off)
        with pytest.raises(FormatError, match="run past"):
            make(codebook, *too_far, symbols.shape)


def test_codebook_sums_agree_with_dot_products():
    """The paper's per-centroid sums compute what the dot products compute."""
    k = numba_kernels.kernels()
    if k is None:
        pytest.skip("numba off")
    _, iw, sw = weights((40, 90), 0.2, centroids=200)
    x = rand(2, 90)
    none = np.zeros(0, np.float32)
    for dot, bins, args in [(k.index_matmul_t, k.index_matmul_t_bins, (iw.indices, iw.codebook)),
                            (k.csr_matmul_t, k.csr_matmul_t_bins, (sw.row_ptr, sw.cols, sw.symbols, sw.codebook))]:
        a, b = np.empty((2, 40), np.float32), np.empty((2, 40), np.float32)
        dot(x, *args, none, -np.inf, np.inf, False, a)
        bins(x, *args, b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tiles_expand_and_lmatmul(monkeypatch):
    """Row and column tiles, one tile at a time (numba expand vs numpy take), and W @ x both ways."""
    monkeypatch.setattr(indexed, "TILE_FLOOR", 0)    # weights this small are otherwise one tile
    dense, iw, sw = weights((24, 144), 0.5)          # wider than tall: column tiles
    dense2, iw2, sw2 = weights((144, 24), 0.5, seed=1)  # taller than wide: row tiles
    x, x2 = rand(3, 144, 50), rand(24, 60)
    for w, d, v in ((iw, dense, x), (sw, dense, x), (iw2, dense2, x2), (sw2, dense2, x2)):
        got, twin = both(lambda: (w.lmatmul(v), w.expand_rows(3, 9), w.tile_rows()), monkeypatch)
        np.testing.assert_allclose(got[0], d @ v, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(twin[0], d @ v, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got[1], d[3:9])
        np.testing.assert_array_equal(twin[1], d[3:9])
        assert 1 <= twin[2] <= got[2] <= w.shape[0] // indexed.TILE_FRACTION   # numpy's tiles: a third
    np.testing.assert_array_equal(iw.expand_cols(5, 40), dense[:, 5:40])


@pytest.mark.parametrize("columns", [1, 2, 3, 4, 5])
def test_lmatmul_of_few_columns(columns, monkeypatch):
    """``W @ x`` with a few columns (a convolution on a map of 1-4 positions) through ``matmul_t``'s
    compiled dot products where they pay (dense indices: 1-2 columns, 3-4 for a weight of at most
    256 KB as float32; CSR: up to 4), else by tiles; the same result either way and as the twin's."""
    tiled = []
    by_tiles = indexed._tiled_lmatmul
    monkeypatch.setattr(indexed, "_tiled_lmatmul", lambda w, x, out: tiled.append(w) or by_tiles(w, x, out))
    for shape in [(64, 576), (300, 900)]:           # 147 KB and 1.08 MB as float32
        dense, iw, sw = weights(shape, 0.3)
        x = rand(shape[1], columns)
        expected = dense @ x
        for w, by_rows in ((iw, columns <= 2 or (columns <= 4 and dense.nbytes <= 256 << 10)),
                           (sw, columns <= 4)):
            def call():
                out = np.full((shape[0], columns), np.nan, np.float32)
                into = w.lmatmul(x, out=out)
                return w.lmatmul(x), into, into is out, len(tiled)
            tiled.clear()
            got, twin = both(call, monkeypatch)
            for y in got[:2] + twin[:2]:
                assert y.flags.c_contiguous
                np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
            assert got[2] and twin[2]
            assert got[3] == (0 if by_rows else 2) and twin[3] - got[3] == 2, (shape, columns, got[3], twin[3])


def test_only_small_weights_expand_whole():
    """A tile holds at most a quarter of its weight, or ``TILE_FLOOR`` (64 KB) of float32 when that is
    more: a weight of at most 64 KB is one tile, which the conv runners take as an array for the call;
    a larger weight is never expanded whole (checked by measurement in the tests below). Without numba
    the tiles are 4/5 of that (``indexed._tile_rows`` counts the intp ``take`` builds)."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: numpy's tiles are smaller")
    for shape in [(64, 256), (8, 4, 3, 3), (96, 1, 3, 3), (65, 256), (129, 128, 3, 3), (512, 256, 3, 3)]:
        dense, iw, sw = weights(shape, 0.5)
        small = dense.nbytes <= 64 << 10       # the documented bound, not whatever the constant says
        for w in (iw, sw):
            rows = w.reshape(shape[0], -1).tile_rows()
            assert (rows >= shape[0]) == small, (shape, rows)
            assert rows * dense[0].nbytes <= max(dense.nbytes // 4, 64 << 10)
            assert (kernels._as_array(w) is not None) == small, shape
            if small:
                np.testing.assert_array_equal(kernels._as_array(w)(w), dense)


CONVS = [  # x shape, w shape, strides, dilations, pads, group
    ((2, 3, 11, 12), (4, 3, 3, 3), [1, 1], [1, 1], [1, 1, 1, 1], 1),   # rows as wide as x's: flat copies
    ((1, 3, 9, 10), (4, 3, 3, 3), [1, 1], [1, 1], [2, 2, 0, 0], 1),     # ... pads on one side only
    ((1, 2, 2, 6), (3, 2, 5, 3), [1, 1], [1, 1], [2, 1, 2, 1], 1),      # ... taps whose rows all lie in the pads
    ((1, 4, 9, 10), (6, 4, 3, 2), [2, 3], [1, 1], [0, 1, 2, 1], 1),
    ((1, 4, 13, 13), (4, 2, 3, 3), [1, 1], [2, 2], [2, 2, 2, 2], 2),
    ((2, 8, 7, 7), (16, 8, 1, 1), [1, 1], [1, 1], [0, 0, 0, 0], 1),      # pointwise: x is the im2col
    ((3, 8, 12, 12), (16, 8, 1, 1), [1, 1], [1, 1], [0, 0, 0, 0], 1),    # ... one product per sample
    ((1, 8, 9, 9), (8, 8, 1, 1), [2, 2], [1, 1], [0, 0, 0, 0], 1),
    ((2, 3, 17), (4, 3, 5), [3], [1], [2, 1], 1),                        # 1-D
    ((1, 2, 5, 6, 7), (3, 2, 2, 3, 2), [1, 1, 1], [1, 1, 1], [1, 0, 1, 0, 1, 1], 1),  # 3-D (numpy only)
]
DEPTHWISE = [  # channels, size, stride, multiplier, kernel, dilation, pads
    (6, 17, 1, 1, 3, 1, [1, 1, 1, 1]),         # 3x3 pad 1 past 256 positions: the flat plane loop
    (6, 3, 1, 2, 3, 1, [1, 1, 1, 1]),          # ... on its smallest plane (a multiplier: not channels-last)
    (40, 7, 1, 1, 3, 1, [1, 1, 1, 1]),         # 3x3 pad 1 on 7x7: channels-last
    (6, 3, 1, 1, 3, 1, [1, 1, 1, 1]),          # ... on a 3x3 plane
    (6, 34, 2, 1, 3, 1, [1, 1, 1, 1]),         # 3x3 pad 1, stride 2: split columns
    (5, 35, 2, 1, 3, 1, [1, 1, 1, 1]),         # ... odd size: the last window reaches the padding
    (3, 18, 2, 2, 3, 1, [1, 1, 1, 1]),         # ... depth multiplier
    (4, 50, 3, 1, 3, 1, [1, 1, 1, 1]),         # 3x3 pad 1, stride 3: one-pass rows
    (24, 14, 1, 1, 3, 1, [1, 1, 1, 1]),        # 3x3 pad 1 on 14x14: channels-last
    (9, 16, 1, 1, 3, 1, [1, 1, 1, 1]),         # ... on 16x16 (256 positions, the last that is)
    (5, 2, 1, 2, 3, 1, [1, 1, 1, 1]),          # two rows: one-pass rows
    (40, 14, 2, 1, 3, 1, [1, 1, 1, 1]),        # strided, small map: channels-last, nine taps unrolled
    (21, 13, 2, 1, 3, 1, [1, 1, 1, 1]),        # ... channels and positions not multiples of 8
    (13, 9, 1, 1, 3, 2, [2, 2, 2, 2]),         # ... dilated: taps in the padding read the zero row
    (11, 10, 2, 1, 3, 1, [0, 1, 1, 0]),        # ... uneven pads
    (4, 20, 1, 1, 3, 1, [1, 2, 2, 1]),         # flat taps with saved edge columns
    (4, 19, 2, 3, 3, 1, [1, 2, 2, 1]),         # depth multiplier, row path with a stride
    (4, 23, 1, 1, 5, 2, [4, 4, 4, 4]),
    (8, 9, 3, 1, 4, 1, [0, 1, 2, 0]),
    (3, 3, 2, 2, 3, 1, [4, 5, 4, 3]),         # pads wider than the input: whole rows of windows in them
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("form", ["dense", "indexed", "sparse"])
def test_conv_kernels_agree(case, form, monkeypatch):
    xs, ws, strides, dilations, pads, group = case
    d, iw, sw = weights(ws, 0.4, seed=len(xs))
    w = {"dense": d, "indexed": iw, "sparse": sw}[form]
    x, b = rand(*xs), rand(ws[0])
    got, twin = both(lambda: kernels.conv(x, w, b, strides, dilations, pads, group, clamp=(-1.0, 2.0)), monkeypatch)
    np.testing.assert_allclose(got, twin, rtol=1e-5, atol=1e-5)
    reference = kernels.conv(x, d, b, strides, dilations, pads, group)
    np.testing.assert_allclose(got, np.clip(reference, -1.0, 2.0), rtol=1e-5, atol=1e-5)


RUNNERS = [  # x shape, w shape, strides, pads, group: the runner's own paths, then the general one
    ((1, 16, 8, 8), (24, 16, 1, 1), [1, 1], [0, 0, 0, 0], 1),      # pointwise, one sample
    ((1, 12, 9, 7), (12, 1, 3, 3), [2, 2], [1, 1, 1, 1], 12),      # depthwise
    ((1, 6, 10, 10), (12, 1, 3, 3), [1, 1], [1, 1, 1, 1], 6),      # ... depth multiplier 2
    ((1, 4, 9, 9), (8, 4, 3, 3), [2, 2], [1, 0, 1, 0], 1),         # im2col, array weights
    ((1, 4, 6, 6), (8, 4, 3, 3), [1, 1], [1, 1, 1, 1], 1),         # ... 3x3 on a map too small for Winograd
    ((2, 16, 8, 8), (24, 16, 1, 1), [1, 1], [0, 0, 0, 0], 1),      # pointwise, two samples: conv
    ((1, 4, 16, 16), (8, 4, 3, 3), [1, 1], [1, 1, 1, 1], 1),       # Winograd (its result differs from im2col's)
    ((1, 4, 9, 9), (8, 2, 3, 3), [1, 1], [0, 0, 0, 0], 2),         # grouped: conv
]


def held(w):
    """A weight as a session holds it (an array read-only: what lets a 3x3 convolution take Winograd)."""
    return constant(w) if isinstance(w, np.ndarray) else w


@pytest.mark.parametrize("case", RUNNERS, ids=lambda c: f"{c[0]}-{c[1]}-g{c[4]}")
@pytest.mark.parametrize("numba_on", [True, False])
def test_conv_runner_agrees_with_conv(case, numba_on, monkeypatch):
    """A runner prepared for a layer gives ``conv``'s result bit for bit, for every weight kind, bias or
    none, clamp or none, and again for new weights and biases of the same kind (stream mode's)."""
    if not numba_on:
        no_numba(monkeypatch)
    xs, ws, strides, pads, group = case
    x = rand(*xs)
    for form in (0, 1, 2):
        for bias in (None, rand(ws[0])):
            for clamp in (None, (-0.5, 1.5)):
                w = held(weights(ws, 0.5, seed=form)[form])
                run = kernels.conv_runner(x, w, bias, strides, [1, 1], pads, group, clamp)
                for seed in (1, 2):     # the runner holds none of them
                    w = held(weights(ws, 0.5, seed=seed + 10)[form])
                    b = None if bias is None else rand(ws[0])
                    want = kernels.conv(x, w, b, strides, [1, 1], pads, group, clamp)
                    np.testing.assert_array_equal(run(x, w, b), want)


@pytest.mark.parametrize("rows", [1, 2, 40])
@pytest.mark.parametrize("transposed", [True, False])
def test_product_runner_agrees_with_the_products(rows, transposed):
    """A Gemm's prepared product gives ``matmul_t``/``matmul``'s result bit for bit for every weight
    kind (the compiled kernels called directly where they apply), also for a new weight and bias of
    the same kind and a non-contiguous ``x``, and holds no weight."""
    shape = (37, 70) if transposed else (70, 37)
    product = kernels.matmul_t if transposed else kernels.matmul
    used = []
    for form in (0, 1, 2):
        for bias in (None, rand(37)):
            for clamp in (None, (0.0, 0.5)):
                x = rand(rows, 70)
                w = weights(shape, 0.3, seed=form)[form]
                run = kernels.product_runner(x, w, bias, clamp, transposed)
                expected = product(x, w, bias, clamp)
                np.testing.assert_array_equal(run(x, w, bias), expected)
                w2 = weights(shape, 0.3, seed=form + 5)[form]
                b2 = None if bias is None else rand(37)
                xs = rand(70, rows).T
                np.testing.assert_array_equal(run(xs, w2, b2), product(xs, w2, b2, clamp))
                used.append(weakref.ref(w))
    del w, w2
    gc.collect()
    assert not [r for r in used if r() is not None]


def test_nodes_prepare_once_and_keep_no_weight(monkeypatch):
    """Conv and Gemm keep a runner per kind of inputs in the node's attributes (input shape, weight
    kind, numba's use...): made once per kind, an alternating batch size included, the results
    ``conv``'s and ``matmul_t``'s; and no runner holds a weight: one the session drops (stream mode)
    is freed."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: the runners compared are numba's")
    from dcrt.runtime.ops import nn
    made = []

    def counted(make):
        def wrapper(*args, **kwargs):
            made.append(make.__name__)
            return make(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(kernels, "conv_runner", counted(kernels.conv_runner))
    monkeypatch.setattr(kernels, "product_runner", counted(kernels.product_runner))
    conv, gemm = OPS["Conv"], OPS["Gemm"]
    attrs, fc = {"_opset": 13, "_nout": 1}, {"_opset": 13, "_nout": 1, "transB": 1}
    d, iw, sw = weights((24, 16, 1, 1), 0.5)
    fd, fi, fs = weights((24, 16), 0.5)
    b = rand(24)
    kinds = ((rand(1, 16, 8, 8), d, fs), (rand(2, 16, 8, 8), d, fd), (rand(1, 16, 5, 5), iw, fi))
    for _ in range(2):
        for x, w, f in kinds:
            want = kernels.conv(x, w, b, [1, 1], [1, 1], [0, 0, 0, 0], 1)
            np.testing.assert_array_equal(conv(attrs, x, w, b), want)
            x2 = x[:, :, 0, 0].copy()
            np.testing.assert_array_equal(gemm(fc, x2, f, b), kernels.matmul_t(x2, f, b))
    assert made == ["conv_runner", "product_runner"] * 3
    no_numba(monkeypatch)
    np.testing.assert_array_equal(conv(attrs, x, d, b), kernels.conv(x, d, b, [1, 1], [1, 1], [0, 0, 0, 0], 1))
    np.testing.assert_array_equal(gemm(fc, x2, fs, b), kernels.matmul_t(x2, fs, b))
    assert len(made) == 8
    for i in range(nn.RUNNERS_PER_NODE + 2):        # a bounded number of runners per node
        conv(attrs, rand(1, 16, 2, 2 + i), d, b)
    assert len(attrs["_runners"]) <= nn.RUNNERS_PER_NODE
    w, f = d.copy(), fd.copy()
    dropped = weakref.ref(w), weakref.ref(f)
    conv(attrs, x, w, b)
    gemm(fc, x2, f, b)
    del w, f
    gc.collect()
    assert dropped[0]() is None and dropped[1]() is None


def test_a_node_reuses_its_last_runner_only_for_the_same_inputs():
    """A node's last runner is taken again (identity checks, ``nn._last``) only for the same weight,
    bias and clamp: a fused Relu's plan and an unfused one share the node's attributes, and a
    ``[1, N]`` bias takes Gemm's general form."""
    from dcrt.runtime.ops import nn
    attrs, fc = {"_opset": 13, "_nout": 1}, {"_opset": 13, "_nout": 1, "transB": 1}
    _, iw, _ = weights((24, 16, 1, 1), 0.5)
    fd, _, fs = weights((24, 16), 0.5)
    x, b = rand(1, 16, 5, 5), rand(24)
    x2 = x[:, :, 0, 0].copy()
    for w in (fs, fd):
        for bias, clamp in ((b, None), (b, (0.0, 0.5)), (None, (0.0, 0.5)), (None, None), (b, None), (b[None], None)):
            flat = None if bias is None else bias.ravel()
            for _ in range(2):
                np.testing.assert_array_equal(nn._gemm(fc, x2, w, bias, clamp), kernels.matmul_t(x2, w, flat, clamp))
                np.testing.assert_array_equal(nn._conv(attrs, x, iw, flat, clamp),
                                              kernels.conv(x, iw, flat, [1, 1], [1, 1], [0, 0, 0, 0], 1, clamp))


@pytest.mark.parametrize("idx", [[[3, -1, 0, 9]], 4, -10, [], [[1, 2, 3], [-3, -2, -1]]], ids=str)
def test_embedding_lookup_agrees_and_wraps(idx, monkeypatch):
    """Gather along axis 0 of every weight kind (``kernels.take_rows``; the compiled lookup for dense
    indices): negative indices count from the end, the numba kernel agrees with its numpy twin."""
    dense, iw, sw = weights((10, 3, 4), 0.5)
    idx = np.asarray(idx, np.int64)
    want = dense[np.where(idx < 0, idx + 10, idx)]
    for w in (dense, iw, sw):
        got, twin = both(lambda: kernels.take_rows(w, idx), monkeypatch)
        for y in (got, twin):
            assert y.shape == idx.shape + (3, 4) and y.dtype == np.float32
            np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("bad", [10, -11, 2**40])
def test_embedding_lookup_out_of_range_is_an_index_error(bad, monkeypatch):
    """An index outside [-rows, rows) is refused on every path (numpy's ``take`` alone would wrap -11
    into range again)."""
    dense, iw, sw = weights((10, 3, 4), 0.5)
    for w in (dense, iw, sw):
        for numba_on in (True, False):
            if not numba_on:
                no_numba(monkeypatch)
            with pytest.raises(IndexError, match=f"index {bad} is out of bounds for axis 0 with size 10"):
                kernels.take_rows(w, np.array([[0, bad]], np.int64))
            no_numba(monkeypatch, None)


@pytest.mark.parametrize("shape", [(2, 2), (3, 5, 7), (2, 256), (2, 257), (2, 1)], ids=str)
def test_softmax_kernel_agrees_with_numpy(shape, monkeypatch):
    """Softmax along the last axis: the compiled rows (inputs up to ``SOFTMAX_COMPILED`` elements)
    agree with the numpy twin, a NaN making its row NaN; an opset-11 Softmax (axis 1 over the
    flattened tail) too."""
    from dcrt.runtime.ops import nn
    x = rand(*shape) * 8
    x.reshape(-1, shape[-1])[-1, 0] = np.nan
    for attrs in ({"_opset": 13}, {"_opset": 11, "axis": 1}):
        got, twin = both(lambda: nn.softmax(attrs, x), monkeypatch)
        assert got.shape == twin.shape == x.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, twin, rtol=2e-6, atol=1e-7)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(twin))
    y = nn.softmax({"_opset": 13}, x).reshape(-1, shape[-1])
    assert np.isnan(y[-1]).all() and not np.isnan(y[:-1]).any()
    np.testing.assert_allclose(y[:-1].sum(axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize("case", DEPTHWISE, ids=str)
def test_depthwise_kernels_agree(case, monkeypatch):
    channels, size, stride, mult, k, dil, pads = case
    d, iw, _ = weights((channels * mult, 1, k, k), 0.7, seed=size)
    x, b = rand(2, channels, size, size), rand(channels * mult)
    for w in (d, iw):
        got, twin = both(lambda: kernels.conv(x, w, b, [stride, stride], [dil, dil], pads, channels, (0.0, 3.0)),
                         monkeypatch)
        np.testing.assert_allclose(got, twin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, cols", [(8, 8), (16, 24), (21, 13), (49, 960), (960, 49)], ids=str)
def test_transpose8x8_intrinsic(rows, cols):
    """The shuffled 8x8 tile transpose (``_simd.transpose8x8``) and the block transpose built on it
    (``_numba_conv._transpose``: whole tiles, then the rows and columns past a multiple of 8) move
    every value where numpy's ``.T`` puts it, from and to offsets that are not multiples of 8."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: no compiled kernels to compare")
    from numba import njit
    from dcrt.runtime._numba_conv import _transpose
    from dcrt.runtime._simd import transpose8x8

    @njit
    def tile(src, s0, s_step, dst, d0, d_step):
        transpose8x8(src, s0, s_step, dst, d0, d_step)

    @njit
    def block(src, s0, rows, cols, dst, d0):
        _transpose(src, s0, rows, cols, dst, d0)

    src = rand(3 + rows * cols)
    want = src[3:].reshape(rows, cols).T
    dst = np.full(5 + rows * cols, -1, np.float32)
    block(src, 3, rows, cols, dst, 5)
    np.testing.assert_array_equal(dst[5:].reshape(cols, rows), want)
    assert (dst[:5] == -1).all()
    # one tile: rows 1-8 of a 12x10 matrix (columns 2-9) become rows 2-9 (columns 1-8) of its transpose
    m = rand(12, 10)
    t = np.full((10, 12), -1, np.float32)
    tile(m.reshape(-1), 10 + 2, 10, t.reshape(-1), 2 * 12 + 1, 12)
    np.testing.assert_array_equal(t[2:10, 1:9], m[1:9, 2:10].T)
    t[2:10, 1:9] = -1
    assert (t == -1).all()


@pytest.mark.parametrize("cout,cin,positions", [(12, 1, 16), (7, 3, 5), (25, 33, 40), (30, 16, 49), (13, 20, 1),
                                                (14, 600, 37)])
@pytest.mark.parametrize("form", ["pointwise", "pointwise_par"])
def test_pointwise_kernel(cout, cin, positions, form):
    """The register-tiled 1x1 convolution (``_simd.pointwise_tile`` through ``_numba_conv.pointwise``):
    the product, bias, residual and clamp of numpy's twin for output channels that are not a multiple
    of the tile's 12, positions short of and past its 16 (the tail tile) and input channels in three
    chunks (``_POINTWISE_DEPTH``), with NaN kept by the clamp; nothing written past the output, and no
    residual read when none is asked for."""
    k = numba_kernels.kernels()
    if k is None:
        pytest.skip("DCRT_NO_NUMBA is set: no compiled kernels to compare")
    w, x, b, res = rand(cout, cin), rand(cin, positions), rand(cout), rand(cout, positions)
    x[0, -1] = np.nan
    packed = k.pack_pointwise(w)
    assert packed.shape == (-(-cout // 12), cin, 12) and (packed[-1, :, (cout - 1) % 12 + 1:] == 0).all()
    none, unbiased = np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    for flags, bias, residual in ((0, b, none), (1, b, none), (3, b, res), (5, b, none), (6, unbiased, res),
                                  (7, b, res)):
        out = np.full((cout + 1, positions), -7, np.float32)
        getattr(k, form)(packed, x, bias, residual, np.float32(-0.5), np.float32(1.0), flags, out[:cout])
        want = w.astype(np.float64) @ x
        want += b[:, None] if flags & 1 else 0
        want += res if flags & 2 else 0
        want = np.clip(want, -0.5, 1.0) if flags & 4 else want
        np.testing.assert_allclose(out[:cout], want, rtol=1e-5, atol=1e-4)
        assert np.isnan(out[:cout, -1]).all() and (out[cout] == -7).all()


def test_pointwise_conv_takes_the_kernel_for_constant_weights(monkeypatch):
    """A pointwise convolution of one sample by a read-only weight (and an im2col product of few rows)
    runs the ``pointwise`` kernel where ``wide_vectors`` holds (its packed weight kept while the weight
    lives) and gives what BLAS and the numpy twins give, bias, residual and clamp included; a writable
    weight, more input channels than POINTWISE_MAX_INPUTS with an input or output of more than
    POINTWISE_MAX_VALUES values, or a batch of two keep the BLAS product (a writable one also through
    a runner prepared for a constant: a weight fed as an input may change between runs)."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: kernels.conv does not take compiled kernels")
    x, d, b, res = rand(1, 20, 7, 9), rand(26, 20, 1, 1), rand(26), rand(1, 26, 7, 9)
    w = constant(d)
    args = ([1, 1], [1, 1], [0, 0, 0, 0], 1, (0.0, 6.0))
    got, twin = both(lambda: kernels.conv_runner(x, w, b, *args)(x, w, b, res), monkeypatch)
    assert derived.cached_bytes([w]) == (26 + 10) * 20 * 4 * numba_kernels.wide_vectors()
    blas = kernels.conv_runner(x, d, b, *args)(x, d, b, res)
    assert derived.cached_bytes([d]) == 0
    d2 = d * 2          # a writable weight through the runner prepared for a constant one: not kept
    np.testing.assert_allclose(kernels.conv_runner(x, w, b, *args)(x, d2, b), kernels.conv(x, d2, b, *args),
                               rtol=1e-5, atol=1e-5)
    assert derived.cached_bytes([d2]) == 0
    for other in (got, twin):
        np.testing.assert_allclose(other, blas, rtol=1e-5, atol=1e-5)
    w3, x3 = constant(rand(5, 3, 3, 3)), rand(1, 3, 9, 11)      # an im2col product (a stem) as well
    got3 = kernels.conv_runner(x3, w3, None, [2, 1], [1, 1], [1, 1, 1, 1], 1, (0.0, 6.0))(x3, w3, None)
    np.testing.assert_allclose(got3, kernels.conv(x3, w3.copy(), None, [2, 1], [1, 1], [1, 1, 1, 1], 1, (0.0, 6.0)),
                               rtol=1e-5, atol=1e-5)
    assert derived.cached_bytes([w3]) == 12 * 27 * 4 * numba_kernels.wide_vectors()
    monkeypatch.setattr(kernels, "POINTWISE_MAX_INPUTS", 19)
    u = constant(d)     # more input channels than that, but a small input and output (26 x 63 values)
    kernels.conv_runner(x, u, b, *args)(x, u, b)
    assert derived.cached_bytes([u]) == derived.cached_bytes([w])
    monkeypatch.setattr(kernels, "POINTWISE_MAX_VALUES", 26 * 63 - 1)     # the output one value more
    v, x2 = constant(d), np.concatenate([x, x])
    kernels.conv_runner(x, v, b, *args)(x, v, b)
    kernels.conv_runner(x2, v, b, *args)(x2, v, b)
    assert derived.cached_bytes([v]) == 0
    count = len(derived._KEPT)
    del w
    assert len(derived._KEPT) == count - numba_kernels.wide_vectors()


DIRECT = [  # x shape, weight shape, strides, dilations, pads (top, left, bottom, right)
    ((1, 3, 40, 38), (64, 3, 7, 7), [2, 2], [1, 1], [3, 3, 3, 3]),     # ResNet's stem: 19 columns, 16 + 3
    ((1, 3, 34, 66), (32, 3, 3, 3), [2, 2], [1, 1], [1, 1, 1, 1]),     # MobileNetV2's: 33 (2 tiles + 1)
    ((1, 5, 17, 20), (13, 5, 3, 3), [2, 1], [1, 1], [1, 1, 1, 1]),     # one output channel past a tile of 12
    ((1, 4, 20, 52), (7, 4, 5, 3), [3, 2], [2, 3], [0, 2, 1, 1]),      # strides, dilations, uneven pads
    ((1, 6, 9, 70), (25, 6, 2, 4), [1, 3], [1, 1], [2, 0, 0, 3]),      # a stride of 3 (three column planes)
    ((1, 1, 20, 20), (6, 1, 5, 5), [1, 1], [1, 1], [0, 0, 0, 0]),      # LeNet-5's first: exactly one tile
]


@pytest.mark.parametrize("case", DIRECT, ids=str)
def test_conv_tiles_read_the_input_in_place(case, monkeypatch):
    """A convolution of one sample by a constant weight, its kernel larger than 1x1, with output rows of
    16 or more runs ``conv_tiles`` (register tiles reading the input's stride-split columns in place,
    no im2col matrix) in ``conv`` and in its prepared runner alike, and agrees with the numpy twins:
    bias, residual and clamp, output channels past a tile, rows past a multiple of 16."""
    xs, ws, strides, dilations, pads = case
    x, w, b = rand(*xs), constant(rand(*ws)), rand(ws[0])
    got, twin = both(lambda: kernels.conv(x, w, b, strides, dilations, pads, 1, (-0.5, 1.0)), monkeypatch)
    np.testing.assert_allclose(got, twin, rtol=1e-5, atol=1e-5)
    res = rand(*got.shape)
    got, twin = both(lambda: kernels.conv(x, w, None, strides, dilations, pads, 1, None, res), monkeypatch)
    np.testing.assert_allclose(got, twin, rtol=1e-5, atol=1e-5)
    if not numba_kernels.wide_vectors():
        return
    k = numba_kernels.kernels()
    for name in ("im2col2d", "im2col2d_par"):       # the path builds no im2col matrix
        monkeypatch.setattr(k, name, None)
    run = kernels.conv_runner(x, w, b, strides, dilations, pads, 1, (-0.5, 1.0))
    np.testing.assert_array_equal(run(x, w, b), kernels.conv(x, w, b, strides, dilations, pads, 1, (-0.5, 1.0)))
    np.testing.assert_array_equal(run(x, w, b, res),
                                  kernels.conv(x, w, b, strides, dilations, pads, 1, (-0.5, 1.0), res))
    assert derived.cached_bytes([w]) == -(-ws[0] // 12) * 12 * int(np.prod(ws[1:])) * 4


def test_conv_tiles_keep_the_im2col_matrix_elsewhere(monkeypatch):
    """Output rows narrower than DIRECT_MIN_WIDTH, more than POINTWISE_MAX_INPUTS rows, a 1x1 kernel,
    a writable weight or two samples keep the im2col product."""
    if numba_kernels.kernels() is None or not numba_kernels.wide_vectors():
        pytest.skip("no register tiles on this machine")
    k = numba_kernels.kernels()
    calls = []
    for name in ("conv_tiles", "conv_tiles_par"):
        monkeypatch.setattr(k, name, lambda *a: calls.append(a))
    args = ([2, 1], [1, 1], [1, 1, 1, 1], 1)     # strided: not Winograd
    for x, w in ((rand(1, 4, 12, 15), constant(rand(5, 4, 3, 3))),     # 15 columns
                 (rand(1, 36, 6, 20), constant(rand(5, 36, 3, 3))),    # 324 rows
                 (rand(1, 4, 6, 20), constant(rand(5, 4, 1, 1))),      # 1x1 (strided: im2col is a subsample)
                 (rand(1, 4, 6, 20), rand(5, 4, 3, 3)),                # writable
                 (rand(2, 4, 6, 20), constant(rand(5, 4, 3, 3)))):     # two samples
        kernels.conv(x, w, None, *args)
        kernels.conv_runner(x, w, None, *args)(x, w, None)
    assert not calls
    x, w = rand(1, 4, 6, 20), constant(rand(5, 4, 3, 3))       # none of those: taken
    kernels.conv(x, w, None, *args)
    kernels.conv_runner(x, w, None, *args)(x, w, None)
    assert len(calls) == 2


def test_add_clamp_kernel_agrees(monkeypatch):
    """A residual Add with its Relu/Clip in one pass, against the numpy sum and clamp: bit for bit,
    NaN kept; other shapes (broadcasting) and dtypes take numpy."""
    a, b = rand(2, 3, 17, 19), rand(2, 3, 17, 19)
    a.flat[::29] = np.nan
    b.flat[3::31] = np.inf
    for clamp in ((0.0, np.inf), (-0.25, 0.5), (-np.inf, 6.0)):
        got, twin = both(lambda: kernels.add_clamp(a, b, clamp), monkeypatch)
        assert got.dtype == twin.dtype == np.float32
        np.testing.assert_array_equal(got, twin)
        np.testing.assert_array_equal(got, np.clip(a + b, *clamp))
    row, doubles = rand(19), a.astype(np.float64)
    np.testing.assert_array_equal(kernels.add_clamp(a, row, (0.0, 6.0)), np.clip(a + row, 0, 6))
    assert kernels.add_clamp(doubles, doubles, (0.0, 6.0)).dtype == np.float64


POOLS = [  # x shape, kernel, strides, dilations, pads (begin h, w, end h, w), ceil_mode
    ((1, 64, 112, 112), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 0),    # ResNet's stem pool
    ((2, 6, 28, 28), (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), 0),       # LeNet's
    ((2, 3, 13, 11), (3, 3), (2, 2), (1, 1), (0, 0, 0, 0), 1),       # ceil_mode: the last window is cut
    ((1, 4, 9, 10), (2, 3), (1, 3), (2, 1), (1, 2, 1, 2), 0),        # rectangular, dilated, other strides
    ((1, 2, 6, 7), (4, 2), (3, 2), (1, 3), (3, 1, 3, 2), 1),         # windows entirely in the padding
    ((1, 3, 8, 8), (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 0),
]


@pytest.mark.parametrize("case", POOLS, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}")
def test_max_pool_kernel_agrees(case, monkeypatch):
    """The numba max pool against the operator's numpy code, bit for bit: NaN wins, the padding
    never does (-inf where a window holds only padding). The first channel holds NaNs (the kernel
    does such planes again by the NaN rule), the others not (plain comparisons)."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: no compiled kernels to compare")
    shape, kernel, strides, dilations, pads, ceil = case
    x = rand(*shape)
    x[:, 0].flat[::41] = np.nan
    x.flat[5::53] = -np.inf
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations),
             "pads": list(pads), "ceil_mode": ceil, "_nout": 1, "_opset": 13}
    assert kernels.max_pool2d(x, kernel, strides, dilations, pads[:2], (1, 1)) is not None
    got, twin = both(lambda: OPS["MaxPool"](attrs, x), monkeypatch)
    assert got.shape == twin.shape and got.dtype == twin.dtype == np.float32
    np.testing.assert_array_equal(got, twin)
    assert np.isnan(got[:, 0]).any() and not np.isnan(got[:, 1:]).any()


WINOGRAD = [  # x shape, w shape, pads (3x3, unit strides: at least MIN_TILES_INDEXED 2x2 tiles a map)
    ((1, 3, 24, 24), (4, 3, 3, 3), [1, 1, 1, 1]),
    ((2, 5, 25, 21), (6, 5, 3, 3), [1, 1, 1, 1]),      # odd sizes: the edge tiles are cut
    ((1, 4, 26, 24), (3, 4, 3, 3), [0, 0, 0, 0]),
    ((1, 4, 23, 26), (5, 4, 3, 3), [2, 0, 1, 2]),      # uneven pads
]


def constant(w: np.ndarray) -> np.ndarray:
    """A read-only copy: what the session's decoded weights are, and what takes the Winograd form."""
    w = w.copy()
    w.setflags(write=False)
    return w


def winograd_both(x, w, b, pads, clamp, monkeypatch):
    """``kernels.conv`` with numba (the Winograd form where it pays), then the Winograd form's numpy
    twins, which ``kernels.conv`` does not take without numba (im2col + BLAS is faster there)."""
    compiled = kernels.conv(x, w, b, [1, 1], [1, 1], pads, 1, clamp)
    out = (x.shape[2] + pads[0] + pads[2] - 2, x.shape[3] + pads[1] + pads[3] - 2)
    no_numba(monkeypatch)
    try:
        twin = winograd.conv3x3(None, x, w, *kernels._epilogue(b, clamp), clamp is not None, pads, out,
                                kernels.IM2COL_BLOCK_BYTES)
    finally:
        no_numba(monkeypatch, None)
    return compiled, twin


@pytest.mark.parametrize("case", WINOGRAD, ids=lambda c: f"{c[0]}-{c[2]}")
@pytest.mark.parametrize("form", ["constant", "indexed", "sparse"])
def test_winograd_agrees_with_im2col(case, form, monkeypatch):
    xs, ws, pads = case
    d, iw, sw = weights(ws, 0.6, seed=xs[2])
    x, b = rand(*xs), rand(ws[0])
    reference = kernels.conv(x, d, b, [1, 1], [1, 1], pads, 1, (-1.0, 2.0))   # writable array: im2col
    w = {"constant": constant(d), "indexed": iw, "sparse": sw}[form]
    assert winograd.usable(x, w, [1, 1], [1, 1], 1) and not winograd.usable(x, d, [1, 1], [1, 1], 1)
    assert derived.cached_bytes([w]) == 0
    taken, tiles = [], winograd._weight_tiles

    def counted(*args):
        taken.append(args)
        return tiles(*args)
    monkeypatch.setattr(winograd, "_weight_tiles", counted)
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: no compiled kernels to compare")
    got, twin = winograd_both(x, w, b, pads, (-1.0, 2.0), monkeypatch)
    assert len(taken) == 2      # the Winograd form was taken, by the kernels and by their twins
    if form == "constant":      # ... and the transform kept
        assert derived.cached_bytes([w]) == 16 * ws[0] * ws[1] * 4
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(twin, reference, rtol=1e-5, atol=1e-5)


def test_winograd_weight_kernel_agrees(monkeypatch):
    w = rand(7, 5, 3, 3)
    got, twin = both(lambda: winograd.weight_transform(numba_kernels.kernels(), w), monkeypatch)
    np.testing.assert_allclose(got, twin, rtol=1e-6, atol=1e-6)
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
    np.testing.assert_allclose(got[:, 3, 2].reshape(4, 4), g @ w[3, 2] @ g.T, rtol=1e-6, atol=1e-6)


def test_winograd_blocks_and_small_maps(monkeypatch):
    """Blocks of tile rows (crossing samples) give the unblocked result; a map of fewer than
    MIN_TILES tiles keeps im2col and caches nothing; the cached form goes with its weight."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: kernels.conv does not take the Winograd form")
    x, w, b = rand(3, 4, 18, 15), constant(rand(6, 4, 3, 3)), rand(6)
    whole = kernels.conv(x, w, b, [1, 1], [1, 1], [1, 1, 1, 1], 1)
    monkeypatch.setattr(kernels, "IM2COL_BLOCK_BYTES", 16 * 4 * 8 * 6 * 2)    # two tile rows a block
    got, twin = winograd_both(x, w, b, [1, 1, 1, 1], None, monkeypatch)
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(twin, whole, rtol=1e-6, atol=1e-6)
    small = constant(rand(6, 4, 3, 3))
    kernels.conv(rand(1, 4, 9, 9), small, None, [1, 1], [1, 1], [1, 1, 1, 1], 1)     # 5x5 tiles
    assert derived.cached_bytes([small]) == 0 and derived.cached_bytes([w]) > 0
    count = len(derived._KEPT)
    del w
    assert len(derived._KEPT) == count - 1


@pytest.mark.parametrize("strides", [[1, 2], [1, 1]])   # row by row; flat copies (unit strides)
def test_im2col_blocks_match_whole(strides, monkeypatch):
    """Row blocks and sample blocks of the im2col matrix give the unblocked result."""
    x, w, b = rand(3, 3, 14, 10), rand(5, 3, 3, 3), rand(5)
    whole = kernels.conv(x, w, b, strides, [1, 1], [1, 1, 1, 1], 1)
    monkeypatch.setattr(kernels, "IM2COL_BLOCK_BYTES", 600)
    for form in (w, IndexedWeight(np.unique(w), np.searchsorted(np.unique(w), w).astype(np.uint16))):
        got, twin = both(lambda: kernels.conv(x, form, b, strides, [1, 1], [1, 1, 1, 1], 1), monkeypatch)
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(twin, whole, rtol=1e-5, atol=1e-5)


IM2COL = [  # x shape, kernel, strides, dilations, pads (top, left, bottom, right), through the tap table
    ((2, 5, 3, 3), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), True),        # small map, two samples
    ((1, 3, 14, 14), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), False),     # 196 positions: flat copies
    ((1, 2, 2, 6), (5, 3), (1, 1), (1, 1), (2, 1, 2, 1), True),         # taps whose rows all lie in the pads
    ((1, 2, 2, 130), (5, 3), (1, 1), (1, 1), (2, 1, 2, 1), False),      # ... on rows too long for the table
    ((1, 3, 19, 19), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), True),       # strided, 100 positions
    ((1, 3, 33, 33), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), False),      # strided, 289 positions: row by row
    ((1, 2, 9, 8), (3, 2), (1, 2), (2, 1), (2, 0, 1, 1), True),         # dilated, uneven pads and strides
    ((1, 2, 30, 29), (3, 2), (1, 2), (2, 1), (2, 0, 1, 1), False),
    ((1, 4, 1, 1), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), True),         # one position: only the centre tap
]


@pytest.mark.parametrize("case", IM2COL, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-d{c[3]}")
def test_im2col_paths_agree_with_numpy(case):
    """Both ways ``im2col2d`` builds the matrix (a table of tap offsets for small blocks, tap by tap
    for others) give the numpy twin's matrix exactly, whole and for a block of output rows."""
    k = numba_kernels.kernels()
    if k is None:
        pytest.skip("numba off")
    from dcrt.runtime import _numba_conv
    xs, kernel, strides, dilations, pads, table = case
    x, w = rand(*xs), np.zeros((1, xs[1]) + kernel, np.float32)
    shape = kernels._shape_of(x, w, strides, dilations, pads, 1, k)
    (oh, ow), cin = shape.out, xs[1]
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    for r0, r1 in ((0, oh), (1, max(2, oh - 1))):
        if r0 >= min(r1, oh):
            continue
        assert _numba_conv.by_taps(shape.geometry, xs[3], (r1 - r0) * ow) == table
        cols = np.full((cin * kernel[0] * kernel[1], xs[0], (r1 - r0) * ow), np.nan, np.float32)
        k.im2col2d(x, 0, 0, kernel[0], kernel[1], shape.geometry, r0, cols)
        twin = kernels._im2col_numpy(xp, 0, xs[0], 0, cin, kernel, strides, dilations, shape.out, r0, r1)
        np.testing.assert_array_equal(cols.reshape(twin.shape), twin)


def test_parallel_forms_agree(monkeypatch):
    """With every product above the parallel threshold, the ``_par`` kernels give the same results."""
    k = numba_kernels.kernels()
    if k is None:
        pytest.skip("numba off")
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one numba thread")
    dense, iw, sw = weights((64, 200), 0.3)
    x, xc = rand(1, 200), rand(2, 16, 15, 15)
    xs = np.maximum(rand(5, 64), 0)         # the scatter of several rows, zero activations skipped
    xs[:, ::4] = 0
    x5, x12 = rand(5, 200), rand(12, 200)   # sums 4 rows at a time (padded to 8), accumulator arrays
    wg, xg = rand(520, 520), rand(1, 520)   # a GEMV_BYTES weight: rows split among the threads
    wl, xl = rand(64, 1, 3, 3), rand(2, 64, 14, 14)    # depthwise, stride 2: channels-last, by channel parts
    wc = weights((16, 1, 3, 3), 0.8)[1]
    wd, bd = rand(8, 16, 3, 3), rand(8)
    wd_const = constant(wd)
    xt = rand(2, 16, 6, 6)                  # im2col through the table of tap offsets (xc: tap by tap)
    xm = rand(2, 64, 14, 14)                # max pool: planes with NaN (done again by the NaN rule) and without
    xm[:, 3].flat[::7] = np.nan

    def run():
        return (iw.matmul_t(x), sw.matmul_t(x), sw.matmul(x[:, :64]), sw.matmul(xs), iw.expand_rows(0, 16),
                sw.matmul_t(x5), sw.matmul_t(x12), iw.matmul_t(x5[:3]),
                kernels.conv(xc, wc, None, [1, 1], [1, 1], [1, 1, 1, 1], 16, (0.0, 6.0)),
                kernels.conv(xc, wd, bd, [1, 1], [1, 1], [1, 1, 1, 1], 1, (0.0, 6.0)),
                kernels.conv(xc, wd_const, bd, [1, 1], [1, 1], [1, 1, 1, 1], 1, (0.0, 6.0)),
                kernels.conv(xt, wd, bd, [1, 1], [1, 1], [1, 1, 1, 1], 1, (0.0, 6.0)),
                kernels.product_t(xg, wg),
                kernels.conv(xl, wl, None, [2, 2], [1, 1], [1, 1, 1, 1], 64, (0.0, 6.0)),
                kernels.max_pool2d(xm, [3, 3], [2, 2], [1, 1], [1, 1], (7, 7)))
    serial = run()
    monkeypatch.setattr(numba_kernels, "PARALLEL_WORK", 0)
    ran = set()     # which parallel kernels ran (each still the compiled kernel)

    def noted(name, fn):
        def call(*args):
            ran.add(name)
            return fn(*args)
        return call
    for name in [n for n in vars(k) if n.endswith("_par")]:
        monkeypatch.setattr(k, name, noted(name, getattr(k, name)))
    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        parallel = run()
    finally:
        numba.set_num_threads(threads)
    for s, p in zip(serial, parallel):
        np.testing.assert_allclose(s, p, rtol=1e-5, atol=1e-5)     # NaN only where the other has NaN
    assert {"index_matmul_t_par", "csr_matmul_t_par", "csr_matmul_par", "expand_par", "gemv_t_par",
            "depthwise2d_par", "im2col2d_par", "max_pool2d_par"} <= ran, ran


def test_index_mode_conv_never_expands_the_whole_weight():
    """A 4.7 MB (float32) conv weight in index mode, on a small map (a ResNet's last stage): the call
    allocates less than half of the weight (tiles are at most a quarter of it)."""
    dense, iw, _ = weights((512, 256, 3, 3), 0.5)
    x = rand(1, 256, 4, 4)
    for w in (iw, iw):      # the second call: kernels loaded, allocator warm
        tracemalloc.start()
        y = kernels.conv(x, w, None, [1, 1], [1, 1], [1, 1, 1, 1], 1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < dense.nbytes / 2, (peak, dense.nbytes)
    np.testing.assert_allclose(y, kernels.conv(x, dense, None, [1, 1], [1, 1], [1, 1, 1, 1], 1), rtol=1e-4, atol=1e-4)


def test_index_mode_winograd_never_expands_the_whole_weight():
    """The same weight on a 24x24 map takes the Winograd form tile by tile: besides the map's own
    arrays (its transform ``V``, one tile's products, the output) the call allocates less than half of
    the weight (an expanded tile and its transform)."""
    if numba_kernels.kernels() is None:
        pytest.skip("DCRT_NO_NUMBA is set: kernels.conv does not take the Winograd form")
    dense, iw, _ = weights((512, 256, 3, 3), 0.5)
    x = rand(1, 256, 24, 24)
    step, tiles = iw.reshape(512, -1).tile_rows() // 2, 12 * 12
    activations = 4 * (16 * 256 * tiles + 16 * step * tiles + 512 * 24 * 24)
    for w in (iw, iw):
        tracemalloc.start()
        y = kernels.conv(x, w, None, [1, 1], [1, 1], [1, 1, 1, 1], 1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak - activations < dense.nbytes / 2, (peak, activations, dense.nbytes)
    np.testing.assert_allclose(y, kernels.conv(x, dense, None, [1, 1], [1, 1], [1, 1, 1, 1], 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,n,k", [
    (1, 300, 784), (3, 300, 100), (16, 4000, 10), (4, 256, 128),     # x @ w.T as it is
    (3, 512, 64), (8, 1000, 1280), (32, 256, 256), (16, 256, 64),    # (w @ x.T).T, copied back to C order
])
def test_product_t_orientations_agree(rows, n, k):
    """``product_t`` gives ``x @ w.T`` in either orientation it picks, C-ordered, into ``out`` too."""
    x, w = rand(rows, k), rand(n, k)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    y = kernels.product_t(x, w)
    assert y.shape == (rows, n) and y.flags.c_contiguous
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3)
    out = np.full((rows, n + 1), np.nan, np.float32)
    kernels.product_t(x, w, out=out[:, 1:])
    np.testing.assert_array_equal(out[:, 1:], y)
    assert np.isnan(out[:, 0]).all()


@pytest.mark.parametrize("n,k", [(520, 520), (1000, 263)])
def test_gemv_kernel_agrees(n, k, monkeypatch):
    """One row by a float32 weight of GEMV_BYTES or more: numba's ``gemv_t`` against numpy's BLAS
    call, its twin, into ``out`` too; an inf or a NaN in the row goes through as in BLAS (the
    kernel's sums are reassociated, not "no NaN"); a smaller weight stays with BLAS."""
    w, x = rand(n, k), rand(1, k)
    assert w.nbytes >= kernels.GEMV_BYTES
    with_inf, with_nan = x.copy(), x.copy()
    with_inf[0, 5] = np.inf
    with_nan[0, k - 1] = np.nan
    calls = []
    compiled = numba_kernels.kernels()
    if compiled is not None:
        real = compiled.gemv_t
        monkeypatch.setattr(compiled, "gemv_t", lambda *a: calls.append(a[0].shape) or real(*a))

    def run():
        out = np.full((1, n + 1), -1.0, np.float32)
        kernels.product_t(x, w, out=out[:, 1:])
        kernels.product_t(x[:, :100], w[:, :100].copy())     # 0.2-0.4 MB: BLAS
        return kernels.product_t(x, w), out, kernels.product_t(with_inf, w), kernels.product_t(with_nan, w)
    (y, out, inf, nan), (y_np, out_np, inf_np, nan_np) = both(run, monkeypatch)
    assert calls == [(n, k)] * 4
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[:, 1:], y)
    assert out[0, 0] == -1 and out_np[0, 0] == -1
    np.testing.assert_array_equal(inf, inf_np)          # +-inf by the sign of w[:, 5]
    assert np.isinf(inf).all() and np.isnan(nan).all() and np.isnan(nan_np).all()


def test_short_products_warm_their_weight_in_place(monkeypatch):
    """``lmatmul`` reads a mid-sized weight once before a short product (a 1x1 convolution on a 7x7
    map): where it is, without a copy (a copy would cost what the warm-up saves, and the memory),
    and only then; the product is unchanged."""
    w, x = rand(576, 160), rand(160, 49)
    assert kernels.WARM_BYTES[0] <= w.nbytes <= kernels.WARM_BYTES[1] and x.shape[1] <= kernels.WARM_COLUMNS
    warmed = []
    real = kernels._warm

    def spy(a):
        tracemalloc.start()
        real(a)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        warmed.append((a, peak))
    monkeypatch.setattr(kernels, "_warm", spy)
    np.testing.assert_array_equal(kernels.lmatmul(w, x), np.matmul(w, x))
    assert len(warmed) == 1 and warmed[0][0] is w and warmed[0][1] < 4096
    for small_or_long in ((rand(16, 96), x[:96]), (w, rand(160, 257)), (rand(2000, 400), rand(400, 49))):
        kernels.lmatmul(*small_or_long)
    assert len(warmed) == 1


def test_lstm_activations_are_within_their_bound():
    """The LSTM kernels' rational tanh and the sigmoid made from it, against float64, on [-10, 10]
    (benchmarks/fit_tanh.py states the bound); inf and NaN as tanh and the logistic function give."""
    if numba_kernels.kernels() is None:
        pytest.skip("numba off")
    from dcrt.runtime import _numba_rnn
    xs = np.linspace(-10, 10, 4001).astype(np.float32)
    tanh = np.array([_numba_rnn._tanh(v) for v in xs], np.float64)
    sigmoid = np.array([_numba_rnn._sigmoid(v) for v in xs], np.float64)
    assert np.abs(tanh - np.tanh(xs.astype(np.float64))).max() < 5e-7
    assert np.abs(sigmoid - 1 / (1 + np.exp(-xs.astype(np.float64)))).max() < 3e-7
    assert abs(_numba_rnn._tanh(np.float32(np.inf)) - 1) < 1e-6 and abs(_numba_rnn._sigmoid(np.float32(-np.inf))) < 1e-6
    assert np.isnan(_numba_rnn._tanh(np.float32(np.nan))) and np.isnan(_numba_rnn._sigmoid(np.float32(np.nan)))


def _lstm_graph(direction, hidden, peepholes, attrs, r, batch=3):
    dirs = 2 if direction == "bidirectional" else 1
    names = ["x", "w", "r", "b", "", "h0", "c0", "p" if peepholes else ""]
    node = Node("LSTM", names, ["y", "yh", "yc"], dict(hidden_size=hidden, direction=direction, **attrs))
    inits = {"w": rand(dirs, 4 * hidden, 5), "b": rand(dirs, 8 * hidden) * 0.1, "r": r}
    feeds = {"x": rand(6, batch, 5), "h0": rand(dirs, batch, hidden), "c0": rand(dirs, batch, hidden)}
    if peepholes:
        inits["p"] = rand(dirs, 3 * hidden)
    graph = Graph([node], [ValueInfo(n, np.float32) for n in feeds],
                  [ValueInfo(o, np.float32) for o in ("y", "yh", "yc")], inits)
    return graph, feeds


def _r_forms(shape, seed):
    """A pruned recurrent weight as dense float32 and in each form index mode holds one."""
    d, iw, sw = weights(shape, 0.5, seed=seed)
    return d, {"dense": d, "indexed": iw, "sparse": sw,
               "slots": indexed.PerDirection([indexed.TableRows(sw[k]) for k in range(shape[0])])}


_RNN_KERNELS = {"dense": "_dense", "indexed": "_index", "sparse": "_csr", "slots": "_slots"}


def _tiled(kind, form, batch):
    """Whether a batch of ``batch`` entries takes ``lstm_tiled`` / ``gru_tiled`` (``ops/rnn._tiled``):
    with AVX-512, from two entries (a float32 R from three), but for an LSTM's CSR R."""
    return (numba_kernels.wide_vectors() and batch >= 2 and (form != "dense" or batch > 2)
            and not (kind == "lstm" and form == "sparse"))


def _count_runs(name, monkeypatch):
    """The calls of compiled kernel ``name`` (appended to the list returned) while the test runs."""
    ran = []
    kern = numba_kernels.kernels()
    if kern is not None:
        real = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a: (ran.append(name), real(*a))[1])
    return ran


@pytest.mark.parametrize("direction,peepholes,attrs", [
    ("forward", False, {}),
    ("bidirectional", True, {}),
    ("reverse", False, {"clip": 0.7, "input_forget": 1}),
])
@pytest.mark.parametrize("form", ["dense", "indexed", "sparse", "slots"])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_lstm_kernels_agree(direction, peepholes, attrs, form, batch, monkeypatch):
    """The compiled recurrence (batch 1: one entry's dot products, with AVX-512 CSR and table slots
    as 32-row slices; batches: with AVX-512 R expanded for the call and register tiles (``_tiled``),
    else each row of R expanded once for the whole batch, slots a product table per step and entry at
    two; a CSR R the lane sums) against the numpy step loop and the reference of the dense weight."""
    hidden = 7
    dirs = 2 if direction == "bidirectional" else 1
    d, forms = _r_forms((dirs, 4 * hidden, hidden), seed=3)
    graph, feeds = _lstm_graph(direction, hidden, peepholes, attrs, d, batch)
    ex = Executor(graph)
    sliced = form in ("sparse", "slots") and batch == 1 and numba_kernels.wide_vectors()     # R as SlicedRows
    # held per direction, as a session holds it (a 3-D CSR cuts a new one out at every call)
    r = indexed.PerDirection.split(forms[form]) if form == "sparse" and batch == 1 else forms[form]
    source = {**graph.initializers, "r": indexed.hold(r)}
    ran = _count_runs("lstm_sliced" if sliced else "lstm_tiled" if _tiled("lstm", form, batch)
                      else "lstm" + _RNN_KERNELS[form], monkeypatch)
    got, twin = both(lambda: ex.run(feeds, source.__getitem__), monkeypatch)
    assert len(ran) == dirs         # the kernel ran, once per direction (and not for the twin)
    reference = ex.run(feeds)
    for name in ("y", "yh", "yc"):
        np.testing.assert_allclose(got[name], twin[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
def test_lstm_prepared_call_takes_each_calls_weights(monkeypatch):
    """A node's second plain call (one forward direction, no states, lengths or peepholes) runs the
    prepared projection and kernel: the same outputs as the full operator, with the weights of that
    call (another R, a dense or an indexed one, or another B give their own results), and a new input
    shape or initial state goes the full way."""
    lstm = OPS["LSTM"]
    hidden = 8
    d, forms = _r_forms((1, 4 * hidden, hidden), seed=9)
    w, b, x = rand(1, 4 * hidden, 5), rand(1, 8 * hidden), rand(6, 1, 5)

    def full(*args, **kw):
        return lstm({"hidden_size": hidden}, *args, **kw)
    attrs = {"hidden_size": hidden}
    first = lstm(attrs, x, w, forms["sparse"], b)
    assert "_plain" in attrs
    from dcrt.runtime.ops import rnn
    with monkeypatch.context() as m:        # the prepared call builds no _Recurrence
        m.setattr(rnn, "_Recurrence", None)
        again = lstm(attrs, x, w, forms["sparse"], b)
    for g, e in zip(again, first):          # the CSR kernel, then (with AVX-512) the slices
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    for r, bias in ((forms["sparse"], b), (forms["dense"], b), (forms["indexed"], b), (d * 0.5, b), (d, b * 2)):
        got, want = lstm(attrs, x, w, r, bias), full(x, w, r, bias)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(g, e)
    x2 = rand(4, 3, 5)
    for g, e in zip(lstm(attrs, x2, w, d, b), full(x2, w, d, b)):
        np.testing.assert_array_equal(g, e)
    h0 = rand(1, 1, hidden)
    for g, e in zip(lstm(attrs, x, w, d, b, None, h0), full(x, w, d, b, None, h0)):
        np.testing.assert_array_equal(g, e)


def test_lstm_csr_kernel_takes_batches_past_one_pass(monkeypatch):
    """70 entries are two passes over each row of R (64 + 6 rows of h in 16-lane registers): the
    compiled recurrence against the numpy step loop and the dense weight's reference."""
    hidden = 6
    d, forms = _r_forms((1, 4 * hidden, hidden), seed=5)
    graph, feeds = _lstm_graph("forward", hidden, False, {}, d, batch=70)
    ex = Executor(graph)
    ran = _count_runs("lstm_csr", monkeypatch)
    got, twin = both(lambda: ex.run(feeds, {**graph.initializers, "r": forms["sparse"]}.__getitem__), monkeypatch)
    assert len(ran) == 1
    reference = ex.run(feeds)
    for name in ("y", "yh", "yc"):
        np.testing.assert_allclose(got[name], twin[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,density", [((512, 128), 0.1), ((37, 50), 0.3), ((16, 9), 0.0), ((5, 300), 0.6)])
def test_sliced_rows_hold_the_csr_weights(shape, density):
    """``SlicedRows`` (32-row slices of a CSR weight in blocks of 31 columns) holds the same weights in
    the same rows, pads each block only up to its slice's longest row there, with the zero symbol at
    the column after the block's and sorts alike rows together (fewer slots than the rows' own
    order), the lanes past the rows writing past them; built a few rows at a time, and from table
    slots the same."""
    dense, _, sw = weights(shape, density, seed=shape[0])
    rows = sw.sliced()
    np.testing.assert_array_equal(rows.dense(), dense)
    lanes, block = rows.ROWS, rows.BLOCK
    slices, blocks = -(-shape[0] // lanes), -(-shape[1] // block)
    assert len(rows.slot_ptr) == slices * blocks + 1

    def slots(order):
        counts = np.zeros((slices * lanes, blocks), np.intp)
        for lane, r in enumerate(order):
            np.add.at(counts[lane], sw.cols[sw.row_ptr[r]:sw.row_ptr[r + 1]] // block, 1)
        return counts.reshape(slices, lanes, blocks).max(axis=1).ravel()
    np.testing.assert_array_equal(rows.order[shape[0]:], np.arange(shape[0], slices * lanes))   # padding lanes
    np.testing.assert_array_equal(np.diff(rows.slot_ptr), slots(rows.order[:shape[0]]))
    padding = rows.symbols == 0
    assert padding.sum() == rows.slot_ptr[-1] * lanes - sw.nnz and np.all(rows.cols[padding] == block)
    if shape[0] == 512:
        assert rows.slot_ptr[-1] < 0.9 * slots(range(shape[0])).sum()
        assert rows.BUILD_ENTRIES < sw.nnz / 2                  # several blocks of rows
    if density:
        table = indexed.TableRows(sw).sliced()
        for got, want in zip(table.arrays, rows.arrays):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("form", ["csr", "slots"])
def test_sliced_rows_are_built_for_a_held_weight(form):
    """A CSR or table-slot weight's slices are built at the first request of a weight held across
    runs (``indexed.hold``: a session's index-mode weights) and kept, counted in its bytes; one built
    for a single node (stream mode) does not pay for building them."""
    dense, _, sw = weights((40, 30), 0.2, seed=3)
    weight = sw if form == "csr" else indexed.TableRows(sw)
    before = weight.nbytes
    assert weight.held_slices() is None and weight.nbytes == before
    indexed.hold(indexed.PerDirection([weight]))
    rows = weight.held_slices()
    assert isinstance(rows, indexed.SlicedRows) and weight.held_slices() is rows
    assert weight.nbytes == before + rows.nbytes
    np.testing.assert_array_equal(rows.dense(), dense)
    pair = weight.held_slices(24)       # rows [0, 24) and [24, 40) apart (a GRU's, the reset before R)
    assert weight.held_slices(24) is pair and weight.nbytes == before + rows.nbytes + sum(p.nbytes for p in pair)
    np.testing.assert_array_equal(np.concatenate([p.dense() for p in pair]), dense)


def test_sliced_rows_stay_within_a_product_table():
    """Slices whose slots' centroids (the kernel's float32 temporary for a call) would take more than
    a batch-1 product may build for a call (a tile, or a product table: 256 KB) are not kept for the
    kernels: a 1024x512 weight 60 % pruned (~1 MB), while 512x128 ones 60 and 90 % pruned (~128 and
    ~44 KB) get them."""
    for shape, density, fits in (((1024, 512), 0.4, False), ((512, 128), 0.4, True), ((512, 128), 0.1, True)):
        _, _, sw = weights(shape, density, seed=5)
        before = sw.nbytes
        indexed.hold(indexed.PerDirection([sw]))
        assert [sw.held_slices() is not None for _ in range(3)] == [fits] * 3
        assert (sw.nbytes > before) == fits
        assert (4 * sw.sliced().symbols.size <= 4 * indexed.PRODUCT_TABLE_ENTRIES) == fits


def _sliced_product(x, rows):
    """``x @ W.T`` for a 1-D ``x`` through ``_simd.sliced_dot`` (a compiled loop over the slices)."""
    from dcrt.runtime._simd import BLOCK, SLICE, TABLE, sliced_dot
    from numba import njit

    @njit
    def run(x, slot_ptr, cols, symbols, order, codebook, out):
        blocks = -(-x.size // BLOCK)
        slices = (slot_ptr.size - 1) // blocks
        table = np.zeros(blocks * TABLE, np.float32)
        values = codebook[symbols]
        for j in range(x.size):
            table[j + j // BLOCK] = x[j]
        for s in range(slices):
            sliced_dot(table, slot_ptr, cols, values, s * blocks, blocks, order, s * SLICE, out)
    out = np.full(rows.order.size, np.nan, np.float32)
    run(x, *rows.arrays, out)
    assert not out[rows.shape[0]:].any()      # the padding lanes' zeros, past the rows
    return out[:rows.shape[0]]



@pytest.mark.parametrize("form", ["sparse", "slots", "indexed", "sparse rows", "slots rows"])
def test_step_product_is_the_weights_product(form):
    """The numpy step loops' batch-1 product (``indexed.step_product``: a call's kept weights looked
    up once, or dense indices expanded once) equals ``h @ R.T`` of the dense weight, empty rows and
    a row slice (the GRU's ``R_zr``) included; a weight whose call temporary would exceed a product
    table's bound is left to ``kernels.matmul_t`` (None)."""
    codebook, symbols = random_weight((60, 20), 0.5, seed=11)
    symbols[7], symbols[40:43] = 0, 0
    book = np.concatenate([[0], codebook]).astype(np.float32)
    sw = SparseWeight.from_entries(codebook, *sparse.encode_csc(symbols, 4), (60, 20))
    weight = {"sparse": sw, "slots": indexed.TableRows(sw), "indexed": IndexedWeight(book, symbols),
              "sparse rows": sw[10:50], "slots rows": indexed.TableRows(sw)[10:50]}[form]
    rows = slice(10, 50) if form.endswith("rows") else slice(None)
    h = rand(1, 20)
    np.testing.assert_allclose(indexed.step_product(weight)(h), h @ book[symbols][rows].T, rtol=1e-5, atol=1e-5)
    _, big_i, big = weights((1024, 512), 0.6, seed=1)
    assert indexed.step_product(big) is None and indexed.step_product(big_i) is None

@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
def test_sliced_dot_reads_the_kept_weights_only():
    """One vector multiply-add per slot of 16 rows equals the CSR product (three blocks of columns);
    an inf activation reaches only the rows that keep a weight for it (padding lanes read the zero
    after their block's activations)."""
    dense, _, sw = weights((45, 70), 0.2, seed=8)
    rows = sw.sliced()
    x = rand(70)
    np.testing.assert_allclose(_sliced_product(x, rows), x.astype(np.float64) @ dense.T, rtol=1e-5, atol=1e-5)
    for column in (0, 40, 62):     # a block's first column, one inside, the last block's first
        x = rand(70)
        x[column] = np.inf
        got = _sliced_product(x, rows)
        uses = dense[:, column] != 0
        assert 0 < uses.sum() < 45 and np.all(np.isinf(got[uses])) and np.all(np.isfinite(got[~uses]))


@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_centroids_intrinsic_looks_up_every_value(dtype):
    """``_simd.centroids`` (the sliced kernels' centroids of a call: 16 lanes a gather, the rest one
    by one) gives ``codebook[symbols]`` for every length, and writes nothing past ``values``."""
    from numba import njit
    from dcrt.runtime._simd import centroids

    @njit
    def lookup(codebook, symbols, values):
        centroids(codebook, symbols, values)

    rng = np.random.default_rng(7)
    codebook = rng.standard_normal(300 if dtype == np.uint16 else 256).astype(np.float32)
    for size in (0, 5, 16, 37, 64):
        symbols = rng.integers(0, codebook.size, size + 3).astype(dtype)
        values = np.full(size + 3, np.nan, np.float32)
        lookup(codebook, symbols, values[:size])
        np.testing.assert_array_equal(values[:size], codebook[symbols[:size]])
        assert np.isnan(values[size:]).all()


@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
@pytest.mark.parametrize("columns,dtype", [(5, np.uint8), (16, np.uint8), (37, np.uint8), (37, np.uint16)])
@pytest.mark.parametrize("steps", [1, 16, 17, 80])
def test_index_lane_sums_agree_with_the_expanded_weight(columns, dtype, steps):
    """``index_lane_sums`` (the recurrent kernels' input projection by dense indices, rows of ``x`` in
    16-lane registers: up to four a pass by ``_simd.index_lanes``, a pass of one by ``index_tile``,
    which holds 16 columns of ``x`` in registers and sums the rest one at a time) against the expanded
    weight's product, for rows ``[3, 40)``: 1 and 16 steps are one ``index_tile`` pass, 17 one of two
    registers, 80 one of four and one ``index_tile``."""
    k = numba_kernels.kernels()
    rng = np.random.default_rng(columns * 100 + steps)
    codebook = rng.standard_normal(300 if dtype == np.uint16 else 256).astype(np.float32)
    indices = rng.integers(0, codebook.size, (40, columns)).astype(dtype)
    x = rng.standard_normal((steps, columns)).astype(np.float32)
    xt = k.padded_t(x)
    width = xt.shape[1]
    sums = np.full(37 * width, np.nan, np.float32)
    k.index_lane_sums(xt, indices, codebook, 3, 40, sums)
    want = codebook[indices[3:]].astype(np.float64) @ x.T.astype(np.float64)
    np.testing.assert_allclose(sums.reshape(37, width)[:, :steps], want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
@pytest.mark.parametrize("hidden,peepholes,steps", [(7, False, 9), (40, True, 9), (70, False, 70)])
def test_lstm_sliced_agrees_with_the_csr_kernel(hidden, peepholes, steps):
    """``lstm_sliced`` (R as 32-row slices in blocks of 31 columns: 1-3 blocks here) and, without
    peepholes, ``lstm_sliced_csr`` and ``lstm_sliced_index`` (the input projection of a CSR or
    dense-index W taken in the kernel too: 70 steps are two passes of the lane sums) against
    ``lstm_csr`` on the same steps, wherever numba runs (the sessions take them only with AVX-512's
    permutes: ``numba_kernels.wide_vectors``)."""
    k = numba_kernels.kernels()
    _, _, sw = weights((4 * hidden, hidden), 0.15, seed=hidden)
    _, iw, w = weights((4 * hidden, 5), 0.5, seed=hidden + 1)      # W as dense indices and as CSR
    x, b = rand(steps, 1, 5), rand(8 * hidden)
    proj = kernels.matmul_t(x, w, b[:4 * hidden] + b[4 * hidden:])
    p = rand(3 * hidden) if peepholes else np.zeros(0, np.float32)
    h0, c0, results = rand(1, hidden), rand(1, hidden), []
    runs = [lambda *a: k.lstm_csr(proj, sw.row_ptr, sw.cols, sw.symbols, sw.codebook, p, *a),
            lambda *a: k.lstm_sliced(proj, *sw.sliced().arrays, p, *a)]
    if not peepholes:
        runs.append(lambda *a: k.lstm_sliced_csr(x, *w.arrays, b, *sw.sliced().arrays, *a))
        runs.append(lambda *a: k.lstm_sliced_index(x, *iw.arrays, b, *sw.sliced().arrays, *a))
    for run in runs:
        h, c, ys = h0.copy(), c0.copy(), np.empty((steps, 1, hidden), np.float32)
        run(np.float32(0.9), False, h, c, ys)
        results.append((ys, h, c))
    _agree_with_the_first(results)


def _agree_with_the_first(results):
    """Each kernel's outputs (a tuple per kernel) within float32 rounding of the first kernel's."""
    for result in results[1:]:
        for got, want in zip(result, results[0]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
@pytest.mark.parametrize("w_form,kernel", [("csr", "lstm_sliced_csr"), ("indexed", "lstm_sliced_index"),
                                           ("dense", "lstm_sliced")])
def test_lstm_prepared_call_projects_in_the_sliced_kernel(w_form, kernel, monkeypatch):
    """With R held per direction (in slices, where AVX-512 is) and W as CSR or dense indices, every
    call from the first is the prepared call, one kernel that takes the input projection too (a dense
    W: ``matmul_t``, then the sliced steps): the same results at each call to the bit, those of the
    full operator on the dense weights, with and without B, for an input that is a view (time-major
    out of batch-major)."""
    hidden = 40
    dr, _, r = weights((4 * hidden, hidden), 0.15, seed=2)
    dw, iw, w = weights((4 * hidden, 6), 0.5, seed=3)
    weights_held = (indexed.PerDirection([{"csr": w, "indexed": iw, "dense": dw}[w_form]]),
                    indexed.hold(indexed.PerDirection([r])))
    b, x = rand(1, 8 * hidden), rand(1, 20, 6).transpose(1, 0, 2)
    ran = _count_runs(kernel, monkeypatch)
    _calls_agree_with_the_operator("LSTM", {"hidden_size": hidden}, x, weights_held, dw, dr, b)
    assert len(ran) == (4 if numba_kernels.wide_vectors() else 0)


def _calls_agree_with_the_operator(op, attrs, x, held, dw, dr, b):
    """Four calls of one ``op`` node on the ``held`` weights (with ``b`` thrice, then without): each
    gives the full operator's outputs on the dense weights, and the first two are equal to the bit."""
    results = []
    for bias in (b, b, b, None):
        got = OPS[op](attrs, x, *held, bias)
        want = OPS[op]({k: v for k, v in attrs.items() if k[0] != "_"}, np.ascontiguousarray(x), dw[None], dr[None],
                       bias)
        for g, e in zip(got, want):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
        results.append(got)
    for g, e in zip(results[0], results[1]):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("direction,attrs", [
    ("forward", {"linear_before_reset": 1}),
    ("bidirectional", {}),
    ("reverse", {"clip": 0.7}),
])
@pytest.mark.parametrize("form", ["dense", "indexed", "sparse", "slots"])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_gru_kernels_agree(direction, attrs, form, batch, monkeypatch):
    """The compiled GRU recurrence (both orders of the reset, 7 units: rows in blocks of 4 and a
    remainder; at batch 1 a held CSR or table-slot R as 32-row slices where AVX-512 is, split at the
    candidate's rows with the reset before R; batches in register tiles where AVX-512 is) against
    the numpy step loop and the reference of the dense weight."""
    hidden, dirs = 7, 2 if direction == "bidirectional" else 1
    d, forms = _r_forms((dirs, 3 * hidden, hidden), seed=4)
    node = Node("GRU", ["x", "w", "r", "b", "", "h0"], ["y", "yh"], dict(hidden_size=hidden, direction=direction,
                                                                     **attrs))
    inits = {"w": rand(dirs, 3 * hidden, 5), "b": rand(dirs, 6 * hidden) * 0.5, "r": d}
    feeds = {"x": rand(6, batch, 5), "h0": rand(dirs, batch, hidden)}
    graph = Graph([node], [ValueInfo(n, np.float32) for n in feeds], [ValueInfo(o, np.float32) for o in ("y", "yh")],
                  inits)
    sliced = form in ("sparse", "slots") and batch == 1 and numba_kernels.wide_vectors()
    r = indexed.PerDirection.split(forms[form]) if form == "sparse" and batch == 1 else forms[form]
    source = {**graph.initializers, "r": indexed.hold(r)}
    ex = Executor(graph)
    sliced_kernel = "gru_sliced" if attrs.get("linear_before_reset") else "gru_sliced_before"
    ran = _count_runs(sliced_kernel if sliced else "gru_tiled" if _tiled("gru", form, batch)
                      else "gru" + _RNN_KERNELS[form], monkeypatch)
    got, twin = both(lambda: ex.run(feeds, source.__getitem__), monkeypatch)
    assert len(ran) == dirs         # the kernel ran, once per direction (and not for the twin)
    reference = ex.run(feeds)
    for name in ("y", "yh"):
        np.testing.assert_allclose(got[name], twin[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, atol=1e-5)



@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
@pytest.mark.parametrize("hidden,batch", [(7, 2), (40, 3), (40, 7), (40, 13)])
def test_tiled_kernels_agree_with_the_dense_kernels(hidden, batch):
    """``lstm_tiled`` and ``gru_tiled`` (R expanded for the call in blocks of 16 rows, each transposed,
    by ``slots_t``, ``csr_t``, ``index_t`` or ``dense_t``, zeros past its rows; its product in register
    tiles of a block by up to 12 entries, a block that the rows end in through a buffer: 7 units are
    an LSTM's 28 rows, a block and 12 rows, 40 units ten blocks, and with the GRU's reset before R its
    candidate's rows a pass of their own from row 14 (inside a block) or 80; 2, 3 and 7 entries tiles
    of 2, 4 and 8 accumulators, 13 entries two passes, of 12 and 2) against ``lstm_dense`` and
    ``gru_dense``, with peepholes and a clip, wherever numba runs."""
    k = numba_kernels.kernels()
    for gates in (4, 3):
        dense, iw, sw = weights((gates * hidden, hidden), 0.4, seed=hidden + gates)
        slots = indexed.TableRows(sw)
        rts = [k.slots_t(*slots.arrays, hidden), k.csr_t(sw.row_ptr, sw.cols, sw.symbols, sw.codebook, hidden),
               k.index_t(iw.indices, iw.codebook), k.dense_t(dense)]
        blocks = np.zeros((-(-gates * hidden // 16) * 16, hidden), np.float32)
        blocks[:gates * hidden] = dense         # 16 rows a block, each transposed, zeros past the rows
        for rt in rts:
            np.testing.assert_array_equal(rt, blocks.reshape(-1, 16, hidden).transpose(0, 2, 1))
        proj, h0 = rand(5, batch, gates * hidden), rand(batch, hidden)
        if gates == 4:
            p, c0 = rand(3 * hidden), rand(batch, hidden)
            runs = [lambda *a: k.lstm_dense(proj, dense, p, np.float32(0.9), False, *a)]
            runs += [lambda *a, rt=rt: k.lstm_tiled(proj, rt, p, np.float32(0.9), False, *a) for rt in rts]
            results = []
            for run in runs:
                h, c, ys = h0.copy(), c0.copy(), np.empty((5, batch, hidden), np.float32)
                run(h, c, ys)
                results.append((ys, h, c))
            _agree_with_the_first(results)
            continue
        rb = rand(3 * hidden)
        for before_reset in (True, False):
            runs = [lambda *a: k.gru_dense(proj, dense, rb, np.float32(0.9), before_reset, *a)]
            runs += [lambda *a, rt=rt: k.gru_tiled(proj, rt, rb, np.float32(0.9), before_reset, *a) for rt in rts]
            results = []
            for run in runs:
                h, ys = h0.copy(), np.empty((5, batch, hidden), np.float32)
                run(h, ys)
                results.append((ys, h))
            _agree_with_the_first(results)


@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
@pytest.mark.parametrize("hidden,steps", [(7, 9), (40, 9), (70, 70)])
def test_gru_sliced_agrees_with_the_csr_kernel(hidden, steps):
    """``gru_sliced`` (R's ``3H`` rows as 32-row slices, 1-3 blocks of columns), ``gru_sliced_csr`` and
    ``gru_sliced_index`` (the input projection by a CSR or dense-index W in the kernel) against
    ``gru_csr`` with the reset after R, and ``gru_sliced_before`` (the candidate's rows as slices of
    their own, multiplying ``r * h``) against it with the reset before, on the same steps, wherever
    numba runs."""
    k = numba_kernels.kernels()
    _, _, sw = weights((3 * hidden, hidden), 0.15, seed=hidden)
    _, iw, w = weights((3 * hidden, 5), 0.5, seed=hidden + 1)
    x, b = rand(steps, 1, 5), rand(6 * hidden)
    proj, rb = kernels.matmul_t(x, w, b[:3 * hidden]), b[3 * hidden:]
    h0 = rand(1, hidden)
    zr, cand = sw[:2 * hidden].sliced(), sw[2 * hidden:].sliced()
    for before_reset, runs in (
            (True, (lambda *a: k.gru_sliced(proj, *sw.sliced().arrays, rb, *a),
                    lambda *a: k.gru_sliced_csr(x, *w.arrays, b, *sw.sliced().arrays, *a),
                    lambda *a: k.gru_sliced_index(x, *iw.arrays, b, *sw.sliced().arrays, *a))),
            (False, (lambda *a: k.gru_sliced_before(proj, *zr.arrays, *cand.arrays[:4], rb, *a),))):
        results = []
        for run in (lambda *a: k.gru_csr(proj, *sw.arrays, rb, a[0], before_reset, *a[1:]),) + runs:
            h, ys = h0.copy(), np.empty((steps, 1, hidden), np.float32)
            run(np.float32(0.9), h, ys)
            results.append((ys, h))
        _agree_with_the_first(results)


@pytest.mark.skipif(numba_kernels.kernels() is None, reason="needs numba")
@pytest.mark.parametrize("w_form,kernel", [("csr", "gru_sliced_csr"), ("indexed", "gru_sliced_index"),
                                           ("dense", "gru_sliced")])
def test_gru_prepared_call_projects_in_the_sliced_kernel(w_form, kernel, monkeypatch):
    """The GRU's plain call (one forward direction, no initial state or lengths) is prepared as the
    LSTM's: with the reset after R and R held in slices (AVX-512), every call from the first runs the
    one kernel that also takes the projection by a CSR or dense-index W; the same results at each
    call to the bit, those of the full operator on the dense weights, with and without B. With the
    reset before R its candidate's rows are slices of their own (``gru_sliced_before``, W projected
    by ``matmul_t``); at batch 2 the register tiles (AVX-512), else the CSR kernel."""
    gru, hidden = OPS["GRU"], 40
    dr, _, r = weights((3 * hidden, hidden), 0.15, seed=4)
    dw, iw, w = weights((3 * hidden, 6), 0.5, seed=5)
    held = (indexed.PerDirection([{"csr": w, "indexed": iw, "dense": dw}[w_form]]),
            indexed.hold(indexed.PerDirection([r])))
    b, x = rand(1, 6 * hidden), rand(1, 20, 6).transpose(1, 0, 2)
    attrs = {"hidden_size": hidden, "linear_before_reset": 1}
    ran = _count_runs(kernel, monkeypatch)
    _calls_agree_with_the_operator("GRU", attrs, x, held, dw, dr, b)
    assert len(ran) == (4 if numba_kernels.wide_vectors() else 0)
    before, csr = _count_runs("gru_sliced_before", monkeypatch), _count_runs("gru_csr", monkeypatch)
    tiled = _count_runs("gru_tiled", monkeypatch)
    for call_attrs, xs in (({"hidden_size": hidden}, x), (attrs, rand(3, 2, 6))):
        got = gru(call_attrs, xs, *held, b)
        want = gru({k: v for k, v in call_attrs.items() if k[0] != "_"}, np.ascontiguousarray(xs), dw[None], dr[None],
                   b)
        for g, e in zip(got, want):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    wide = numba_kernels.wide_vectors()
    assert len(ran) == (4 if wide else 0) and len(before) == len(tiled) == (1 if wide else 0)
    assert len(csr) == (0 if wide else 2)


def _chain(producer, inputs, act, act_inputs=(), act_attrs=None, extra_reader=False):
    nodes = [Node(producer[0], list(inputs), ["t"], producer[1]), Node(act, ["t", *act_inputs], ["y"], act_attrs or {})]
    outputs = [ValueInfo("y", np.float32)]
    if extra_reader:
        nodes.append(Node("Neg", ["t"], ["z"]))
        outputs.append(ValueInfo("z", np.float32))
    return nodes, outputs


@pytest.mark.parametrize("producer,act,act_inputs,act_attrs", [
    (("Conv", {"pads": [1, 1, 1, 1]}), "Relu", (), None),
    (("Conv", {"pads": [1, 1, 1, 1], "group": 4}), "Clip", ("lo", "hi"), None),
    (("Gemm", {"transB": 1}), "Relu", (), None),
    (("Gemm", {"transB": 1, "alpha": 0.5}), "Clip", ("lo", ""), None),
    (("Add", {}), "Relu", (), None),
    (("Add", {}), "Clip", ("lo", "hi"), None),
])
def test_fused_activation_changes_nothing(producer, act, act_inputs, act_attrs):
    """A Relu/Clip that alone reads a Conv/Gemm/Add output runs inside it, with the same result; a
    second reader, or asking for the intermediate value, keeps them apart."""
    if producer[0] == "Conv":
        group = producer[1].get("group", 1)
        inputs, feeds = ["x", "w", "b"], {"x": rand(2, 4, 6, 6)}
        inits = {"w": rand(8, 4 // group, 3, 3), "b": rand(8)}
    elif producer[0] == "Gemm":
        inputs, feeds, inits = ["x", "w", "b"], {"x": rand(3, 10)}, {"w": rand(6, 10), "b": rand(6)}
    else:
        inputs, feeds, inits = ["x", "x2"], {"x": rand(3, 10), "x2": rand(3, 10)}, {}
    inits.update({"lo": np.array(-0.25, np.float32), "hi": np.array(0.5, np.float32)})
    for extra in (False, True):
        nodes, outputs = _chain(producer, inputs, act, act_inputs, act_attrs, extra)
        graph = Graph(nodes, [ValueInfo(n, np.float32) for n in feeds], outputs, inits)
        ex = Executor(graph)
        steps = ex._default_plan.steps
        assert len(steps) == (3 if extra else 1)
        got = ex.run(feeds)
        t = OPS[producer[0]](dict(producer[1]), *[feeds.get(n, inits.get(n)) for n in inputs])
        expected = OPS[act]({}, t, *[inits[n] if n else None for n in act_inputs])
        np.testing.assert_allclose(got["y"], expected, rtol=1e-6, atol=1e-6)
        apart = ex.run(feeds, outputs=["y", "t"])             # the intermediate asked for: not fused
        np.testing.assert_allclose(apart["t"], t, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(apart["y"], expected, rtol=1e-6, atol=1e-6)


RESIDUAL_CONVS = {      # name: (x shape, w shape, Conv attributes): each takes another path of kernels.conv
    "pointwise": ((1, 8, 6, 6), (16, 8, 1, 1), {}),
    "im2col": ((1, 4, 9, 9), (8, 4, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "batch": ((2, 4, 6, 6), (8, 4, 3, 3), {"pads": [1, 1, 1, 1]}),
    "winograd": ((1, 4, 12, 12), (6, 4, 3, 3), {"pads": [1, 1, 1, 1]}),
    "depthwise": ((1, 8, 7, 7), (8, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 8}),
    "1-D": ((1, 4, 10), (6, 4, 3), {"pads": [1, 1]}),
}


def _conv_add(case, act, conv_first=True, residual=None, dtype=np.float32):
    """Conv -> Add (the Conv's output as the Add's first or second input) -> Relu/Clip or nothing."""
    xs, ws, attrs = RESIDUAL_CONVS[case]
    y_shape = (xs[0], ws[0]) + tuple((s + 2 * (attrs.get("pads", [0])[0]) - k) // attrs.get("strides", [1])[0] + 1
                                     for s, k in zip(xs[2:], ws[2:]))
    feeds = {"x": rand(*xs).astype(dtype), "r": rand(*(residual or y_shape)).astype(dtype)}
    inits = {"w": constant(rand(*ws).astype(dtype)), "b": rand(ws[0]).astype(dtype),
             "lo": np.array(-0.25, dtype), "hi": np.array(0.5, dtype)}
    nodes = [Node("Conv", ["x", "w", "b"], ["t"], dict(attrs), name="conv"),
             Node("Add", ["t", "r"] if conv_first else ["r", "t"], ["s" if act else "y"], name="add")]
    if act:
        nodes.append(Node(act, ["s", "lo", "hi"] if act == "Clip" else ["s"], ["y"]))
    graph = Graph(nodes, [ValueInfo(n, dtype) for n in feeds], [ValueInfo("y", dtype)], inits)
    t = OPS["Conv"](dict(attrs), feeds["x"], inits["w"], inits["b"])
    s = OPS["Add"]({}, t, feeds["r"]) if conv_first else OPS["Add"]({}, feeds["r"], t)
    expected = OPS[act]({}, s, *((inits["lo"], inits["hi"]) if act == "Clip" else ())) if act else s
    return graph, feeds, expected


@pytest.mark.parametrize("case", list(RESIDUAL_CONVS))
@pytest.mark.parametrize("act", ["", "Relu", "Clip"])
def test_residual_add_runs_in_the_convolution(case, act, monkeypatch):
    """A Conv whose output only an Add reads runs with the Add in one step (``Executor._residuals``):
    the residual is summed in the bias pass of each kernel path (pointwise, im2col, batched,
    Winograd, depthwise, 1-D), before a fused Relu/Clip; the result is bit-identical to the three
    operators one after the other, with the compiled kernels and with their numpy twins. The first
    call runs the Add (it learns the output's shape), later ones do not."""
    adds, add = [], OPS["Add"]

    def counted(attrs, a, b):
        adds.append(a.shape)
        return add(attrs, a, b)
    for conv_first in (True, False):
        graph, feeds, expected = _conv_add(case, act, conv_first)
        with monkeypatch.context() as m:
            m.setitem(OPS, "Add", counted)
            ex = Executor(graph)
        assert [(s.node.name, s.fused) for s in ex.steps()] == [("conv", f"Add+{act}" if act else "Add")]
        adds.clear()
        for _ in range(3):
            np.testing.assert_array_equal(ex.run(feeds)["y"], expected)
        assert len(adds) == 1
        if numba_kernels.kernels() is not None:
            got, twin = both(lambda: ex.run(feeds)["y"], monkeypatch)
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_allclose(twin, expected, rtol=1e-5, atol=1e-5)
        apart = ex.run(feeds, outputs=["y", "t"])       # the convolution's output asked for: not merged
        np.testing.assert_array_equal(apart["y"], expected)


@pytest.mark.parametrize("residual,dtype", [((1, 16, 1, 1), np.float32), ((3, 16, 6, 6), np.float32),
                                            (None, np.float64)])
def test_residual_add_of_another_shape_or_dtype_runs_apart(residual, dtype):
    """A residual that broadcasts (to the convolution's shape, or to a larger batch) is added by the Add
    itself, after the convolution; float64 sums in the numpy epilogue: the same results as the
    operators one after the other."""
    graph, feeds, expected = _conv_add("pointwise", "Relu", residual=residual, dtype=dtype)
    ex = Executor(graph)
    for _ in range(2):
        got = ex.run(feeds)["y"]
        assert got.dtype == dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", ["pointwise", "depthwise", "batch"])
def test_residual_add_of_a_strided_view(case):
    """A residual that is a strided view (here in Fortran order) sums as a contiguous one would."""
    graph, feeds, expected = _conv_add(case, "Clip")
    feeds["r"] = np.asfortranarray(feeds["r"])
    ex = Executor(graph)
    for _ in range(2):
        np.testing.assert_array_equal(ex.run(feeds)["y"], expected)


def test_residual_merges_only_a_lone_convolution():
    """Of two Convs feeding one Add, the later merges; a Conv output the Add reads twice, or that
    another node reads too, stays apart."""
    x, w1, w2 = rand(1, 4, 5, 5), rand(4, 4, 1, 1), rand(4, 4, 1, 1)
    two = Graph([Node("Conv", ["x", "w1"], ["a"], name="c1"), Node("Conv", ["x", "w2"], ["b"], name="c2"),
                 Node("Add", ["a", "b"], ["y"], name="add")],
                [ValueInfo("x", np.float32)], [ValueInfo("y", np.float32)], {"w1": w1, "w2": w2})
    ex = Executor(two)
    assert [(s.node.name, s.fused) for s in ex.steps()] == [("c1", ""), ("c2", "Add")]
    conv = OPS["Conv"]
    np.testing.assert_array_equal(ex.run({"x": x})["y"], conv({}, x, w1) + conv({}, x, w2))
    twice = Graph([Node("Conv", ["x", "w1"], ["a"], name="c1"), Node("Add", ["a", "a"], ["y"], name="add")],
                  [ValueInfo("x", np.float32)], [ValueInfo("y", np.float32)], {"w1": w1})
    assert [s.fused for s in Executor(twice).steps()] == ["", ""]
    read = Graph([Node("Conv", ["x", "w1"], ["a"], name="c1"), Node("Add", ["a", "x"], ["y"], name="add"),
                  Node("Neg", ["a"], ["z"])],
                 [ValueInfo("x", np.float32)], [ValueInfo("y", np.float32), ValueInfo("z", np.float32)], {"w1": w1})
    assert [s.fused for s in Executor(read).steps()] == ["", "", ""]


def test_a_failing_merged_add_is_named_with_its_conv():
    """An Add merged into its Conv that fails (a residual fed in a shape that does not broadcast) is a
    DcrtError naming the step and the ops merged into it."""
    graph, feeds, _ = _conv_add("pointwise", "Relu")
    graph.inputs[1] = ValueInfo("r", np.float32, ["n", "c", "h", "w"])
    ex = Executor(graph)
    ex.run(feeds)
    with pytest.raises(DcrtError, match=r"node 'conv' \(Conv\+Add\+Relu\) failed .*broadcast"):
        ex.run({"x": feeds["x"], "r": rand(1, 16, 5, 6)})


def test_residual_add_follows_the_shapes_that_fix_the_output():
    """The residual joins the bias pass only while the output keeps the shape it had when the Add last
    ran: a weight fed as an input may change it (3x3 then 1x1 over a 3x3 map, the residual
    broadcasting to the second); an empty batch gives an empty sum on every call."""
    x, r = rand(1, 3, 3, 3), rand(1, 4, 1, 1)
    graph = Graph([Node("Conv", ["x", "w"], ["c"], name="conv"), Node("Add", ["c", "r"], ["y"], name="add")],
                  [ValueInfo("x", np.float32), ValueInfo("w", np.float32), ValueInfo("r", np.float32)],
                  [ValueInfo("y", np.float32)], {})
    ex = Executor(graph)
    assert [s.fused for s in ex.steps()] == ["Add"]
    for k in (3, 3, 1, 1, 3):
        w = rand(4, 3, k, k)
        np.testing.assert_array_equal(ex.run({"x": x, "w": w, "r": r})["y"], OPS["Conv"]({}, x, w) + r)
    graph, feeds, expected = _conv_add("im2col", "Relu")
    ex = Executor(graph)
    empty = {"x": feeds["x"][:0], "r": feeds["r"][:0]}
    for _ in range(3):
        y = ex.run(empty)["y"]
        assert y.shape == (0,) + expected.shape[1:] and y.dtype == np.float32
