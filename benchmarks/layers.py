"""Where the time goes, node by node: dcrt's ``Session.profile`` beside onnxruntime's own profiler on
the same model, input and thread count, in one process.

    python benchmarks/layers.py mobilenet_v2                # dense mode, one thread, top 15
    python benchmarks/layers.py resnet18 --mode index --top 30 --threads 2
    python benchmarks/layers.py mobilenet_v2 --batch 8

Models are the benchmark's (``benchmarks/run.py``: built and converted into ``benchmarks/out`` when
missing). Both sides are medians over ``--runs`` runs after a warm-up run. onnxruntime fuses nodes
(Conv + BatchNorm + Relu, a residual Add into the Conv before it) and names a fused node after one of
its parts; each of its nodes is matched to the dcrt node whose name is the longest prefix of its
name, so a fused Add shows up in its Conv's row. onnxruntime nodes matching none (layout reorders)
are summed on their own line. Rows are sorted by how much longer dcrt takes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _owner(ort_name: str, names: list) -> str:
    """The dcrt node name that is the longest prefix of an onnxruntime node's name, or ""."""
    best = ""
    for name in names:
        if len(name) > len(best) and (ort_name == name or (ort_name.startswith(name) and ort_name[len(name)] in "._/")):
            best = name
    return best


def compare(name: str, mode: str, runs: int, threads: int, batch: int = 1) -> tuple:
    """``(rows, ort_only_ms, dcrt_run_ms, ort_run_ms)``: per dcrt node ``(name, op, weight, dcrt ms,
    onnxruntime ms)``."""
    import numpy as np
    import onnxruntime as ort

    import dcrt
    from run import prepare, sample_input
    facts = prepare(name)
    feed = sample_input(facts["onnx"], batch)
    sess = dcrt.Session(facts["dcm"], mode=mode)
    nodes = sess.profile(feed, runs=runs)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(ROOT / "benchmarks" / "out" / "ort_profile")
    ref = ort.InferenceSession(facts["onnx"], opts, providers=["CPUExecutionProvider"])
    ref.run(None, feed)
    for _ in range(runs):
        ref.run(None, feed)
    trace = Path(ref.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_node: dict = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node.setdefault(e["name"][:-len("_kernel_time")], []).append(e["dur"] / 1e3)
    names = [n.name for n in nodes]
    ort_ms = {n: 0.0 for n in names}
    ort_only = 0.0
    for node, durations in per_node.items():
        # the warm-up run is in the trace too: the median of the last ``runs`` calls
        ms = float(np.median(durations[-runs:]))
        owner = _owner(node, names)
        if owner:
            ort_ms[owner] += ms
        else:
            ort_only += ms
    rows = [(n.name, n.op_type, n.weight, n.seconds * 1e3, ort_ms[n.name]) for n in nodes]
    return rows, ort_only, sum(r[3] for r in rows), sum(r[4] for r in rows) + ort_only


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="benchmark model names (benchmarks/run.py)")
    p.add_argument("--mode", default="dense", choices=("index", "dense", "stream"))
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=15, help="rows printed per model (0: all)")
    a = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(a.threads)      # before numpy, BLAS and numba load
    sys.path.insert(0, str(ROOT / "benchmarks"))
    for name in a.models:
        rows, ort_only, dcrt_total, ort_total = compare(name, a.mode, a.runs, a.threads, a.batch)
        print(f"\n### {name}: dcrt {a.mode} mode vs onnxruntime, batch {a.batch}, {a.threads} thread(s), "
              f"median of {a.runs} runs (ms)\n")
        print("| node | op | weight | dcrt | onnxruntime | dcrt - onnxruntime |")
        print("|---|---|---|---:|---:|---:|")
        ranked = sorted(rows, key=lambda r: r[4] - r[3])
        for node, op, weight, d, o in ranked[:a.top or len(ranked)]:
            print(f"| {node} | {op} | {weight} | {d:.3f} | {o:.3f} | {d - o:+.3f} |")
        print(f"| (onnxruntime only: layout reorders) | | | | {ort_only:.3f} | {-ort_only:+.3f} |")
        print(f"| all nodes | | | {dcrt_total:.3f} | {ort_total:.3f} | {dcrt_total - ort_total:+.3f} |")


if __name__ == "__main__":
    main()
