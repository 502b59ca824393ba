"""Long runs: no memory growth over many ``run`` calls, and one Session shared by 8 threads.

The 10,000-run version is ``benchmarks/longrun.py``; here 300 runs per model and mode keep the suite
fast. RSS is read from ``/proc/self/statm`` (Linux); the test is skipped where it does not exist.
"""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

import dcrt

RUNS = 300
GROWTH_BOUND = 8 << 20      # bytes of RSS the 300 runs after warm-up may add (allocator noise)
THREADS = 8
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")


@needs_proc
@pytest.mark.parametrize("name, mode, runs", [("lenet_300_100", "index", RUNS), ("lenet5", "index", RUNS),
                                              ("lstm_classifier", "index", RUNS), ("gru_classifier", "dense", RUNS),
                                              ("with_constant_weights", "stream", RUNS)])
def test_rss_does_not_grow_over_runs(dcm_path, zoo, name, mode, runs):
    """``runs`` calls after a warm-up add less than GROWTH_BOUND to RSS (in stream mode every run
    decodes every weight again and drops it)."""
    sess = dcrt.Session(str(dcm_path(name)), mode=mode)
    feeds = [zoo.sample_input(zoo.SMALL[name](), seed=i) for i in range(4)]
    first = sess.run(None, feeds[0])
    for i in range(20):                       # warm-up: lazy decodes, caches, allocator arenas
        sess.run(None, feeds[i % 4])
    gc.collect()
    start = rss_bytes()
    samples = []
    for i in range(runs):
        out = sess.run(None, feeds[i % 4])
        if i % 20 == 19:
            gc.collect()
            samples.append(rss_bytes() - start)
    growth = max(samples[-1], 0)
    assert growth < GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over {runs} runs: {samples}"
    # ... and the results did not drift either
    np.testing.assert_array_equal(sess.run(None, feeds[0])[0], first[0])
    del out


@pytest.mark.parametrize("name, mode", [("lenet5", "index"), ("lstm_classifier", "index"), ("gru_classifier", "index"),
                                        ("resnet_small", "dense"), ("with_constant_weights", "stream"),
                                        ("pruned_clustered_mlp", "index")])
def test_eight_threads_share_one_session(dcm_path, zoo, name, mode):
    """8 threads on one fresh Session (so they also race to decode the weights) give exactly the
    results of sequential runs on another Session."""
    path = str(dcm_path(name))
    model = zoo.SMALL[name]()
    feeds = [zoo.sample_input(model, seed=i) for i in range(THREADS)]
    reference = dcrt.Session(path, mode=mode)
    expected = [reference.run(None, f) for f in feeds]
    shared = dcrt.Session(path, mode=mode)
    results = [[None] * 3 for _ in range(THREADS)]
    errors = []
    barrier = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for k in range(3):                # each thread runs a different input each time
                results[t][k] = shared.run(None, feeds[(t + k) % THREADS])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for t in range(THREADS):
        for k in range(3):
            for got, want in zip(results[t][k], expected[(t + k) % THREADS]):
                np.testing.assert_array_equal(got, want)
