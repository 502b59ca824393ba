"""Shared fixtures: the example model zoo (built on the fly, never downloaded) and converted files."""
from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))


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
