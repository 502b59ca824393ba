"""Compiled kernels that compute straight from codebook indices (used when numba imports).

Each has a numpy twin in ``runtime/indexed.py`` (the method of the same role) and a test that they
agree (``tests/test_indexed.py``). They read the uint8/uint16 indices and the codebook and never build
the dense weight; each output element is one dot product accumulated in float32 registers, which is
why a pruned or quantized layer can beat a dense BLAS call at batch 1: it moves 1-2 bytes per weight
from memory instead of 4 (the paper's point about DRAM traffic).

``kernels()`` gives the compiled module or None (numba missing, or ``DCRT_NO_NUMBA`` set). Kernels use
``cache=True`` so a second process loads them from numba's cache instead of compiling.
"""
from __future__ import annotations

import os
import threading
from types import ModuleType
from typing import Optional

_MODULE: object = None
# numba's default (workqueue) threading layer must not run two parallel kernels at once.
LOCK = threading.Lock()


def kernels() -> Optional[ModuleType]:
    """The compiled kernels (``dcrt.runtime._numba_index``) or None."""
    global _MODULE
    if os.environ.get("DCRT_NO_NUMBA", "0") not in ("", "0"):
        return None
    if _MODULE is None:
        try:
            from . import _numba_index as module
        except Exception:       # numba absent or broken: the numpy twins serve
            module = False
        _MODULE = module
    return _MODULE or None
