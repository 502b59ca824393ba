"""Long run: many ``Session.run`` calls on one Session, printing the resident memory as it goes.

    python benchmarks/longrun.py [--model lenet_300_100] [--runs 10000] [--mode index|dense|stream]
                                 [--threads 1] [--every 1000] [--dcm model.dcm] [--bound-mib 16]

Converts the zoo model (``examples/zoo.py``) with the default plan unless ``--dcm`` is given, runs
``--runs`` times (split over ``--threads`` threads sharing the Session, each checking its results
against the first run of its input), prints RSS (``/proc/self/statm``) every ``--every`` runs, and
exits 1 if RSS grew by more than ``--bound-mib`` MiB after the warm-up (the first 100 runs) or a
result changed. The short version is ``tests/test_longrun.py`` (default suite).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402

import dcrt  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
WARMUP = 100


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet_300_100")
    ap.add_argument("--dcm", help="an existing .dcm (then --model only names the zoo input feed)")
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--mode", default="index", choices=("index", "dense", "stream"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--bound-mib", type=float, default=16.0)
    a = ap.parse_args(argv)

    import zoo
    model = zoo.ZOO[a.model]()
    feeds = [zoo.sample_input(model, seed=i) for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        path = a.dcm
        if path is None:
            import onnx
            src = Path(tmp) / f"{a.model}.onnx"
            onnx.save(model, str(src))
            path = str(Path(tmp) / f"{a.model}.dcm")
            dcrt.convert(str(src), path)
        sess = dcrt.Session(path, mode=a.mode)
        expected = [sess.run(None, f) for f in feeds]
        for i in range(WARMUP):
            sess.run(None, feeds[i % 4])
        gc.collect()
        start = rss_mib()
        print(f"{a.model} ({a.mode} mode, {a.threads} thread(s)): RSS after {WARMUP} warm-up runs "
              f"{start:.1f} MiB", flush=True)
        done = [0]
        wrong = []
        lock = threading.Lock()
        t0 = time.perf_counter()

        def work(t: int) -> None:
            while True:
                with lock:
                    if done[0] >= a.runs:
                        return
                    i = done[0]
                    done[0] += 1
                out = sess.run(None, feeds[i % 4])
                if not all(np.array_equal(x, y) for x, y in zip(out, expected[i % 4])):
                    wrong.append(i)
                if (i + 1) % a.every == 0:
                    print(f"  run {i + 1:6d}: RSS {rss_mib():8.1f} MiB ({rss_mib() - start:+.1f}), "
                          f"{(time.perf_counter() - t0) / (i + 1) * 1e3:.2f} ms/run", flush=True)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(a.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
        growth = rss_mib() - start
        print(f"{a.runs} runs in {time.perf_counter() - t0:.1f} s; RSS growth after warm-up {growth:+.1f} MiB "
              f"(bound {a.bound_mib} MiB); {len(wrong)} result(s) differed")
        sess.close()
    return 0 if growth <= a.bound_mib and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
