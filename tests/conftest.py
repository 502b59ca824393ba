"""Shared fixtures: the example model zoo (built on the fly, never downloaded) and converted files."""
from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _runtime_rereads_no_numba():
    """The runtime reads ``DCRT_NO_NUMBA`` once; a test may have changed it (``runtime_helpers.no_numba``)."""
    yield
    from dcrt.runtime import numba_kernels
    numba_kernels.reset()


@pytest.fixture(scope="session")
def zoo():
    import zoo as zoo_module
    return zoo_module


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory, zoo):
    """``onnx_path(name)``: path of the zoo model ``name`` saved as .onnx (built once per session)."""
    import onnx
    folder = tmp_path_factory.mktemp("onnx")

    def make(name: str) -> pathlib.Path:
        path = folder / f"{name}.onnx"
        if not path.exists():
            onnx.save(zoo.ZOO[name](), str(path))
        return path
    return make


@pytest.fixture(scope="session")
def dcm_path(tmp_path_factory, onnx_path):
    """``dcm_path(name, **options)``: the zoo model converted with ``dcrt.convert`` (cached)."""
    from dcrt.converters.convert import convert
    folder = tmp_path_factory.mktemp("dcm")
    made = {}

    def make(name: str, **options) -> pathlib.Path:
        key = (name, tuple(sorted(options.items())))
        if key not in made:
            path = folder / f"{name}-{len(made)}.dcm"
            convert(str(onnx_path(name)), str(path), **options)
            made[key] = path
        return made[key]
    return make
