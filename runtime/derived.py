"""Forms of a constant weight that kernels compute from faster, derived once and kept while it lives.

A constant is a read-only array: the session's decoded weights in dense mode and the file's raw ones
(``Session._held`` marks them so; no operator may change them). The Winograd transform of a 3x3
convolution's weight (``runtime/winograd.py``) and the packed rows of a convolution's for numba's
register tiles (``kernels._packed``) are computed at the first call, kept here under the
array's identity and the form's name, and dropped when the array is freed; ``cached_bytes`` counts
them into ``Session.resident_bytes()["now"]``.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np

_KEPT: Dict[Tuple[int, str], Tuple[Any, np.ndarray]] = {}
_LOCK = threading.Lock()


def kept(w: Any, form: str) -> Optional[np.ndarray]:
    """The ``form`` kept for this very array (an id is reused once its array is freed), or None."""
    entry = _KEPT.get((id(w), form))
    return entry[1] if entry is not None and entry[0]() is w else None


def derived(w: np.ndarray, form: str, make: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``make(w)``, computed at the first call for this array and ``form`` and kept until ``w`` is freed."""
    value = kept(w, form)
    if value is None:
        value = make(w)
        key = (id(w), form)
        with _LOCK:
            _KEPT[key] = (weakref.ref(w, lambda _, key=key: _KEPT.pop(key, None)), value)
    return value


def cached_bytes(arrays: Iterable[Any]) -> int:
    """Bytes of the forms kept for any of ``arrays``."""
    live = {id(a): a for a in arrays}
    return sum(value.nbytes for (key, _), (ref, value) in list(_KEPT.items())
               if key in live and ref() is live[key])
