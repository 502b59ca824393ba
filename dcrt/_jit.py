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

numba compiles its runtime's own functions (reference counts, allocation) from LLVM IR once in every
process, ~25 ms of a fresh process's first result; their machine code is kept beside the kernels'
cache instead (``numba-runtime-<key>.nbo``, keyed by the IR, the CPU and the versions), as numba keeps
the kernels'.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from typing import Any, Callable

import llvmlite
import numba
from numba.core.caching import FunctionCache
from numba.core.compiler_lock import global_compiler_lock
from numba.core.runtime import nrtdynmod, rtsys

if numba.config.DISABLE_JIT:    # njit would give plain Python functions: far slower than the numpy twins
    raise ImportError("numba's compiler is disabled (NUMBA_DISABLE_JIT): dcrt uses its numpy kernels")


def _runtime_library(target_context: Any, folder: str) -> Any:
    """numba's ``nrtdynmod.compile_nrt_functions``, its machine code kept in ``folder``."""
    ir_module, library = nrtdynmod.create_nrt_module(target_context)
    codegen = target_context.codegen()
    facts = f"{numba.__version__} {llvmlite.__version__} {numba.config.OPT} {codegen.magic_tuple()}\n{ir_module}"
    path = os.path.join(folder, f"numba-runtime-{hashlib.sha256(facts.encode()).hexdigest()[:20]}.nbo")
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        state = None
    if state is not None:
        return codegen.unserialize_library(state)
    library.enable_object_caching()
    library.add_ir_module(ir_module)
    library.finalize()
    scratch = None
    try:                        # written whole or not at all: a process reading it meanwhile sees no file
        fd, scratch = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(library.serialize_using_object_code(), f)
        os.replace(scratch, path)
    except OSError:             # a read-only or full cache: compiled in every process, as numba does
        if scratch is not None and os.path.exists(scratch):
            os.remove(scratch)
    return library


def _start_runtime(target_context: Any, folder: str) -> None:
    """``rtsys.initialize`` (numba's symbols, statistics, ...) with the runtime's functions from ``folder``."""
    compile_nrt = nrtdynmod.compile_nrt_functions
    with global_compiler_lock:
        if rtsys._init:
            return
        nrtdynmod.compile_nrt_functions = lambda ctx: _runtime_library(ctx, folder)
        try:
            rtsys.initialize(target_context)
        finally:
            nrtdynmod.compile_nrt_functions = compile_nrt


class _LoadCache(FunctionCache):
    """numba's cache of one function, loading without the context refresh (see the module doc)."""

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            _start_runtime(target_context, self._cache_path)
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
