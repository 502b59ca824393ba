"""numba's ``njit``, with cached kernels loaded without numba's compiler set-up.

Importing this module imports numba: only the compiled-kernel modules import it. It raises ImportError
when numba's compiler is disabled (``NUMBA_DISABLE_JIT``), so that their loaders fall back to numpy.

Before loading a kernel from its cache, numba refreshes its target context: it imports and registers
every lowering module it has (numpy's array maths, which imports ``scipy.linalg`` where scipy is
installed, random numbers, typed containers, ...). That is what compiling needs, not loading machine
code that is already compiled, which calls into numba's runtime (NRT) alone. In a fresh process it
was 0.2-0.3 s of ResNet-50's first result (0.41 -> 0.23 s here; numba's own pull request 9806 moved the
same refresh off its cache hits). A kernel that is not in the cache still compiles after the full
refresh (numba's compiler does it), and a load that fails this way is retried numba's way.
"""
from __future__ import annotations

from typing import Any, Callable

import numba
from numba.core.caching import FunctionCache
from numba.core.runtime import rtsys

if numba.config.DISABLE_JIT:    # njit would give plain Python functions: far slower than the numpy twins
    raise ImportError("numba's compiler is disabled (NUMBA_DISABLE_JIT): dcrt uses its numpy kernels")


class _LoadCache(FunctionCache):
    """numba's cache of one function, loading without the context refresh (see the module doc)."""

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            rtsys.initialize(target_context)
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)
        except Exception:       # anything this numba needs registered first: its own way
            return super().load_overload(sig, target_context)


def njit(**options: Any) -> Callable[[Callable], Any]:
    """``numba.njit(**options)``; with ``cache=True`` the kernel loads from the cache as above."""
    def compile_later(fn: Callable) -> Any:
        dispatcher = numba.njit(**options)(fn)
        if type(getattr(dispatcher, "_cache", None)) is FunctionCache:
            dispatcher._cache.__class__ = _LoadCache   # the same object: numba built it
        return dispatcher
    return compile_later
