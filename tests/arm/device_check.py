"""The runtime check run on a device (or an emulated one): numpy + flatbuffers + dcrt's core and runtime.

    python device_check.py [--numba yes|no|any] [--models DIR]

Run from the payload folder made by ``make_payload.py`` (it holds ``dcrt/``, ``models/`` and this
script). It imports nothing but the standard library, numpy, flatbuffers and dcrt (onnx, onnxruntime,
h5py, protobuf, yaml and the converters are blocked), prints the platform (machine, byte order,
pointer size, numpy version) and checks, for every model:

- every compressed tensor decodes to exactly the host's values (bit for bit), from a memory-mapped
  path and from bytes; ``verify()`` finds nothing;
- ``Session.run`` in each mode matches the host's dcrt output (rtol 1e-4) and, for lossless files,
  onnxruntime's output on the original model (rtol 1e-3);
- a copy with one payload byte flipped is reported as damaged, naming a tensor;

and that the codecs round-trip random symbols (every chain) and, with numba, the pointwise register
tile agrees with numpy on this machine. Exits 1 on any
failure; the last line is ``RESULT <machine>: <passed>/<total> checks passed``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import struct
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BLOCKED = ("onnx", "onnxruntime", "h5py", "google", "yaml", "dcrt.converters")


class _Block:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.split(".")[0] in BLOCKED[:5]:
            raise ImportError(f"{name} is blocked: the runtime must not need it")
        return None


sys.meta_path.insert(0, _Block())

import numpy as np  # noqa: E402

import dcrt  # noqa: E402
from dcrt import codecs  # noqa: E402
from dcrt.codecs.raw import numba_kernels  # noqa: E402
from dcrt.errors import FormatError  # noqa: E402
from dcrt.runtime.indexed import SparseWeight  # noqa: E402

MODES = ("index", "dense", "stream")


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def check(self, label, fn):
        start = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            self.failed.append(label)
            print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=-4)  # the innermost frames: where it failed
            return
        self.passed += 1
        print(f"ok   {label} ({time.time() - start:.1f} s)", flush=True)


def close(got, want, rtol, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
    if want.dtype.kind == "f":
        scale = max(float(np.max(np.abs(want))), 1e-6) if want.size else 1.0
        err = float(np.max(np.abs(got.astype(np.float64) - want))) / scale if want.size else 0.0
        assert err <= rtol, f"{what}: max error {err:.2e} of the largest value (allowed {rtol:.0e})"
    else:
        assert np.array_equal(got, want), f"{what}: values differ"


def check_model(c: Checks, folder: str, name: str, info: dict) -> None:
    path = os.path.join(folder, name + ".dcm")
    with np.load(os.path.join(folder, name + ".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    feeds = {k[5:]: v for k, v in arrays.items() if k.startswith("feed.")}

    def weights():
        data = pathlib.Path(path).read_bytes()
        for source in (path, data):
            with dcrt.open_dcm(source) as f:
                assert f.verify() == {}, "verify() found damage in a sound file"
                for k, tname in enumerate(info["tensors"]):
                    got, want = f.tensors[tname].decode(), arrays[f"w.{k}"]
                    assert got.dtype == want.dtype and got.shape == want.shape, tname
                    assert np.array_equal(got, want), f"{tname} decodes differently than on the host"
    c.check(f"{name}: {len(info['tensors'])} compressed tensors decode bit-exactly (mmap and bytes)", weights)

    for mode in MODES:
        def run(mode=mode):
            outs = dcrt.Session(path, mode=mode).run(None, feeds)
            for j, y in enumerate(outs):
                close(y, arrays[f"host.{mode}.{j}"], 1e-4, f"output {j} vs host dcrt")
                if info["lossless"] and f"ort.{j}" in arrays:
                    close(y, arrays[f"ort.{j}"], 1e-3, f"output {j} vs onnxruntime")
        c.check(f"{name}: run in {mode} mode matches the host" + (" and onnxruntime" if info["lossless"] else ""), run)

    def damaged():
        data = bytearray(pathlib.Path(path).read_bytes())
        with dcrt.open_dcm(bytes(data)) as f:      # the largest tensor's payload (coded or raw)
            rec = max((t.record for t in f.tensors.values()),
                      key=lambda r: len(r.raw) if r.indices is None else len(r.indices.payload))
            payload = bytes(rec.raw if rec.indices is None else rec.indices.payload)
        assert len(payload) >= 8
        at = bytes(data).find(payload[: min(len(payload), 32)])
        assert at > 0
        data[at + min(len(payload) - 1, 5)] ^= 0x10
        with dcrt.open_dcm(bytes(data)) as f:
            problems = f.verify()
        assert problems and all("damaged" in p for p in problems.values()), problems
        try:
            dcrt.Session(bytes(data)).run(None, feeds)
        except FormatError as e:
            assert "damaged" in str(e)
        else:
            raise AssertionError("a damaged file ran")
    c.check(f"{name}: a flipped payload bit is reported as damage", damaged)


def check_codecs(c: Checks) -> None:
    rng = np.random.default_rng(0)
    for chain in codecs.CHAINS:
        def round_trip(chain=chain):
            for alphabet, n in ((2, 1000), (33, 20000), (256, 5000), (3000, 3000)):
                if not codecs.usable(chain, alphabet):
                    continue
                symbols = np.minimum(rng.geometric(0.2, n) - 1, alphabet - 1)
                stream = codecs.encode(symbols, alphabet, chain)
                got = codecs.decode(stream)
                assert np.array_equal(got, symbols), f"{chain} alphabet {alphabet}"
        c.check(f"codec {chain} round-trips on this machine", round_trip)


def check_register_tiles(c: Checks) -> None:
    """numba's register tiles (LLVM IR intrinsics, ``runtime/_simd.py``) compile and agree with numpy
    on this machine: the model runs take them only where AVX-512 is (``wide_vectors``)."""
    from dcrt.runtime import kernels
    from dcrt.runtime.numba_kernels import kernels as compiled
    k = compiled()
    if k is None:
        return

    def agrees():
        rng = np.random.default_rng(1)
        w, x = rng.standard_normal((14, 150), np.float32), rng.standard_normal((150, 37), np.float32)
        b, res = rng.standard_normal(14, np.float32), rng.standard_normal((14, 37), np.float32)
        out = np.empty((14, 37), np.float32)
        k.pointwise(k.pack_pointwise(w), x, b, res, np.float32(-1.0), np.float32(2.0), 7, out)
        close(out, np.clip(w @ x + b[:, None] + res, -1.0, 2.0).astype(np.float32), 1e-5, "pointwise")
        # a 3x3 convolution, stride (2, 1), pad 1, by tiles reading the input in place, against im2col + BLAS
        x4, w4 = rng.standard_normal((1, 3, 9, 21), np.float32), rng.standard_normal((14, 3, 3, 3), np.float32)
        y = np.empty((1, 14, 5, 21), np.float32)
        k.conv_tiles(k.pack_pointwise(w4.reshape(14, 27)), x4, b, np.zeros(0, np.float32), (2, 1, 1, 1, 1, 1, 21),
                     3, 3, np.float32(-1.0), np.float32(2.0), 5, y)
        close(y, kernels.conv(x4, w4, b, [2, 1], [1, 1], [1, 1, 1, 1], 1, (-1.0, 2.0)), 1e-5, "conv_tiles")
        # an LSTM's pruned R as 32-row slices in two blocks of columns (AVX-512 permutes them; a
        # gather from the block's table elsewhere: scalar loads without AVX) against its CSR kernel,
        # and with the projection of a CSR or dense-index W in the kernel
        kept = rng.random((160, 40)) < 0.2
        ptr = np.concatenate([[0], np.cumsum(kept.sum(1))]).astype(np.int32)
        symbols = rng.integers(1, 31, kept.sum()).astype(np.uint8)
        sw = SparseWeight(rng.standard_normal(30, np.float32), ptr, np.nonzero(kept)[1].astype(np.uint16), symbols,
                          (160, 40))
        x, wd = rng.standard_normal((5, 1, 3), np.float32), rng.standard_normal((160, 3), np.float32)
        w = SparseWeight(wd.ravel(), np.arange(0, 481, 3, dtype=np.int32), np.tile(np.arange(3, dtype=np.uint16), 160),
                         np.arange(1, 481, dtype=np.uint16), (160, 3))
        proj, runs = (x @ wd.T).astype(np.float32), []
        for run in (lambda *a: k.lstm_csr(proj, *sw.arrays, np.zeros(0, np.float32), *a),
                    lambda *a: k.lstm_sliced(proj, *sw.sliced().arrays, np.zeros(0, np.float32), *a),
                    lambda *a: k.lstm_sliced_csr(x, *w.arrays, np.zeros(320, np.float32), *sw.sliced().arrays, *a),
                    lambda *a: k.lstm_sliced_index(x, np.arange(480, dtype=np.uint16).reshape(160, 3), wd.ravel(),
                                                   np.zeros(320, np.float32), *sw.sliced().arrays, *a)):
            h, cell = np.full((1, 40), 0.3, np.float32), np.zeros((1, 40), np.float32)
            ys = np.empty((5, 1, 40), np.float32)
            run(np.float32(np.inf), False, h, cell, ys)
            runs.append(ys)
        close(runs[2], runs[0], 1e-5, "lstm_sliced_csr")
        close(runs[3], runs[0], 1e-5, "lstm_sliced_index")
        close(runs[1], runs[0], 1e-5, "lstm_sliced")
        # a GRU's (the reset after R): its 3H = 120 rows, the first of that R
        gr = SparseWeight(sw.codebook[1:], ptr[:121], sw.cols[:ptr[120]], symbols[:ptr[120]], (120, 40))
        gw = SparseWeight(wd[:120].ravel(), w.row_ptr[:121], w.cols[:360], w.symbols[:360], (120, 3))
        gp, gb, runs = (x @ wd[:120].T).astype(np.float32), np.zeros(240, np.float32), []
        for run in (lambda *a: k.gru_csr(gp, *gr.arrays, gb[120:], a[0], True, *a[1:]),
                    lambda *a: k.gru_sliced(gp, *gr.sliced().arrays, gb[120:], *a),
                    lambda *a: k.gru_sliced_csr(x, *gw.arrays, gb, *gr.sliced().arrays, *a),
                    lambda *a: k.gru_sliced_index(x, np.arange(360, dtype=np.uint16).reshape(120, 3),
                                                  wd[:120].ravel(), gb, *gr.sliced().arrays, *a)):
            h, ys = np.full((1, 40), 0.3, np.float32), np.empty((5, 1, 40), np.float32)
            run(np.float32(np.inf), h, ys)
            runs.append(ys)
        for got, name in zip(runs[1:], ("gru_sliced", "gru_sliced_csr", "gru_sliced_index")):
            close(got, runs[0], 1e-5, name)
        # the reset before R: its candidate's rows as slices of their own
        runs = []
        for run in (lambda *a: k.gru_csr(gp, *gr.arrays, gb[120:], a[0], False, *a[1:]),
                    lambda *a: k.gru_sliced_before(gp, *gr[:80].sliced().arrays, *gr[80:].sliced().arrays[:4],
                                                   gb[120:], *a)):
            h, ys = np.full((1, 40), 0.3, np.float32), np.empty((5, 1, 40), np.float32)
            run(np.float32(np.inf), h, ys)
            runs.append(ys)
        close(runs[1], runs[0], 1e-5, "gru_sliced_before")
        # a batch of 3 in register tiles from R expanded for the call, against the CSR kernels
        p3, g3, runs = rng.standard_normal((5, 3, 160), np.float32), rng.standard_normal((5, 3, 120), np.float32), []
        for run in (lambda *a: k.lstm_csr(p3, *sw.arrays, np.zeros(0, np.float32), *a),
                    lambda *a: k.lstm_tiled(p3, k.csr_t(*sw.arrays, 40), np.zeros(0, np.float32), *a)):
            h, cell = np.full((3, 40), 0.3, np.float32), np.zeros((3, 40), np.float32)
            ys = np.empty((5, 3, 40), np.float32)
            run(np.float32(np.inf), False, h, cell, ys)
            runs.append(ys)
        close(runs[1], runs[0], 1e-5, "lstm_tiled")
        for before_reset in (True, False):
            runs = []
            for run in (lambda *a: k.gru_csr(g3, *gr.arrays, *a),
                        lambda *a: k.gru_tiled(g3, k.csr_t(*gr.arrays, 40), *a)):
                h, ys = np.full((3, 40), 0.3, np.float32), np.empty((5, 3, 40), np.float32)
                run(gb[120:], np.float32(np.inf), before_reset, h, ys)
                runs.append(ys)
            close(runs[1], runs[0], 1e-5, "gru_tiled")
    c.check("pointwise and convolution register tiles, the sliced LSTM and GRU and their batches in tiles agree with "
            "numpy on this machine", agrees)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numba", choices=("yes", "no", "any"), default="any")
    ap.add_argument("--models", default=os.path.join(HERE, "models"))
    a = ap.parse_args(argv)
    import flatbuffers
    machine = platform.machine()
    kernels = numba_kernels()
    print(f"machine {machine}, {sys.byteorder}-endian, {8 * struct.calcsize('P')}-bit pointers, "
          f"np.intp {np.dtype(np.intp).itemsize * 8}-bit, Python {platform.python_version()}, "
          f"numpy {np.__version__}, flatbuffers {getattr(flatbuffers, '__version__', '?')}, "
          f"numba {'in use' if kernels is not None else 'not in use'}; dcrt from {os.path.dirname(dcrt.__file__)}",
          flush=True)
    c = Checks()
    if a.numba != "any":
        def numba_state():
            assert (kernels is not None) == (a.numba == "yes"), f"numba kernels in use: {kernels is not None}"
        c.check(f"numba {'used' if a.numba == 'yes' else 'not used'}", numba_state)
    check_codecs(c)
    check_register_tiles(c)
    with open(os.path.join(a.models, "manifest.json")) as f:
        manifest = json.load(f)
    for name, info in manifest.items():
        check_model(c, a.models, name, info)
    total = c.passed + len(c.failed)
    print(f"RESULT {machine}: {c.passed}/{total} checks passed" + (f"; failed: {c.failed}" if c.failed else ""))
    return 0 if not c.failed else 1


if __name__ == "__main__":
    sys.exit(main())
