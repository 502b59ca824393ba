"""The .dcm container: round trips, determinism, and every kind of damage as a clear FormatError."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from dcrt.errors import FormatError, VersionError
from dcrt.format import FORMAT_MAJOR, open_dcm
from dcrt.format.fb.Model import Model as FbModel
from dcrt.format.writer import to_bytes, write_dcm
from dcrt.graph import Graph, Model, Node, ValueInfo


def small_model() -> Model:
    rng = np.random.default_rng(0)
    sub = Graph([Node("Identity", ["w"], ["z"])], [], [ValueInfo("z", np.float32, None)], {}, "branch")
    g = Graph(
        [Node("Gemm", ["x", "w", "b"], ["y"], {"transB": 1, "alpha": 0.1, "pads": [1, -2], "scales": [0.5, 2.0],
                                                "mode": "nearest", "names": ["a", "b"], "t": np.arange(3, dtype=np.int64)},
              "fc1"),
         Node("If", ["cond"], ["o"], {"then_branch": sub, "else_branch": sub}, "if1")],
        [ValueInfo("x", np.float32, ["N", 4, None]), ValueInfo("cond", np.bool_, [])],
        [ValueInfo("y", np.float32, ["N", 3]), ValueInfo("o", np.float32, None)],
        {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(3, dtype=np.int64)}, "main")
    return Model(g, {"": 17, "com.example": 1}, {"author": "test"})


def test_round_trip_graph_and_tensors():
    model = small_model()
    dcm = open_dcm(to_bytes(model))
    g = dcm.model.graph
    assert [(n.op_type, n.inputs, n.outputs, n.name) for n in g.nodes] == \
        [(n.op_type, n.inputs, n.outputs, n.name) for n in model.graph.nodes]
    attrs = g.nodes[0].attrs
    assert attrs["transB"] == 1 and attrs["pads"] == [1, -2] and attrs["mode"] == "nearest"
    assert attrs["alpha"] == pytest.approx(0.1) and attrs["scales"] == [0.5, 2.0] and attrs["names"] == ["a", "b"]
    np.testing.assert_array_equal(attrs["t"], np.arange(3))
    assert g.nodes[1].attrs["then_branch"].nodes[0].op_type == "Identity"
    assert [(v.name, v.dtype, v.shape) for v in g.inputs] == [("x", np.float32, ["N", 4, None]),
                                                                ("cond", np.bool_, [])]
    assert g.outputs[1].shape is None
    for name, value in model.graph.initializers.items():
        out = g.initializers[name].decode()
        assert out.dtype == value.dtype and np.array_equal(out, value)
    assert dcm.model.opsets == {"": 17, "com.example": 1} and dcm.model.metadata == {"author": "test"}
    assert dcm.format_version == (FORMAT_MAJOR, 0)


def test_deterministic_bytes():
    assert to_bytes(small_model()) == to_bytes(small_model())


def test_payloads_are_16_byte_aligned_views(tmp_path):
    path = tmp_path / "m.dcm"
    write_dcm(str(path), small_model())
    dcm = open_dcm(str(path))
    raw = dcm.tensors["w"].record.raw
    assert isinstance(raw, np.ndarray) and not raw.flags.owndata   # a view into the memory map
    offset = raw.__array_interface__["data"][0] - np.frombuffer(dcm._mmap, np.uint8).__array_interface__["data"][0]
    assert offset % 16 == 0


def test_not_a_dcm(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a dcm file")
    with pytest.raises(FormatError, match="not a .dcm"):
        open_dcm(str(path))
    with pytest.raises(FormatError, match="cannot open"):
        open_dcm(str(tmp_path / "missing.dcm"))


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated(keep):
    data = to_bytes(small_model())
    with pytest.raises(FormatError, match="truncated"):
        open_dcm(data[:int(len(data) * keep)])


def _patch_version(data: bytes, major: int) -> bytes:
    buf = bytearray(data)
    root = FbModel.GetRootAs(buf, 4)
    o = root._tab.Offset(4)   # format_major: the first field
    struct.pack_into("<H", buf, root._tab.Pos + o, major)
    return bytes(buf)


def test_newer_major_version_refused():
    data = _patch_version(to_bytes(small_model()), FORMAT_MAJOR + 1)
    with pytest.raises(VersionError, match="newer"):
        open_dcm(data)


def test_bit_flip_in_tensor_names_the_tensor():
    model = small_model()
    data = bytearray(to_bytes(model))
    w = model.graph.initializers["w"]
    at = bytes(data).find(w.tobytes())
    data[at + 5] ^= 0x10
    dcm = open_dcm(bytes(data))                   # structure intact: opens lazily
    with pytest.raises(FormatError, match="'w'.*checksum"):
        dcm.tensors["w"].decode()
    assert set(dcm.verify()) == {"w"}
    np.testing.assert_array_equal(dcm.tensors["b"].decode(), model.graph.initializers["b"])


def test_every_single_bit_flip_is_caught_or_harmless():
    """Flip each byte of a small file: open + decode either raises FormatError or returns the truth."""
    model = small_model()
    data = to_bytes(model)
    for i in range(len(data)):
        buf = bytearray(data)
        buf[i] ^= 0xFF
        try:
            dcm = open_dcm(bytes(buf))
            values = {n: t.decode() for n, t in dcm.tensors.items()}
        except FormatError:
            continue
        for name, value in model.graph.initializers.items():
            assert np.array_equal(values[name], value), f"byte {i}: silent corruption of {name}"


def test_graph_digest_does_not_depend_on_byte_order():
    """A big-endian reader holds attribute tensors and dtypes in its own byte order; the digest
    hashes them as the file stores them (little-endian), so it still matches the writer's."""
    from dcrt.format.digest import graph_digest

    def graph(order: str) -> Graph:
        f4, i8 = np.dtype(order + "f4"), np.dtype(order + "i8")
        value = np.arange(6, dtype=f4).reshape(2, 3)
        return Graph([Node("Constant", [], ["c"], name="k", attrs={"value": value, "ints": [1, 2]})],
                     [ValueInfo("x", f4, [2, 3])], [ValueInfo("c", f4, [2, 3]), ValueInfo("i", i8, None)])

    checksum = lambda name, value: 0  # noqa: E731
    assert graph_digest(graph(">"), checksum) == graph_digest(graph("<"), checksum)
    changed = graph("<")
    changed.nodes[0].attrs["value"][0, 0] = 7
    assert graph_digest(changed, checksum) != graph_digest(graph("<"), checksum)
