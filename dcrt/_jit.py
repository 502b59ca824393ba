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

Loading a kernel does two more things that only a later compilation needs, and dcrt leaves them for
then (``_LoadCache._load_light``; 90 -> 23 ms of ResNet-50's first result here, all 13 kernels):

- numba rebuilds the environment of every function inlined into the kernel, importing its module:
  ``np.empty`` lives in ``numba.np.arrayobj``, whose import (``numba.cpython.unicode``, ``hashing``, ...)
  was 23-30 ms. Nopython code reads its environment's constants only, never the module's globals
  (object mode does, which numba's own functions never are), so such an environment gets a dict
  holding ``__name__`` alone (it pickles and caches as before) and the module stays unimported.
- numba parses the kernel's LLVM bitcode (kept for inlining it into later compilations) and records
  every symbol it defines (``_load_defined_symbols``): ~40 ms. The machine code needs neither: the
  bitcode is parsed when a compilation first links the kernel, and the symbols are recorded when a
  look-up first misses them (the kernel's entry point is recorded at once: numba looks it up next).

numba compiles its runtime's own functions (reference counts, allocation) from LLVM IR once in every
process, ~25 ms of a fresh process's first result; their machine code is kept beside the kernels'
cache instead (``numba-runtime-<key>.nbo``, keyed by the IR, the CPU and the versions), as numba keeps
the kernels'.

numba marks a cached kernel stale when its own source file changes; ``njit`` here adds the private
modules of the kernel's folder to that stamp (see :func:`njit`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import pickle
import sys
import tempfile
import threading
from typing import Any, Callable

import llvmlite
import llvmlite.binding as ll
import numba
from numba.core import environment
from numba.core.caching import FunctionCache
from numba.core.codegen import JITCodeLibrary
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


# numba modules whose environments are rebuilt without importing them (see the module doc): the ones
# dcrt's kernels inline from. Importing them registers nothing the machine code needs; numba's hashing
# does (its secret's symbols), and ``_load_light`` imports it for code that uses them.
_UNIMPORTED = frozenset({"numba.np.arrayobj"})


def _environment(modname: str, consts: Any, env_name: str) -> Any:
    """numba's ``environment._rebuild_env``; a module of ``_UNIMPORTED`` not imported yet stays so."""
    if modname not in _UNIMPORTED or modname in sys.modules or environment.lookup_environment(env_name) is not None:
        return environment._rebuild_env(modname, consts, env_name)
    env = environment.Environment({"__name__": modname})
    env.consts[:] = consts
    env.env_name = env_name
    environment.Environment._memo[env_name] = env
    return env


class _Unpickler(pickle.Unpickler):
    """numba's cache entries, their environments rebuilt by ``_environment``."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "numba.core.environment" and name == "_rebuild_env":
            return _environment
        return super().find_class(module, name)


class _Symbols(set):
    """The JIT engine's ``_defined_symbols``: the symbols of loaded kernels recorded when one misses."""

    def __init__(self, names: Any) -> None:
        super().__init__(names)
        self.later: list = []
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        if set.__contains__(self, name):
            return True
        with self._lock:
            while self.later:
                module = self.later.pop()._shared_module
                for symbols in (module.functions, module.global_variables):
                    set.update(self, [s.name for s in symbols if not s.is_declaration])
        return set.__contains__(self, name)


class _CachedLibrary(JITCodeLibrary):
    """A kernel's library loaded from the cache: its bitcode parsed when first asked for."""

    _shared_bitcode = None

    @property
    def _shared_module(self) -> Any:
        module = self.__dict__.get("_shared_module")
        if module is None and self._shared_bitcode is not None:
            module = self.__dict__["_shared_module"] = ll.parse_bitcode(self._shared_bitcode)
            self._shared_bitcode = None
        return module

    @_shared_module.setter
    def _shared_module(self, module: Any) -> None:
        self.__dict__["_shared_module"] = module


def _unserialize(codegen: Any, state: Any, entry: str) -> Any:
    """``CPUCodeLibrary._unserialize`` of machine code, its bitcode and symbols left for later."""
    name, kind, data = state
    engine = getattr(codegen, "_engine", None)
    if kind != "object" or type(getattr(engine, "_defined_symbols", None)) not in (set, _Symbols):
        return type(codegen).unserialize_library(codegen, state)
    library = codegen.create_library(name)
    if type(library) is not JITCodeLibrary:
        return type(codegen).unserialize_library(codegen, state)
    if type(engine._defined_symbols) is set:
        engine._defined_symbols = _Symbols(engine._defined_symbols)
    object_code, shared_bitcode = data
    library.__class__ = _CachedLibrary
    library.enable_object_caching()
    library._set_compiled_object(object_code)
    library._shared_bitcode = shared_bitcode
    library._finalize_final_module()
    engine._defined_symbols.later.append(library)
    if entry.encode() in object_code:       # the Python entry point, which get_executable looks up
        set.add(engine._defined_symbols, entry)
    return library


class _LoadCache(FunctionCache):
    """numba's cache of one function, loading without the context refresh (see the module doc)."""

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            _start_runtime(target_context, self._cache_path)
            with self._guard_against_spurious_io_errors():
                return self._load_light(sig, target_context)
        except Exception:       # anything this numba needs registered first: its own way, all of it
            return super().load_overload(sig, target_context)

    def _load_light(self, sig: Any, target_context: Any) -> Any:
        """numba's ``_load_overload``, the environments and the library rebuilt as the module doc says
        (under numba's compiler lock, held by the dispatcher: the codegen's ``unserialize_library`` is
        ours meanwhile)."""
        if not self._enabled:
            return None
        codegen = target_context.codegen()
        data_name = self._cache_file._load_index().get(self._index_key(sig, codegen))
        if data_name is None:
            return None
        try:
            with open(self._cache_file._data_path(data_name), "rb") as f:
                payload = _Unpickler(f).load()
        except OSError:         # removed while the index still names it: compiled, as numba does
            return None
        libdata, fndesc = payload[0], payload[1]
        code = libdata[2][0] if libdata[1] == "object" else libdata[2]
        if b"_numba_hashsecret_" in code:   # symbols that importing numba's hashing adds
            importlib.import_module("numba.cpython.hashing")
        entry = fndesc.llvm_cpython_wrapper_name
        codegen.unserialize_library = lambda state: _unserialize(codegen, state, entry)
        try:
            return self._impl.rebuild(target_context, payload)
        finally:
            del codegen.unserialize_library


@functools.lru_cache(maxsize=None)     # once per folder: every kernel module of it asks
def _siblings_digest(folder: str) -> str:
    """A digest of the private modules (``_*.py``) in a kernel module's folder: the modules its kernels
    inline from (``_numba_rnn`` inlines ``_numba_index``'s sums, ``_numba_conv`` ``_simd``'s shuffles)."""
    h = hashlib.sha256()
    try:
        for name in sorted(os.listdir(folder)):
            if name.startswith("_") and name.endswith(".py") and not name.startswith("__"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
    except OSError:     # no readable sources beside it (a zipped install): numba's own stamp alone
        h = hashlib.sha256()
    return h.hexdigest()


def njit(**options: Any) -> Callable[[Callable], Any]:
    """``numba.njit(**options)``; with ``cache=True`` the kernel loads from the cache as above.

    numba marks a cached kernel stale when its own source file changes, not when a module it inlines
    from does: a kernel would keep the old code of an edited helper (a git checkout, an editable
    install). Its cache index is therefore stamped with the private modules of its folder too."""
    def compile_later(fn: Callable) -> Any:
        dispatcher = numba.njit(**options)(fn)
        cache = getattr(dispatcher, "_cache", None)
        if type(cache) is FunctionCache:
            cache.__class__ = _LoadCache   # the same object: numba built it
            index = cache._cache_file
            index._source_stamp = (index._source_stamp, _siblings_digest(os.path.dirname(fn.__code__.co_filename)))
        return dispatcher
    return compile_later
