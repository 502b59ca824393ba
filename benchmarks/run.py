"""Speed and memory of dcrt against onnxruntime, measured side by side in the same run.

    python benchmarks/run.py                 # small models (a few minutes)
    python benchmarks/run.py --full          # + ResNet-18, MobileNetV2, VGG-16 FC6/FC7, ResNet-50

For each model: conversion time; then, in a fresh subprocess per thread setting (1 thread, all
threads: OMP/OpenBLAS/numba threads and onnxruntime's intra-op threads), open-to-first-result time,
latency at batch 1 and 8 for onnxruntime on the original ONNX and dcrt in each memory mode (as
ratios: < 1 means dcrt is faster), resident weight bytes and peak RSS. Then the decode throughput of
each coder (numpy and numba). Prints markdown tables; raw numbers go to benchmarks/out/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT / "examples"))

SMALL = ["lenet_300_100", "lstm_classifier", "vgg_fc_small", "resnet18_tiny", "mobilenet_v2_tiny", "lenet5"]
FULL = ["resnet18", "mobilenet_v2", "vgg_fc6_fc7", "resnet50"]
MODES = ("index", "dense", "stream")


def build(name: str):
    import zoo
    if name == "vgg_fc6_fc7":   # VGG-16's FC6 (25088x4096) and FC7 (4096x4096), the paper's big layers
        return zoo.vgg_fc(scale=1.0)
    return zoo.ZOO[name]()


def prepare(name: str) -> dict:
    """Write the ONNX file and convert it (timed); returns paths and conversion facts."""
    import onnx

    import dcrt
    OUT.mkdir(parents=True, exist_ok=True)
    src, dst = OUT / f"{name}.onnx", OUT / f"{name}.dcm"
    if not src.exists():
        onnx.save(build(name), str(src))
    options = {}
    if name == "vgg_fc6_fc7":   # the paper prunes FC6 to 96 % and FC7 to 96 %; FC8 to 77 %
        options["config"] = {"layers": {"fc6*": {"sparsity": 0.96}, "fc7*": {"sparsity": 0.96},
                                        "fc8*": {"sparsity": 0.77}}}
    start = time.perf_counter()
    result = dcrt.convert(str(src), str(dst), force=True, **options)
    return {"name": name, "onnx": str(src), "dcm": str(dst), "convert_s": time.perf_counter() - start,
            "onnx_bytes": src.stat().st_size, "dcm_bytes": result.file_bytes}


def _best(fn, repeat: int) -> float:
    fn()
    times = []
    deadline = time.perf_counter() + 5.0
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return min(times)


def measure(onnx_path: str, dcm_path: str, threads: int) -> dict:
    """Runs inside a subprocess whose thread environment is already set."""
    import resource

    import numpy as np
    import onnx
    import onnxruntime as ort

    import dcrt
    import zoo
    model = onnx.load(onnx_path, load_external_data=False)
    feeds = {b: zoo.sample_input(model, batch=b) for b in (1, 8)}
    res = {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    sess = dcrt.Session(dcm_path)
    sess.run(None, feeds[1])
    res["dcrt_first_s"] = time.perf_counter() - t
    res["dcrt_peak_rss_open_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    res["resident"] = sess.resident_bytes()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    t = time.perf_counter()
    ref = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    ref.run(None, feeds[1])
    res["ort_first_s"] = time.perf_counter() - t
    sessions = {"index": sess, "dense": dcrt.Session(dcm_path, mode="dense"),
                "stream": dcrt.Session(dcm_path, mode="stream")}
    for b, feed in feeds.items():
        res[f"ort_b{b}"] = _best(lambda: ref.run(None, feed), 50)
        for mode, s in sessions.items():
            res[f"{mode}_b{b}"] = _best(lambda: s.run(None, feed), 50 if mode != "stream" else 10)
    return res


def run_subprocess(facts: dict, threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import run; "
            f"print(json.dumps(run.measure({facts['onnx']!r}, {facts['dcm']!r}, {threads})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
            seconds = _best(lambda: codecs.decode(stream), 5)
            rows.append((chain, engine, len(stream.payload) * 8 / symbols.size, symbols.size / seconds / 1e6))
    os.environ.pop("DCRT_NO_NUMBA", None)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="add the full-size networks")
    ap.add_argument("models", nargs="*")
    args = ap.parse_args()
    names = args.models or SMALL + (FULL if args.full else [])
    cores = os.cpu_count() or 1
    results = []
    print(f"machine: {cores} cores, {os.uname().machine}, python {sys.version.split()[0]}\n")
    print("| model | threads | batch | onnxruntime ms | dcrt index | dcrt dense | dcrt stream |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        facts = prepare(name)
        for threads in sorted({1, cores}):
            r = run_subprocess(facts, threads)
            results.append({**facts, "threads": threads, **r})
            for b in (1, 8):
                ort_ms = 1000 * r[f"ort_b{b}"]
                ratios = " | ".join(f"{1000 * r[f'{m}_b{b}']:.2f} ms ({r[f'{m}_b{b}'] / r[f'ort_b{b}']:.2f}x)"
                                    for m in MODES)
                print(f"| {name} | {threads} | {b} | {ort_ms:.2f} | {ratios} |", flush=True)
    print("\n| model | convert s | ONNX MB | .dcm MB | open+first dcrt s | open+first onnxruntime s "
          "| resident index / dense | peak RSS while opening / resident index |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["threads"] != cores:
            continue
        res = r["resident"]
        print(f"| {r['name']} | {r['convert_s']:.1f} | {r['onnx_bytes'] / 1e6:.2f} | {r['dcm_bytes'] / 1e6:.3f} | "
              f"{r['dcrt_first_s']:.3f} | {r['ort_first_s']:.3f} | {res['index'] / res['dense']:.0%} | "
              f"{r['dcrt_peak_rss_open_kb'] * 1024 / max(res['index'], 1):.2f}x |")
    print("\n| coder | decoder | bits/symbol | MB/s of symbols |")
    print("|---|---|---:|---:|")
    for chain, engine, bits, mbs in decode_throughput():
        print(f"| {chain} | {engine} | {bits:.2f} | {mbs:.0f} |")
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
