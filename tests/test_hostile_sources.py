"""Hostile and damaged source models (issue 7, item 2): each is refused with a ConversionError whose
message names what is wrong, leaves no output file, and neither hangs nor allocates gigabytes.

The files are real: ONNX protos built with ``onnx.helper`` (or cut / hand-encoded bytes), Keras files
saved by Keras and then damaged with h5py, caffemodels written with ``caffe_pb2``. Covered elsewhere
and not repeated: the Lambda refusal (test_keras.py), garbage ONNX bytes and a missing external-data
file next to the model (test_pipeline.py), garbage caffemodel bytes, a caffemodel missing a layer and a
short blob (test_caffe.py).

Caffe cannot express a true cycle: layers run in file order and read only blobs written before them
(an in-place layer rewrites its blob, it does not loop back), so the Caffe "cycle" is a layer reading a
top that only a later layer writes, refused as such.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import zipfile

os.environ.setdefault("KERAS_BACKEND", "numpy")  # before keras is imported: no TensorFlow needed

import numpy as np  # noqa: E402
import pytest  # noqa: E402

onnx = pytest.importorskip("onnx")
h5py = pytest.importorskip("h5py")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import dcrt  # noqa: E402
from dcrt.converters import caffe_pb2  # noqa: E402
from dcrt.converters.convert import convert  # noqa: E402
from dcrt.errors import ConversionError, UnsupportedOperatorError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

#: Python exceptions that must never be what a user sees, even wrapped in a message.
LEAKS = ("Traceback", "KeyError", "IndexError", "RecursionError", "MemoryError", "ZeroDivisionError")


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail instead of hanging."""
    def expired(*_):
        raise TimeoutError(f"conversion still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(src, match: str, weights=None, error=ConversionError) -> str:
    """Converting ``src`` raises ``error`` whose message matches ``match`` and leaves no output."""
    out_dir = os.path.join(os.path.dirname(str(src)), "out")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "model.dcm")
    with deadline(), pytest.raises(error) as info:
        convert(str(src), out, weights=None if weights is None else str(weights))
    message = str(info.value)
    assert re.search(match, message), message
    assert not any(leak in message for leak in LEAKS), message
    assert os.listdir(out_dir) == [], "a failed conversion left a file behind"
    return message


# ---------------------------------------------------------------------------------------------------
# ONNX: X [1, 3, 8, 8] -> Conv (W [4, 3, 3, 3], B [4]) -> Relu -> Y
# ---------------------------------------------------------------------------------------------------

def _vi(name, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def onnx_model(nodes=None, inits=None, inputs=None, outputs=None) -> onnx.ModelProto:
    if nodes is None:
        nodes = [helper.make_node("Conv", ["X", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c"], ["Y"], name="relu")]
    if inits is None:
        inits = [numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "W"),
                 numpy_helper.from_array(np.zeros(4, np.float32), "B")]
    graph = helper.make_graph(nodes, "g", [_vi("X", [1, 3, 8, 8])] if inputs is None else inputs,
                              [_vi("Y", [1, 4, 8, 8])] if outputs is None else outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bias():
    return numpy_helper.from_array(np.zeros(4, np.float32), "B")


def _tensor(dims, **fields) -> onnx.TensorProto:
    """A weight 'W' built field by field (onnx.helper refuses inconsistent ones)."""
    return onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=dims, **fields)


def _external(location: str, **extra) -> onnx.TensorProto:
    t = _tensor([4, 3, 3, 3], data_location=TensorProto.EXTERNAL)
    for key, value in dict(location=location, **extra).items():
        t.external_data.add(key=key, value=str(value))
    return t


def _nested_ifs(depth: int) -> bytes:
    """A model whose If nodes nest ``depth`` deep, encoded by hand (onnx.helper stops at protobuf's
    depth limit, which is the point: the reader must stop there too, not recurse)."""
    def field(number: int, payload: bytes) -> bytes:
        head, n = bytearray(), (number << 3) | 2
        for value in (n, len(payload)):
            while value > 0x7F:
                head.append(value & 0x7F | 0x80)
                value >>= 7
            head.append(value)
        return bytes(head) + payload
    num = {m: {f.name: f.number for f in m.DESCRIPTOR.fields}
           for m in (onnx.GraphProto, onnx.NodeProto, onnx.AttributeProto, onnx.ModelProto)}
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "leaf", [], [_vi("Y")])
    data = graph.SerializeToString()
    for _ in range(depth):
        attr = helper.make_attribute("then_branch", graph).SerializeToString()
        attr = attr + field(num[onnx.AttributeProto]["g"], data)  # the nested graph replaces the leaf
        node = helper.make_node("If", ["c"], ["Y"]).SerializeToString()
        node += field(num[onnx.NodeProto]["attribute"], attr)
        data = field(num[onnx.GraphProto]["node"], node) + field(num[onnx.GraphProto]["output"],
                                                                   _vi("Y").SerializeToString())
    model = helper.make_model(helper.make_graph([], "top", [], []), opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString() + field(num[onnx.ModelProto]["graph"], data)


def _write_outside(folder) -> onnx.ModelProto:
    (folder.parent / "outside.bin").write_bytes(b"\0" * 432)   # exists, so only the location is wrong
    return onnx_model(inits=[_external("../outside.bin"), _bias()])


def _write_short_data(**extra):
    def make(folder) -> onnx.ModelProto:
        (folder / "w.bin").write_bytes(b"\0" * 16)
        return onnx_model(inits=[_external("w.bin", **extra), _bias()])
    return make


def _w(shape, name="W"):
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


N = helper.make_node
#: name: (the model, or a function writing side files into the model's folder and returning it; match)
ONNX_CASES = {
    "cycle": (onnx_model([N("Add", ["X", "b"], ["a"], name="A"), N("Relu", ["a"], ["b"], name="B"),
                          N("Relu", ["a"], ["Y"], name="C")]), r"cycle .*'A'.*'B'"),
    "dangling_name": (onnx_model([N("Add", ["X", "nowhere"], ["Y"], name="add")]),
                      r"'add' \(Add\) reads 'nowhere'.*dangling"),
    "missing_initializer": (onnx_model(inits=[_bias()]), r"'conv' \(Conv\) reads 'W'.*initializer"),
    "raw_data_wrong_length": (onnx_model(inits=[_tensor([4, 3, 3, 3], raw_data=b"\0" * 424), _bias()]),
                              r"'W' has dims \[4, 3, 3, 3\] \(108 values\) but 424 bytes"),
    "absurd_dims_raw": (onnx_model(inits=[_tensor([2 ** 40], raw_data=b"\0" * 16), _bias()]),
                        r"'W' has dims \[1099511627776\]"),
    "absurd_dims_float_data": (onnx_model(inits=[_tensor([2 ** 20, 2 ** 20], float_data=[1, 2]), _bias()]),
                               r"'W' \(dims \[1048576, 1048576\]\) cannot be read"),
    "negative_dims": (onnx_model(inits=[_tensor([-4, 3, 3, 3], raw_data=b"\0" * 432), _bias()]),
                      r"'W' has negative dims"),
    "conv_weight_wrong_channels": (onnx_model(inits=[_w((4, 5, 3, 3)), _bias()]),
                                   r"'conv': weight 'W' of shape \[4, 5, 3, 3\].*'X' has shape \[1, 3, 8, 8\]"),
    "conv_bias_wrong_length": (onnx_model(inits=[_w((4, 3, 3, 3)), _w(7, "B")]), r"bias 'B' has shape \[7\]"),
    "conv_group_zero": (onnx_model([N("Conv", ["X", "W"], ["Y"], name="conv", group=0)]), r"'conv'.* group 0"),
    "duplicate_output": (onnx_model([N("Relu", ["X"], ["Y"], name="r1"), N("Sigmoid", ["X"], ["Y"], name="r2")]),
                         r"'Y' is written by two nodes, node 'r1' \(Relu\) and node 'r2'"),
    "duplicate_initializer": (onnx_model(inits=[_bias(), _bias(), _w((4, 3, 3, 3))]),
                              r"two initializers are named 'B'"),
    "no_outputs": (onnx_model(outputs=[]), r"declares no outputs"),
    "output_never_written": (onnx_model(outputs=[_vi("Z")]), r"graph output 'Z' is not written"),
    "absurd_input_dims": (onnx_model(inputs=[_vi("X", [1, 3, 2 ** 40, 8])]), r"input 'X' .*2\*\*31"),
    "negative_input_dims": (onnx_model(inputs=[_vi("X", [1, 3, -8, 8])]), r"input 'X' .*negative"),
    "external_data_outside_folder": (_write_outside, r"outside the directory.*model's folder"),
    "external_data_absolute_path": (onnx_model(inits=[_external("/etc/hostname"), _bias()]),
                                    r"absolute path.*model's folder"),
    "external_data_too_short": (_write_short_data(), r"'W' has dims \[4, 3, 3, 3\] \(108 values\) but 16 bytes"),
    "external_data_absurd_length": (_write_short_data(length=2 ** 40), r"length \(1099511627776\) exceeds"),
    "nested_too_deep": (_nested_ifs(200), r"not a readable ONNX model"),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx(case, tmp_path):
    model, match = ONNX_CASES[case]
    folder = tmp_path / "model"
    folder.mkdir()
    model = model(folder) if callable(model) else model
    src = folder / "model.onnx"
    src.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    refused(src, match)


def _cut_points() -> dict:
    data = onnx_model().SerializeToString()
    no_opsets = onnx_model()
    del no_opsets.opset_import[:]       # fields are written in number order: the opsets come last
    return {0: "holds no graph", 2: "holds no graph", len(data) // 3: "not a readable ONNX",
            len(data) // 2: "not a readable ONNX", len(no_opsets.SerializeToString()): "declares no opset",
            len(data) - 3: "not a readable ONNX"}


@pytest.mark.parametrize("cut, match", sorted(_cut_points().items()))
def test_onnx_truncated(cut, match, tmp_path):
    src = tmp_path / "cut.onnx"
    src.write_bytes(onnx_model().SerializeToString()[:cut])
    refused(src, match)


def test_onnx_weight_given_as_graph_input_is_a_runtime_input(tmp_path):
    """ONNX allows a weight to be a graph input with no initializer (the node conformance tests do it
    everywhere); dcrt keeps it an input of the converted model, fed at run time, not a weight."""
    src, out = tmp_path / "w_input.onnx", tmp_path / "w_input.dcm"
    onnx.save(onnx_model(inits=[_bias()], inputs=[_vi("X", [1, 3, 8, 8]), _vi("W", [4, 3, 3, 3])]), str(src))
    convert(str(src), str(out))
    sess = dcrt.Session(str(out))
    assert [i.name for i in sess.get_inputs()] == ["X", "W"]
    w = np.full((4, 3, 3, 3), 0.5, np.float32)
    (y,) = sess.run(None, {"X": np.ones((1, 3, 8, 8), np.float32), "W": w})
    assert y.shape == (1, 4, 8, 8) and np.isclose(y[0, 0, 4, 4], 13.5)


# ---------------------------------------------------------------------------------------------------
# Keras: x (6, 6, 2) -> Conv2D 'conv' -> Flatten 'flat' -> Dense 'd1' (5) -> Dense 'd2' (2)
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    keras = pytest.importorskip("keras", reason="the Keras cases damage files saved by keras")
    L = keras.layers
    x = keras.Input((6, 6, 2), name="x")
    h = L.Flatten(name="flat")(L.Conv2D(3, 3, name="conv")(x))
    y = L.Dense(2, name="d2")(L.Dense(5, activation="relu", name="d1")(h))
    model = keras.Model(x, y)
    folder = tmp_path_factory.mktemp("keras")
    model.save(str(folder / "good.h5"))
    model.save(str(folder / "good.keras"))
    return folder


def _h5_weight(f, layer: str, index: int) -> str:
    name = f["model_weights"][layer].attrs["weight_names"][index]
    return f"model_weights/{layer}/{name.decode() if isinstance(name, bytes) else name}"


def _replace(f, path: str, value) -> None:
    del f[path]
    f[path] = value


def _transpose(f, layer: str):
    path = _h5_weight(f, layer, 0)
    _replace(f, path, np.array(f[path]).T)


def _swap_conv_channels(f):
    path = _h5_weight(f, "conv", 0)
    _replace(f, path, np.array(f[path]).transpose(0, 1, 3, 2))   # [3, 3, 2, 3] -> [3, 3, 3, 2]


def _unwritten_huge(f):
    path = _h5_weight(f, "d1", 0)
    del f[path]
    f.create_dataset(path, shape=(2 ** 20, 2 ** 20), dtype="f4", chunks=(64, 64))  # 4 TB declared, 0 stored


def _external_file(f):
    path = _h5_weight(f, "d1", 0)
    del f[path]   # the kernel's 48 x 5 values "stored" in a file outside the model: any file at all
    f.create_dataset(path, shape=(48, 5), dtype="f4", external=[(os.path.abspath(__file__), 0, 48 * 5 * 4)])


def _config(edit):
    def run(f):
        config = json.loads(f.attrs["model_config"])
        layers = {layer["name"]: layer for layer in config["config"]["layers"]}
        edit(layers)
        f.attrs["model_config"] = json.dumps(config)
    return run


def _rewire(layer: str, old: str, new):
    """Make ``layer`` read tensor ``new`` ([name, node, index]) instead of layer ``old``'s output."""
    def edit(layers):
        text = json.dumps(layers[layer]["inbound_nodes"])
        assert f'["{old}", 0, 0]' in text, text
        layers[layer]["inbound_nodes"] = json.loads(text.replace(f'["{old}", 0, 0]', json.dumps(new)))
    return _config(edit)


def _input_shape(shape):
    return _config(lambda layers: layers["x"]["config"].update(batch_shape=shape))


def _rename(layers):
    layers["d2"]["name"] = layers["d2"]["config"]["name"] = "d1"


def _set_attr(text):
    def run(f):
        f.attrs["model_config"] = text
    return run


KERAS_CASES = {
    "missing_weight_dataset": (lambda f: f.__delitem__(_h5_weight(f, "d1", 0)),
                               r"weight 'd1/kernel' of layer 'd1' is missing"),
    "missing_weight_group": (lambda f: f.__delitem__("model_weights/d1"), r"'d1' \(Dense\) has 0 weight array"),
    "dense_kernel_transposed": (lambda f: _transpose(f, "d1"),
                                r"'d1' \(Dense\): its kernel has shape \[5, 48\].*need \[48, 5\]"),
    "dense_bias_wrong_length": (lambda f: _replace(f, _h5_weight(f, "d2", 1), np.zeros(7, np.float32)),
                                r"'d2' \(Dense\): its bias has shape \[7\]"),
    "conv_kernel_wrong_channels": (_swap_conv_channels, r"'conv' \(Conv2D\): its kernel has shape \[3, 3, 3, 2\]"),
    "weight_declares_terabytes": (_unwritten_huge, r"declares shape \[1048576, 1048576\].*stores 0 bytes"),
    "weight_in_an_external_file": (_external_file, r"weight .*d1/kernel keeps its values in other files"),
    "dangling_inbound_layer": (_rewire("d2", "d1", ["ghost", 0, 0]), r"'d2' reads the output of layer 'ghost'"),
    "cycle": (_rewire("d1", "flat", ["d2", 0, 0]), r"'d1' waits for 'd2', 'd2' waits for 'd1' \(a cycle"),
    "missing_call_of_a_layer": (_rewire("d2", "d1", ["d1", 3, 0]), r"'d2' waits for 'd1' \(call 3, output 0\)"),
    "duplicate_layer_name": (_config(_rename), r"several layers are named 'd1'"),
    "absurd_input_dims": (_input_shape([None, 2 ** 40, 6, 2]), r"input 'x' .*2\*\*31"),
    "negative_input_dims": (_input_shape([None, -6, 6, 2]), r"input 'x' .*negative"),
    "non_integer_input_dims": (_input_shape([None, "six", 6, 2]), r"input 'x' .*whole numbers"),
    "config_not_json": (_set_attr('{"class_name": "Functional", "config": {"layers": ['),
                        r"model_config is not valid JSON"),
    "config_nested_too_deep": (_set_attr("[" * 100000 + "]" * 100000), r"model_config is nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_keras_h5(case, keras_files, tmp_path):
    damage, match = KERAS_CASES[case]
    src = tmp_path / "model.h5"
    shutil.copy(keras_files / "good.h5", src)
    with h5py.File(src, "r+") as f:
        damage(f)
    refused(src, match)


def test_keras_unknown_layer_class(keras_files, tmp_path):
    src = tmp_path / "model.h5"
    shutil.copy(keras_files / "good.h5", src)
    with h5py.File(src, "r+") as f:
        _config(lambda layers: layers["d2"].update(class_name="FancyDense"))(f)
    refused(src, r"FancyDense 'd2' \(not supported\)", error=UnsupportedOperatorError)


@pytest.mark.parametrize("ext, cut, match", [
    ("h5", 100, "truncated"), ("h5", 0.5, "truncated"), ("h5", -100, "truncated"),
    ("keras", 30, "truncated or damaged zip"), ("keras", 0.5, "truncated or damaged zip"),
    ("keras", -10, "truncated or damaged zip")])
def test_keras_truncated(ext, cut, match, keras_files, tmp_path):
    data = (keras_files / f"good.{ext}").read_bytes()
    src = tmp_path / f"cut.{ext}"
    src.write_bytes(data[:int(len(data) * cut) if isinstance(cut, float) else cut])
    refused(src, match)


def test_keras_not_a_model_file(tmp_path):
    src = tmp_path / "notes.h5"
    src.write_text("these are my notes, not a model\n")
    refused(src, "neither an HDF5 .* nor a zip")


def _edit_keras_zip(src, dst, edit=None, forge_size=None):
    """Copy a .keras zip, editing its model.weights.h5 with h5py, or forging its declared size."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename == "model.weights.h5" and edit:
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "r+") as f:
                    edit(f)
                data = buffer.getvalue()
            out.writestr(info.filename, data)
    if forge_size:   # the central directory's uncompressed size of model.weights.h5 (a zip bomb's claim)
        raw = bytearray(dst.read_bytes())
        entry = raw.index(b"PK\x01\x02")
        while raw[entry + 46:entry + 46 + 16] != b"model.weights.h5":
            entry = raw.index(b"PK\x01\x02", entry + 4)
        raw[entry + 24:entry + 28] = forge_size.to_bytes(4, "little")
        dst.write_bytes(bytes(raw))


def test_keras_zip_weights_wrong_shape(keras_files, tmp_path):
    src = tmp_path / "model.keras"
    _edit_keras_zip(keras_files / "good.keras", src,
                    edit=lambda f: _replace(f, "layers/dense/vars/0", np.array(f["layers/dense/vars/0"]).T))
    refused(src, r"'d1' \(Dense\): its kernel has shape \[5, 48\]")


def test_keras_zip_bomb(keras_files, tmp_path):
    src = tmp_path / "bomb.keras"
    _edit_keras_zip(keras_files / "good.keras", src, forge_size=0xFFFFFFF0)
    refused(src, r"model\.weights\.h5 claims 4294967280 bytes")


# ---------------------------------------------------------------------------------------------------
# Caffe: data [1, 3, 8, 8] -> conv1 (4, 3x3) -> relu1 (in place) -> ip1 (5)
# ---------------------------------------------------------------------------------------------------

PROTOTXT = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1" inner_product_param { num_output: 5 } }
"""
BLOBS = {"conv1": [[4, 3, 3, 3], [4]], "ip1": [[5, 144], [5]]}


def caffemodel(blobs=None, rename=None) -> bytes:
    net = caffe_pb2.NetParameter(name="tiny")
    for name, shapes in (BLOBS if blobs is None else blobs).items():
        layer = net.layer.add(name=(rename or {}).get(name, name))
        for shape in shapes:
            layer.blobs.add(shape=caffe_pb2.BlobShape(dim=shape), data=[0.5] * int(np.prod(shape)))
    return net.SerializeToString()


def _prototxt(old: str, new: str) -> str:
    assert old in PROTOTXT
    return PROTOTXT.replace(old, new)


def _first_layer_only() -> int:
    """A cut right after the caffemodel's first layer: it still parses (protobuf fields are written
    in order), so the damage shows as a layer without weights."""
    return len(caffemodel({"conv1": BLOBS["conv1"]}))


CAFFE_CASES = {
    "prototxt_syntax_error": (_prototxt("kernel_size: 3 }", "kernel_size: 3 }}"), None, r"not a Caffe network"),
    "dangling_bottom": (_prototxt('bottom: "conv1" top: "ip1"', 'bottom: "conv9" top: "ip1"'), None,
                        r"'ip1' reads blob\(s\) conv9 that no earlier layer writes"),
    "reads_a_later_top": (_prototxt('bottom: "data" top: "conv1"', 'bottom: "ip1" top: "conv1"'), None,
                          r"'conv1' reads blob\(s\) ip1 .*only written by a later layer: a cycle"),
    "blob_count_mismatch": (PROTOTXT, caffemodel({"conv1": [[5, 3, 3, 3], [5]], "ip1": BLOBS["ip1"]}),
                            r"'conv1' \(Convolution\): a weight blob .*\[5, 3, 3, 3\] where \[4, 3, 3, 3\]"),
    "blob_transposed": (PROTOTXT, caffemodel({"conv1": BLOBS["conv1"], "ip1": [[144, 5], [5]]}),
                        r"'ip1' \(InnerProduct\): a weight blob of shape \[144, 5\] where \[5, 144\]"),
    "blob_channels_swapped": (PROTOTXT, caffemodel({"conv1": [[3, 4, 3, 3], [4]], "ip1": BLOBS["ip1"]}),
                              r"'conv1' .*\[3, 4, 3, 3\] where \[4, 3, 3, 3\].*does not belong"),
    "absurd_num_output": (_prototxt("num_output: 5", "num_output: 2147483647"), None,
                          r"'ip1' .*where \[2147483647, 144\] is expected"),
    "absurd_num_output_no_weights": (_prototxt("num_output: 5", "num_output: 4294967295"),
                                     caffemodel({"conv1": BLOBS["conv1"]}),
                                     r"'ip1' \(InnerProduct\) has no weights"),
    "absurd_kernel": (_prototxt("kernel_size: 3", "kernel_size: 2147483647"), None,
                      r"'conv1' .*where \[4, 3, 2147483647, 2147483647\]"),
    "absurd_input_dims": (_prototxt("dim: 8 dim: 8", "dim: 1099511627776 dim: 8"), None,
                          r"Input layer 'data' has shape .*2\*\*31"),
    "negative_input_dims": (_prototxt("dim: 8 dim: 8", "dim: -8 dim: 8"), None, r"Input layer 'data' .*negative"),
    "absurd_net_input": ('name: "n"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 4294967296 dim: 8 }\n'
                         + PROTOTXT.split("\n", 2)[2], None, r"net input 'data' .*2\*\*31"),
    "zero_stride": (_prototxt("kernel_size: 3", "kernel_size: 3 stride: 0"), None, r"'conv1' .*stride 0"),
    "zero_group": (_prototxt("kernel_size: 3", "kernel_size: 3 group: 0"), None, r"'conv1' .*group 0"),
    "zero_pooling_stride": (_prototxt('layer { name: "ip1"', 'layer { name: "pool" type: "Pooling" '
                                      'bottom: "conv1" top: "pool" pooling_param { kernel_size: 2 stride: 0 } }\n'
                                      'layer { name: "ip1"'), None, r"'pool' \(Pooling\) has stride 0"),
    "layer_names_do_not_match": (PROTOTXT, caffemodel(rename={"conv1": "convA", "ip1": "ipB"}),
                                 r"'conv1' .*no weights .*it has weights for: convA, ipB"),
    "caffemodel_cut_after_a_layer": (PROTOTXT, caffemodel()[:_first_layer_only()],
                                     r"'ip1' .*no weights .*it has weights for: conv1\)"),
}
CAFFE_CASES.update({f"caffemodel_cut_at_{cut}": (PROTOTXT, caffemodel()[:cut], match) for cut, match in
                    [(1, "not a readable .caffemodel"), (6, "holds no layers"), (7, "not a readable .caffemodel"),
                     (1700, "not a readable .caffemodel"), (len(caffemodel()) - 5, "not a readable .caffemodel")]})


@pytest.mark.parametrize("case", sorted(CAFFE_CASES))
def test_caffe(case, tmp_path):
    prototxt, weights, match = CAFFE_CASES[case]
    (tmp_path / "deploy.prototxt").write_text(prototxt)
    (tmp_path / "w.caffemodel").write_bytes(caffemodel() if weights is None else weights)
    refused(tmp_path / "deploy.prototxt", match, weights=tmp_path / "w.caffemodel")


def test_the_base_models_convert(keras_files, tmp_path):
    """The damage is what each case is refused for: the undamaged files convert."""
    onnx.save(onnx_model(), str(tmp_path / "m.onnx"))
    convert(str(tmp_path / "m.onnx"), str(tmp_path / "onnx.dcm"))
    convert(str(keras_files / "good.h5"), str(tmp_path / "h5.dcm"))
    convert(str(keras_files / "good.keras"), str(tmp_path / "keras.dcm"))
    (tmp_path / "deploy.prototxt").write_text(PROTOTXT)
    (tmp_path / "w.caffemodel").write_bytes(caffemodel())
    convert(str(tmp_path / "deploy.prototxt"), str(tmp_path / "caffe.dcm"), weights=str(tmp_path / "w.caffemodel"))


# ---------------------------------------------------------------------------------------------------
# the command line, in a process that may not allocate more than 1 GB
# ---------------------------------------------------------------------------------------------------

def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("kind", ["onnx", "keras", "caffe"])
def test_cli_refuses_absurd_sizes_without_allocating(kind, keras_files, tmp_path):
    args, name = [], ""
    if kind == "onnx":
        src, name = tmp_path / "m.onnx", "'W' has dims [1099511627776]"
        onnx.save(onnx_model(inits=[_tensor([2 ** 40], raw_data=b"\0" * 16), _bias()]), str(src))
    elif kind == "keras":
        src, name = tmp_path / "m.h5", "declares shape [1048576, 1048576]"
        shutil.copy(keras_files / "good.h5", src)
        with h5py.File(src, "r+") as f:
            _unwritten_huge(f)
    else:
        src, name = tmp_path / "deploy.prototxt", "2147483647"
        src.write_text(_prototxt("num_output: 5", "num_output: 2147483647"))
        (tmp_path / "w.caffemodel").write_bytes(caffemodel())
        args = ["--weights", str(tmp_path / "w.caffemodel")]
    out = tmp_path / "out.dcm"
    run = subprocess.run([sys.executable, "-m", "dcrt", "convert", str(src), "-o", str(out), *args],
                         capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("dcrt: error: ") and name in run.stderr, run.stderr
    assert not any(leak in run.stderr for leak in LEAKS), run.stderr
    assert not out.exists()
