"""Speed and memory of dcrt against onnxruntime, measured side by side in the same process run.

    python benchmarks/run.py                 # small models (a few minutes)
    python benchmarks/run.py --full          # + ResNet-18, MobileNetV2, VGG-16 FC6/FC7, ResNet-50
    python benchmarks/run.py lenet5 resnet18 # chosen models (any zoo name, or vgg_fc6_fc7)

Every measurement runs in a fresh subprocess whose thread environment is set before any import
(OMP/OpenBLAS/MKL/numba threads, onnxruntime's intra-op threads): one thread, then all cores. numpy's
OpenBLAS picks its kernels for the CPU, as onnxruntime does: an ``OPENBLAS_CORETYPE`` in the
environment is dropped unless ``--keep-blas-pin`` is given (the header says which kernels ran).

1. Latency, per model, batch 1 and 8: onnxruntime on the original ONNX and dcrt in each memory mode
   run *interleaved* (one call of each per round, best of the rounds), so that a busy machine slows
   every contender alike; ratios < 1 mean dcrt is faster. With one thread the calls' CPU time is
   also compared (``time.thread_time``): a ratio a shared machine's load cannot distort. With all
   threads a round gives each contender a turn of 4 calls after a 0.2 s pause, the first call not
   counted: the other library's worker threads still spin on the cores right after its call.
   Then batch 1, one thread, without numba (``DCRT_NO_NUMBA=1``): index and dense mode on numpy's
   twins of the kernels, what a device gets from ``pip install .`` without the ``[fast]`` extra
   (turns of 4 calls: numpy's temporaries would push the other library's weights out of cache).
2. Opening: time from ``Session(path)`` to the first result vs onnxruntime's session creation plus
   first result, libraries imported beforehand in both cases: first in a fresh process (for dcrt
   this includes numba's one-time initialisation and loading its cached kernels, which a warm-up
   process per model has compiled if needed), the same in a fresh process where scipy cannot be
   imported (the device install; numba's compiler set-up imports scipy's BLAS bindings when it finds
   scipy, which cached loads skipped from session 23 on: ``dcrt/_jit.py``), then a second session of
   each in the same process. Memory, each mode in its own fresh process: the weight
   bytes a session holds after its batch-1 runs (``resident_bytes()["now"]``: with AVX-512 a recurrent
   ``R``'s slices too) against dense float32, and RSS measured from
   ``/proc``: growth after the first result ("resident"), peak growth while opening and running
   it, and the peak of a later, steady-state run.
3. Conversion time (``dcrt.convert`` with the default plan; VGG FC6/FC7 pruned as the paper).
4. Decode throughput of every coder chain, MB/s of decoded symbols: numpy, numba on one thread,
   numba on all threads.
5. Compile cost: the first inference in a process with an empty numba cache (compiling every kernel
   it uses) vs a second process loading the cached kernels, plus numba's import time.
6. The ways of computing from a codebook at batch 1: a dot product per output (gather each
   weight's centroid) vs the paper's sum of activations per centroid, on the example FC weights,
   and for pruned ones the scatter by input that index mode uses for Gemm weights (zero activations
   skipped).

Prints markdown tables; raw numbers go to benchmarks/out/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT / "examples"))

#: LeNet-300-100 trained on real handwritten digits (``examples/digits.py``: scikit-learn's digits at
#: 28x28, the paper's pruning and clustering with retraining) and fed test digits, not random numbers:
#: its input is 64 % zeros and its ReLU outputs are sparse, which index mode's products skip.
DIGITS = "lenet_300_100_digits"
#: The LSTM classifier with its W and R pruned 90 % (default 60 %), the rate of the issue's other
#: fully-connected targets: the converter stores them QUANTIZED (smaller to download than SPARSE),
#: and index mode keeps them as CSR (``dcrt.memory.pruned``).
LSTM90 = "lstm_classifier_90"
#: The GRU classifier (96 units, the reset after R as PyTorch exports it) with W and R pruned 90 % likewise.
GRU90 = "gru_classifier_90"
PRUNED90 = {LSTM90: "lstm", GRU90: "gru"}
SMALL = ["lenet_300_100", DIGITS, "lstm_classifier", LSTM90, "gru_classifier", GRU90, "vgg_fc_small", "resnet18_tiny",
         "mobilenet_v2_tiny", "lenet5"]
FULL = ["resnet18", "mobilenet_v2", "vgg_fc6_fc7", "resnet50"]
MODES = ("index", "dense", "stream")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
COMPILE_MODELS = ["lenet_300_100", "lstm_classifier", "resnet18_tiny", "mobilenet_v2_tiny"]


def build(name: str):
    import zoo
    if name == "vgg_fc6_fc7":   # VGG-16's FC6 (25088x4096) and FC7 (4096x4096), the paper's big layers
        return zoo.vgg_fc(scale=1.0)
    return zoo.ZOO[name[:-len("_90")] if name in PRUNED90 else name]()


def train_digits_mlp(path: Path) -> None:
    """Train LeNet-300-100 on the digits (~2 s), prune, retrain and cluster it as the paper does
    (another ~2 s: ``digits.finetune``) and write it as ONNX, with its first 8 test digits beside it
    (``.npy``: read without scikit-learn, which needs scipy); dcrt keeps the weights exactly."""
    import numpy as np

    import digits
    x, y, x_test, _ = digits.load_digits_28()
    net = digits.lenet_300_100()
    digits.train(net, x, y, 30)
    digits.to_onnx(digits.finetune(net, x, y, 10), str(path))
    np.save(path.with_suffix(".npy"), x_test[:8].reshape(8, -1).astype(np.float32))


def sample_input(onnx_path: str, batch: int) -> dict:
    """What a measurement feeds the model: the first test digits for :data:`DIGITS`, otherwise
    ``zoo.sample_input`` (standard normal floats, token ids)."""
    if Path(onnx_path).stem == DIGITS:
        import numpy as np
        return {"input": np.load(Path(onnx_path).with_suffix(".npy"))[:batch]}
    import onnx
    import zoo
    return zoo.sample_input(onnx.load(onnx_path, load_external_data=False), batch=batch)


def prepare(name: str) -> dict:
    """Write the ONNX file and convert it (timed); returns paths and conversion facts."""
    import onnx

    import dcrt
    OUT.mkdir(parents=True, exist_ok=True)
    src, dst = OUT / f"{name}.onnx", OUT / f"{name}.dcm"
    if not src.exists():
        if name == DIGITS:
            train_digits_mlp(src)
        else:
            onnx.save(build(name), str(src))
    options = {}
    if name == "vgg_fc6_fc7":   # the paper prunes FC6 and FC7 to 96 %, FC8 to 77 %
        options["config"] = {"layers": {"fc6*": {"sparsity": 0.96}, "fc7*": {"sparsity": 0.96},
                                        "fc8*": {"sparsity": 0.77}}}
    if name in PRUNED90:
        layer = PRUNED90[name]
        options["config"] = {"layers": {f"{layer}.W": {"sparsity": 0.9}, f"{layer}.R": {"sparsity": 0.9}}}
    start = time.perf_counter()
    result = dcrt.convert(str(src), str(dst), force=True, **options)
    return {"name": name, "onnx": str(src), "dcm": str(dst), "convert_s": time.perf_counter() - start,
            "onnx_bytes": src.stat().st_size, "dcm_bytes": result.file_bytes}


# ---------------------------------------------------------------------------------------------
# inside the measuring subprocesses


def _interleaved(runs: dict, rounds: int, budget_s: float, turn: int = 1, settle_s: float = 0.0) -> dict:
    """Best wall time and best thread CPU time of each callable, run in turns: one call each per
    round, or with ``turn`` > 1 that many calls in a row after ``settle_s`` of sleep, the first not
    counted. The latter is for several threads: after a call returns, its library's worker threads
    keep spinning on the cores for a while (onnxruntime's pool by default, OpenBLAS's too), and a
    call of the other library made meanwhile competes with them for the cores (MobileNetV2, two
    threads, each call right after the other library's: dcrt median 14.6 ms, best 7.9; after a
    pause, as when it runs alone, median 7.9)."""
    for fn in runs.values():         # warm up: lazy decoding, kernel loading, allocator
        fn()
    wall = {k: float("inf") for k in runs}
    cpu = dict(wall)
    deadline = time.perf_counter() + budget_s
    for _ in range(rounds):
        for key, fn in runs.items():
            if settle_s:
                time.sleep(settle_s)
            for i in range(turn):
                c, t = time.thread_time(), time.perf_counter()
                fn()
                if i or turn == 1:
                    wall[key] = min(wall[key], time.perf_counter() - t)
                    cpu[key] = min(cpu[key], time.thread_time() - c)
        if time.perf_counter() > deadline:
            break
    return {"wall": wall, "cpu": cpu}


def warm(onnx_path: str, dcm_path: str) -> dict:
    """Compile (or load) every kernel the model's measurements will use, in every mode and batch:
    after a kernel's source changes, the first process to use it compiles it (seconds), which must
    not land in an open + first result (run 8's MobileNetV2-tiny row timed 18.7 s so)."""
    import dcrt
    for b in (1, 8):
        feed = sample_input(onnx_path, b)
        for mode in MODES:
            dcrt.Session(dcm_path, mode=mode).run(None, feed)
    return {}


def measure(onnx_path: str, dcm_path: str, threads: int, budget_s: float) -> dict:
    """Latency and opening time (the thread environment is already set)."""
    import numpy as np
    import onnxruntime as ort

    import dcrt
    from dcrt.runtime.numba_kernels import kernels
    kernels()                       # import numba before timing (as onnxruntime is imported)
    feeds = {b: sample_input(onnx_path, b) for b in (1, 8)}
    res: dict = {}
    sess, ref, res["dcrt_first_s"], res["ort_first_s"] = _open_first(dcm_path, onnx_path, feeds[1], threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    expected = ref.run(None, feeds[1])
    # a second session of each in the same process (a long-running app opening another model)
    t = time.perf_counter()
    dcrt.Session(dcm_path).run(None, feeds[1])
    res["dcrt_first_warm_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"]).run(None, feeds[1])
    res["ort_first_warm_s"] = time.perf_counter() - t
    got = sess.run(None, feeds[1])
    res["max_abs_diff_vs_ort"] = float(max(np.abs(g - e).max() for g, e in zip(got, expected)))
    sessions = {"index": sess, "dense": dcrt.Session(dcm_path, mode="dense"),
                "stream": dcrt.Session(dcm_path, mode="stream")}
    for b, feed in feeds.items():
        runs = {"ort": (lambda f=feed: ref.run(None, f))}
        runs.update({m: (lambda s=s, f=feed: s.run(None, f)) for m, s in sessions.items() if m != "stream"})
        # one thread: one call each per round; several: turns of calls after a pause (see _interleaved)
        turns = {} if threads == 1 else {"turn": 4, "settle_s": 0.2}
        timed = _interleaved(runs, 40 if threads == 1 else 10, budget_s, **turns)
        stream = _interleaved({"ort": runs["ort"], "stream": lambda f=feed: sessions["stream"].run(None, f)},
                              8 if threads == 1 else 3, budget_s / 3, **turns)
        for kind in ("wall", "cpu"):
            timed[kind]["stream"] = stream[kind]["stream"]
            res[f"{kind}_b{b}"] = timed[kind]
    return res


def measure_numpy(onnx_path: str, dcm_path: str, budget_s: float) -> dict:
    """Batch-1 latency of index and dense mode on numpy alone (the caller sets ``DCRT_NO_NUMBA=1``):
    what a device gets from ``pip install .``, without the ``[fast]`` extra. One thread."""
    import onnxruntime as ort

    import dcrt
    feed = sample_input(onnx_path, 1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    ref = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    runs = {"ort": lambda: ref.run(None, feed)}
    for mode in ("index", "dense"):
        sess = dcrt.Session(dcm_path, mode=mode)
        runs[mode] = lambda s=sess: s.run(None, feed)
    # turns of 4 calls, the first not counted: call by call, numpy's temporaries push onnxruntime's
    # weights out of cache (LeNet-300-100: 0.05 ms instead of its usual 0.024)
    return _interleaved(runs, 10, budget_s, turn=4)["wall"]


def _open_first(dcm_path: str, onnx_path: str, feed: dict, threads: int):
    """``(session, onnxruntime session, dcrt s, onnxruntime s)``: open + first result of each, in a
    process that has imported both libraries but run neither (for dcrt: numba's one-time
    initialisation and the loading of its cached kernels fall in the first result)."""
    import onnxruntime as ort

    import dcrt
    t = time.perf_counter()
    sess = dcrt.Session(dcm_path)
    sess.run(None, feed)
    dcrt_s = time.perf_counter() - t
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    t = time.perf_counter()
    ref = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    ref.run(None, feed)
    return sess, ref, dcrt_s, time.perf_counter() - t


def open_first_device(onnx_path: str, dcm_path: str) -> dict:
    """Open + first result as on a device: scipy cannot be imported (the runtime's install is numpy,
    flatbuffers and numba; numba's compiler set-up imports ``scipy.linalg.cython_blas`` when it finds
    scipy)."""
    class NoScipy:
        def find_spec(self, name, path=None, target=None):
            if name == "scipy" or name.startswith("scipy."):
                raise ImportError("scipy is not installed on the device")
    sys.meta_path.insert(0, NoScipy())
    from dcrt.runtime.numba_kernels import kernels
    kernels()
    feed = sample_input(onnx_path, 1)
    _, _, dcrt_s, ort_s = _open_first(dcm_path, onnx_path, feed, 1)
    return {"dcrt_first_s": dcrt_s, "ort_first_s": ort_s}


def _proc_status() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")        # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_memory(dcm_path: str, onnx_path: str, mode: str) -> dict:
    """RSS growth of opening a session and computing the first result, and of a later run."""
    import numpy as np

    import dcrt
    from dcrt.runtime.numba_kernels import kernels
    feeds = sample_input(onnx_path, 1)
    kernels()
    if not (OUT / "lenet5.dcm").exists():
        prepare("lenet5")
    # numba's one-time initialisation, its cached kernels and the allocator's first arenas, before
    # the baseline: what is measured is the model's own memory
    dcrt.Session(str(OUT / "lenet5.dcm")).run(np.zeros((1, 1, 28, 28), np.float32))
    base = _proc_status()["VmRSS"]
    exact = _reset_peak()
    sess = dcrt.Session(dcm_path, mode=mode)
    sess.run(None, feeds)
    first = _proc_status()
    _reset_peak()
    sess.run(None, feeds)
    later = _proc_status()
    return {"mode": mode, "exact_peak": exact, "weights": sess.resident_bytes(),
            "resident": first["VmRSS"] - base, "peak_first": first["VmHWM"] - base,
            "peak_later": later["VmHWM"] - base}


def decode_throughput() -> list:
    """MB/s of decoded symbols for every coder chain, numpy and numba, on 4M 5-bit-entropy symbols."""
    import numpy as np

    from dcrt import codecs
    rng = np.random.default_rng(0)
    symbols = np.minimum(rng.geometric(0.12, 4_000_000) - 1, 31).astype(np.uint8)
    rows = []
    for chain in ("none", "huffman", "lzw", "huffman+lzw", "lzw+huffman"):
        stream = codecs.encode(symbols, 32, chain)
        for engine in ("numpy", "numba"):
            os.environ["DCRT_NO_NUMBA"] = "1" if engine == "numpy" else "0"
            best = _interleaved({"d": lambda: codecs.decode(stream)}, 5, 20.0)["wall"]["d"]
            rows.append((chain, engine, len(stream.payload) * 8 / symbols.size, symbols.size / best / 1e6))
    os.environ.pop("DCRT_NO_NUMBA", None)
    return rows


def first_inference(dcm_paths: list, onnx_paths: list) -> dict:
    """Import numba, then open each model and time its first result (compiles or loads kernels)."""
    import onnx
    t = time.perf_counter()
    import numba  # noqa: F401
    res = {"import_numba_s": time.perf_counter() - t}
    import dcrt
    import zoo
    total = 0.0
    for dcm, src in zip(dcm_paths, onnx_paths):
        feeds = zoo.sample_input(onnx.load(src, load_external_data=False), batch=1)
        t = time.perf_counter()
        dcrt.Session(dcm).run(None, feeds)
        total += time.perf_counter() - t
    res["first_results_s"] = total
    return res


def codebook_ways(dcm_paths: list) -> list:
    """Batch-1 products of every compressed 2-D FC weight: dot products (CSR by output rows, or dense
    indices) vs sums per centroid, and for CSR weights the scatter by input (``indexed.ByInput``, the
    form index mode keeps for ``Gemm(transB=1)``) on the same activations and on them after a ReLU."""
    import numpy as np

    import dcrt
    from dcrt import memory
    from dcrt.runtime.indexed import ByInput, IndexedWeight, SparseWeight
    from dcrt.runtime.numba_kernels import kernels
    from dcrt.runtime.session import indexed_weight
    k = kernels()
    rows = []
    for path in dcm_paths:
        sess = dcrt.Session(path)
        for name, t in sess._tensors.items():
            if t.encoding == "raw" or not (len(t.shape) == 2 or (len(t.shape) == 3 and t.shape[0] == 1)):
                continue
            w = indexed_weight(t)
            w = w[0] if len(t.shape) == 3 else w      # one direction of an LSTM's W or R
            x = np.random.default_rng(0).standard_normal((1, w.shape[1])).astype(np.float32)
            out = np.empty((1, w.shape[0]), np.float32)
            empty = np.zeros(0, np.float32)
            if isinstance(w, SparseWeight):
                args = (x, w.row_ptr, w.cols, w.symbols, w.codebook)
                dot, bins, form = k.csr_matmul_t, k.csr_matmul_t_bins, f"CSR {w.nnz / np.prod(w.shape):.0%}"
            elif isinstance(w, IndexedWeight):
                args = (x, w.indices, w.codebook)
                dot, bins, form = k.index_matmul_t, k.index_matmul_t_bins, f"indices {w.indices.dtype}"
            else:
                continue
            runs = {"dot": lambda: dot(*args, empty, -np.inf, np.inf, False, out), "bins": lambda: bins(*args, out)}
            by_input = indexed_weight(t, memory.INPUTS) if isinstance(w, SparseWeight) and len(t.shape) == 2 else None
            if isinstance(by_input, ByInput):       # where grouping by input still takes fewer bytes than dense
                inner = by_input.inner
                relu = np.maximum(x, 0)
                runs["scatter"] = lambda: k.csr_matmul(x, *inner.arrays, empty, -np.inf, np.inf, False, out)
                runs["scatter_relu"] = lambda: k.csr_matmul(relu, *inner.arrays, empty, -np.inf, np.inf, False, out)
            times = _interleaved(runs, 200, 3.0)["cpu"]
            rows.append((Path(path).stem, name, "x".join(map(str, w.shape)), form, times["dot"], times["bins"],
                         times.get("scatter"), times.get("scatter_relu")))
    return rows


# ---------------------------------------------------------------------------------------------
# the driver


def _child(call: str, threads: int, extra_env: dict = None) -> object:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env.update(extra_env or {})
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import run; "
            f"print(json.dumps(run.{call}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _byte_compile() -> None:
    """Compile dcrt's modules to ``__pycache__`` as ``pip install`` does, whatever
    ``PYTHONDONTWRITEBYTECODE`` says: otherwise a fresh process compiles them from source inside the
    opening it times (ResNet-50 here: 0.074 -> 0.028 s), which onnxruntime's installed package never
    pays."""
    import compileall

    import dcrt.runtime
    for package in (dcrt, dcrt.runtime):
        compileall.compile_dir(str(Path(package.__file__).parent), quiet=1)


def _blas() -> str:
    """numpy's BLAS and the kernels it runs (threadpoolctl, from the dev install), with
    ``OPENBLAS_CORETYPE`` when the environment pins them: dcrt's convolutions run in that BLAS, and
    on an AVX-512 host the pinned AVX2 (Haswell) kernels make MobileNetV2 ~1.4x slower than the
    SkylakeX ones OpenBLAS picks by itself (README, "Speed and memory")."""
    import numpy  # noqa: F401  (loads the BLAS threadpoolctl looks for)
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS kernels unknown: no threadpoolctl"
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not blas:
        return "no BLAS found"
    found = ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} kernels" for i in blas)
    core = os.environ.get("OPENBLAS_CORETYPE")
    return found + (f", OPENBLAS_CORETYPE={core}" if core else "")


def _cell(r: dict, kind: str, b: int, mode: str) -> str:
    t, ref = r[f"{kind}_b{b}"][mode], r[f"{kind}_b{b}"]["ort"]
    return f"{1000 * t:.2f} ms ({t / ref:.2f}x)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="add the full-size networks")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timing per model, batch and thread setting")
    ap.add_argument("--keep-blas-pin", action="store_true",
                    help="keep an OPENBLAS_CORETYPE from the environment (default: numpy's BLAS picks its "
                         "kernels for the CPU, as onnxruntime does)")
    ap.add_argument("models", nargs="*")
    args = ap.parse_args()
    pin = os.environ.get("OPENBLAS_CORETYPE")
    if pin and not args.keep_blas_pin:
        # before numpy loads OpenBLAS here or in a child: a host-wide pin of OpenBLAS's kernels (session
        # 18's host pins AVX2 on an AVX-512 CPU: ResNet-18 dense 19 -> 29 ms) would time dcrt's BLAS
        # on kernels its users' machines do not pick, against an onnxruntime that picks its own
        del os.environ["OPENBLAS_CORETYPE"]
        print(f"(OPENBLAS_CORETYPE={pin} from the environment dropped: --keep-blas-pin keeps it)\n")
    names = args.models or SMALL + (FULL if args.full else [])
    cores = os.cpu_count() or 1
    results: dict = {"models": [], "memory": [], "device_open": {}, "numpy_only": {}, "decode": {}, "compile": {},
                     "codebook": []}
    _byte_compile()
    import numba
    import numpy
    import onnxruntime
    print(f"machine: {cores} cores ({os.uname().machine}), python {sys.version.split()[0]}, numpy "
          f"{numpy.__version__} ({_blas()}), numba {numba.__version__}, onnxruntime {onnxruntime.__version__}\n")

    print("### Latency: onnxruntime vs dcrt (best of interleaved rounds; ratio < 1: dcrt faster)\n")
    print("| model | threads | batch | onnxruntime | dcrt index | dcrt dense | dcrt stream | CPU-time ratio index / dense (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        facts = prepare(name)
        for threads in sorted({1, cores}):     # parallel kernels are compiled apart from the serial ones
            _child(f"warm({facts['onnx']!r}, {facts['dcm']!r})", threads)
        for threads in sorted({1, cores}):
            r = _child(f"measure({facts['onnx']!r}, {facts['dcm']!r}, {threads}, {args.budget})", threads)
            results["models"].append({**facts, "threads": threads, **r})
            for b in (1, 8):
                cpu = (f"{r[f'cpu_b{b}']['index'] / r[f'cpu_b{b}']['ort']:.2f}x / "
                       f"{r[f'cpu_b{b}']['dense'] / r[f'cpu_b{b}']['ort']:.2f}x") if threads == 1 else ""
                print(f"| {name} | {threads} | {b} | {1000 * r[f'wall_b{b}']['ort']:.2f} ms | "
                      + " | ".join(_cell(r, "wall", b, m) for m in MODES) + f" | {cpu} |", flush=True)
        for mode in MODES:
            mem = _child(f"measure_memory({facts['dcm']!r}, {facts['onnx']!r}, {mode!r})", 1)
            results["memory"].append({"name": name, **mem})
        results["device_open"][name] = _child(f"open_first_device({facts['onnx']!r}, {facts['dcm']!r})", 1)

    print("\n### Without numba (`pip install .` on a device: numpy's twins of every kernel), 1 thread, batch 1\n")
    print("| model | onnxruntime | dcrt index | dcrt dense |")
    print("|---|---:|---:|---:|")
    for name in names:
        facts = prepare(name)
        r = _child(f"measure_numpy({facts['onnx']!r}, {facts['dcm']!r}, {args.budget})", 1, {"DCRT_NO_NUMBA": "1"})
        results["numpy_only"][name] = r
        print(f"| {name} | {1000 * r['ort']:.2f} ms | " + " | ".join(
            f"{1000 * r[m]:.2f} ms ({r[m] / r['ort']:.2f}x)" for m in ("index", "dense")) + " |", flush=True)

    print("\n### Opening, memory and conversion\n")
    print("Open + first result, dcrt / onnxruntime, seconds: in a fresh process (dcrt: numba's one-time "
          "initialisation included), the same without scipy (a device install: numba's compiler set-up "
          "imports scipy's BLAS bindings when it finds them), then a second session in the same process.\n")
    print("| model | convert s | ONNX MB | .dcm MB | open+first, 1 thread | open+first, no scipy | "
          f"second session, 1 thread | open+first, {cores} threads | weights held after batch-1 runs (index) / dense "
          "float32 | "
          "RSS index / dense | peak RSS opening / resident (index) | peak RSS growth of a later run, stream / "
          "index |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        runs = {r["threads"]: r for r in results["models"] if r["name"] == name}
        one, many = runs[1], runs[max(runs)]
        mem = {m["mode"]: m for m in results["memory"] if m["name"] == name}
        idx, dense, stream = mem["index"], mem["dense"], mem["stream"]
        device = results["device_open"][name]
        w = idx["weights"]
        print(f"| {name} | {one['convert_s']:.1f} | {one['onnx_bytes'] / 1e6:.2f} | {one['dcm_bytes'] / 1e6:.3f} | "
              f"{one['dcrt_first_s']:.3f} / {one['ort_first_s']:.3f} | "
              f"{device['dcrt_first_s']:.3f} / {device['ort_first_s']:.3f} | "
              f"{one['dcrt_first_warm_s']:.3f} / {one['ort_first_warm_s']:.3f} | "
              f"{many['dcrt_first_s']:.3f} / {many['ort_first_s']:.3f} | {w['now'] / w['dense']:.1%} | "
              f"{idx['resident'] / 1e6:.1f} / {dense['resident'] / 1e6:.1f} MB | "
              f"{idx['peak_first'] / max(idx['resident'], 1):.2f}x | "
              f"{stream['peak_later'] / 1e6:.1f} / {idx['peak_later'] / 1e6:.1f} MB |", flush=True)

    print("\n### Decode throughput (MB/s of decoded symbols; 4M symbols, 5-bit alphabet)\n")
    print("| coder | bits/symbol | numpy | numba 1 thread | numba all threads |")
    print("|---|---:|---:|---:|---:|")
    one = _child("decode_throughput()", 1)
    many = _child("decode_throughput()", cores)
    results["decode"] = {"1": one, str(cores): many}
    for (chain, engine, bits, mbs), (_, _, _, mbs_many) in zip(one, many):
        if engine == "numpy":
            numpy_mbs = mbs
            continue
        print(f"| {chain} | {bits:.2f} | {numpy_mbs:.0f} | {mbs:.0f} | {mbs_many:.0f} |")

    print("\n### Compile cost (first results of " + ", ".join(COMPILE_MODELS) + ")\n")
    small = [prepare(n) if not (OUT / f"{n}.dcm").exists() else
             {"dcm": str(OUT / f"{n}.dcm"), "onnx": str(OUT / f"{n}.onnx")} for n in COMPILE_MODELS]
    call = f"first_inference({[f['dcm'] for f in small]!r}, {[f['onnx'] for f in small]!r})"
    with tempfile.TemporaryDirectory() as cache:
        cold = _child(call, 1, {"NUMBA_CACHE_DIR": cache})
        warm = _child(call, 1, {"NUMBA_CACHE_DIR": cache})
    results["compile"] = {"cold": cold, "cached": warm}
    print("| | import numba s | first results s |")
    print("|---|---:|---:|")
    print(f"| empty numba cache (compiles the kernels) | {cold['import_numba_s']:.2f} | {cold['first_results_s']:.2f} |")
    print(f"| cached kernels (cache=True, a later process) | {warm['import_numba_s']:.2f} | {warm['first_results_s']:.2f} |")

    print("\n### Batch-1 products from a codebook: dot per output, sums per centroid, scatter by input "
          "(CPU us, 1 thread)\n")
    fc = [str(OUT / f"{n}.dcm") for n in names if n in ("lenet_300_100", "lstm_classifier", LSTM90, "vgg_fc_small",
                                                       "vgg_fc6_fc7") and (OUT / f"{n}.dcm").exists()]
    rows = _child(f"codebook_ways({fc!r})", 1) if fc else []
    results["codebook"] = rows
    print("| model | weight | shape | form | dot per output us | sums per centroid us | scatter by input us "
          "| the same after a ReLU us |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for model, weight, shape, form, *times in rows:
        print(f"| {model} | {weight} | {shape} | {form} | "
              + " | ".join("-" if t is None else f"{t * 1e6:.1f}" for t in times) + " |")

    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
