"""Compiled kernels that compute straight from codebook indices (used when numba imports).

Each has a numpy twin (the method of the same role in ``runtime/indexed.py``, or the ``*_numpy``
function in ``runtime/kernels.py``) and a test that they agree (``tests/test_indexed.py``,
``tests/test_kernels.py``). They read the uint8/uint16 indices and the codebook and never build the
dense weight; each output element is a dot product accumulated in float32 registers, which is why a
pruned or quantized layer can beat a dense BLAS call at batch 1: it moves 1-2 bytes per weight from
memory instead of 4 (the paper's point about DRAM traffic).

``kernels()`` gives the compiled kernels (``_numba_index``, ``_numba_conv``, ``_numba_rnn`` and
``_numba_dense`` in one namespace) or None (numba missing, or ``DCRT_NO_NUMBA`` set: read once, at
the first call, and again by :func:`reset`, which tests that flip it call). Kernels use
``cache=True`` so a later process loads them from numba's cache instead of compiling
(``benchmarks/run.py`` reports both costs).

Threads: the products have a one-thread form ``name`` and a parallel form ``name_par``. A parallel
launch costs from ~5 us (idle machine) to a millisecond (threads busy elsewhere), so :func:`launch`
takes the parallel form only for work above :data:`PARALLEL_WORK` multiply-adds and when numba has
more than one thread. numba's ``workqueue`` threading layer aborts when two threads launch parallel
kernels at once: launches then hold ``dcrt.codecs.raw.PARALLEL_LOCK`` (the Huffman decoder's too).
The ``omp`` and ``tbb`` layers are thread-safe (numba picks them first when present; ``omp`` ships
with GNU libgomp on Linux), and the lock is dropped as soon as the first parallel launch shows that
one of them is in use.
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any, Optional

from ..codecs.raw import PARALLEL_LOCK

# numba's omp threading layer (GNU libgomp) lets its threads spin after a parallel region; between
# BLAS calls, whose OpenBLAS threads also want the cores, that spinning costs more than it saves.
# Passive waiting unless the user chose otherwise (read by libgomp when numba first loads it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_MODULE: Any = None
#: Work (multiply-adds or element writes) from which a kernel runs on all of numba's threads: about
#: a millisecond of one thread's work, so that a launch (and the wake-up of the threads, which do not
#: spin: see OMP_WAIT_POLICY above) is worth it.
PARALLEL_WORK = 1 << 22
_THREADSAFE: Optional[bool] = None
_IN_USE: Any = None     # the namespace, False (off or missing), or None (not read yet): see reset()


def kernels() -> Optional[SimpleNamespace]:
    """The compiled kernels, or None (numba missing or broken, or ``DCRT_NO_NUMBA`` set)."""
    if _IN_USE is None:
        reset()
    return _IN_USE or None


def reset() -> None:
    """Read ``DCRT_NO_NUMBA`` again (it is read once, at the first :func:`kernels` call: reading the
    environment costs ~0.7 us, a fifth of a small layer's Python); tests that flip it call this."""
    global _IN_USE
    _IN_USE = False if os.environ.get("DCRT_NO_NUMBA", "0") not in ("", "0") else _load()


def _load() -> Any:
    global _MODULE
    if _MODULE is None:
        try:
            from . import _numba_conv, _numba_dense, _numba_index, _numba_rnn
        except Exception:       # numba absent or broken: the numpy twins serve
            _MODULE = False
        else:
            names = {}
            for module in (_numba_index, _numba_conv, _numba_rnn, _numba_dense):
                names.update({k: v for k, v in vars(module).items()
                              if hasattr(v, "py_func") and not k.startswith("_")})
            _MODULE = SimpleNamespace(**names)
    return _MODULE


@functools.lru_cache(maxsize=None)
def wide_vectors() -> bool:
    """Whether numba compiles for this CPU (no ``NUMBA_CPU_NAME``) and it has AVX-512's 32 vector
    registers, which the 16-lane register tiles of ``_simd.pointwise_tile`` need to run from registers."""
    import numba
    from llvmlite import binding
    return not numba.config.CPU_NAME and bool(binding.get_host_cpu_features().get("avx512f"))


def threads() -> int:
    """numba's thread count for this thread (1 when numba is not in use)."""
    if not kernels():
        return 1
    import numba
    return numba.get_num_threads()


def launch(k: SimpleNamespace, name: str, work: int, *args: Any) -> Any:
    """Run kernel ``name`` of ``k``: its parallel form if ``work`` is worth it, else the serial one."""
    if work < PARALLEL_WORK or threads() < 2:
        return getattr(k, name)(*args)
    global _THREADSAFE
    fn = getattr(k, name + "_par")
    if _THREADSAFE:
        return fn(*args)
    with PARALLEL_LOCK:
        result = fn(*args)
        if _THREADSAFE is None:
            import numba
            try:
                _THREADSAFE = numba.threading_layer() in ("omp", "tbb")
            except ValueError:      # no parallel region has run yet
                pass
    return result
