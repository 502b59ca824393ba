"""Users' files as the command line reads and writes them: arrays, JSON, whole files.

Every failure is an :class:`~dcrt.errors.InputError` naming the file and what to give instead; a
written file appears whole or not at all (``format.writer.atomic_write``).
"""
from __future__ import annotations

import io
import math
from typing import Any, Mapping

import numpy as np

from .errors import InputError
from .format.writer import atomic_write, output_problem


def read_bytes(path: str) -> bytes:
    """A whole file's bytes, the file closed after."""
    with open(path, "rb") as f:
        return f.read()


def load_npy(path: str) -> np.ndarray:
    """The array in a ``.npy`` file written by ``numpy.save`` (never unpickled)."""
    try:
        value = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        why = str(e)
        if "pickled" in why:        # numpy's words for any file that is not a .npy
            why = "pickled data or another format"
        elif "Object arrays" in why:
            why = "an array of Python objects, which would have to be unpickled"
        raise InputError(f"{path}: not a .npy array ({why}); save each input with numpy.save") from None
    if isinstance(value, np.lib.npyio.NpzFile):
        names = ", ".join(value.files)
        value.close()
        raise InputError(f"{path} is a .npz archive (holding {names or 'nothing'}); give one .npy file per "
                         "input, saved with numpy.save")
    return value


def save_outputs(path: str, outputs: Mapping[str, np.ndarray]) -> str:
    """``outputs`` saved at ``path`` exactly: one array as ``.npy``, or all of them as a ``.npz`` (a
    ``.npz`` path, and the only choice for several outputs); returns the path."""
    problem = output_problem(path)     # a folder, a device, a missing folder: before any writing
    if problem:
        raise InputError(f"--output: {problem}")
    buf = io.BytesIO()
    if path.endswith(".npz"):
        np.savez(buf, **outputs)
    elif len(outputs) == 1:
        np.save(buf, next(iter(outputs.values())))
    else:
        raise InputError(f"the model has {len(outputs)} outputs ({', '.join(outputs)}): give --output a "
                         f".npz path to save them all")
    atomic_write(path, buf.getvalue())
    return path


def json_safe(value: Any) -> Any:
    """``value`` (dicts, lists, numbers, strings) with every non-finite float as the string ``"inf"``,
    ``"-inf"`` or ``"nan"`` and numpy scalars as Python's: ``json.dumps`` then writes strict JSON,
    which it does not for infinities (a PSNR of an exact output)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
