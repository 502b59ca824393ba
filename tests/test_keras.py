"""The Keras frontend on real files written by Keras itself (.keras and .h5), checked against Keras's
own ``predict``; refusals (Lambda and custom layers, broken files) are messages, never code run."""
from __future__ import annotations

import json
import os

os.environ.setdefault("KERAS_BACKEND", "numpy")  # before keras is imported: no TensorFlow needed

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras", reason="the Keras frontend tests build their models with keras")
if keras.backend.backend() == "numpy":  # Keras's numpy backend computes convolutions with jax
    pytest.importorskip("jax", reason="Keras's numpy backend needs jax for convolutions")

import dcrt  # noqa: E402
from dcrt.converters.convert import convert  # noqa: E402
from dcrt.converters.keras_frontend import from_keras  # noqa: E402
from dcrt.errors import ConversionError, UnsupportedOperatorError  # noqa: E402
from dcrt.format import open_dcm  # noqa: E402

import keras_caffe_models as models  # noqa: E402  (examples/, on the path through conftest)

LOSSLESS = dict(prune=False, bits=32)
# Keras's numpy backend trips numpy 2's __array__(copy=) deprecation on every call: not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def built():
    """``built(name)``: (model, input batch, Keras's predictions), built once per module."""
    cache = {}

    def make(name):
        if name not in cache:
            model = models.KERAS_MODELS[name]()
            x = models.keras_input(model, batch=3, seed=7)
            ref = model.predict(x, verbose=0)
            cache[name] = (model, x, ref if isinstance(ref, list) else [ref])
        return cache[name]
    return make


def run_dcm(path, x):
    sess = dcrt.Session(str(path))
    return sess.run(None, {sess.get_inputs()[0].name: x})


def assert_close(got, ref, rel=1e-4):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        err = float(np.max(np.abs(g - r))) / max(float(np.max(np.abs(r))), 1e-12)
        assert err <= rel, f"relative error {err:.2e}"


@pytest.mark.parametrize("ext", ["keras", "h5"])
@pytest.mark.parametrize("name", sorted(models.KERAS_MODELS))
def test_matches_keras_predict(name, ext, built, tmp_path):
    model, x, ref = built(name)
    src = tmp_path / f"{name}.{ext}"
    model.save(str(src))
    out = tmp_path / f"{name}.dcm"
    convert(str(src), str(out), **LOSSLESS)
    assert_close(run_dcm(out, x), ref)


def test_graph_keeps_nhwc_io_and_keras_names(built, tmp_path):
    model, _, _ = built("residual_cnn")
    src = tmp_path / "m.keras"
    model.save(str(src))
    graph = from_keras(str(src)).graph
    assert [(v.name, v.shape) for v in graph.inputs] == [("image", ["batch", 16, 16, 3])]
    assert [v.name for v in graph.outputs] == ["probs"]
    inits = graph.initializers
    kernel = model.get_layer("block0_conv1").get_weights()[0]          # HWIO
    assert np.array_equal(inits["block0_conv1.weight"], kernel.transpose(3, 2, 0, 1))  # OIHW
    dense = model.get_layer("probs").get_weights()[0]                  # [in, out]
    gemm = next(n for n in graph.nodes if n.name == "probs")
    assert gemm.op_type == "Gemm" and gemm.attrs["transB"] == 1
    assert np.array_equal(inits["probs.weight"], dense.T)
    assert {"stem_bn.mean", "stem_bn.var", "probs.bias"} <= set(inits)
    names = {n.name for n in graph.nodes}
    assert {"stem", "stem_bn", "block1_add", "pool", "flatten", "probs"} <= names
    # one Transpose in (NHWC -> NCHW) and one before Flatten: Keras flattens in NHWC order
    assert [n.name for n in graph.nodes if n.op_type == "Transpose"] == ["image.nchw", "avg.nhwc"]


def test_lstm_gates_reordered_for_onnx(built, tmp_path):
    model, _, _ = built("lstm_classifier")
    src = tmp_path / "m.keras"
    model.save(str(src))
    inits = from_keras(str(src)).graph.initializers
    kernel, _, _ = model.get_layer("lstm2").get_weights()
    i, f, c, o = np.split(kernel.T, 4)  # Keras: i, f, c, o
    assert np.array_equal(inits["lstm2.weight"][0], np.concatenate([i, o, f, c]))  # ONNX: i, o, f, c


# -- tf.keras 2.x files ----------------------------------------------------------------------------


def _k2_refs(value):
    """Keras 3 node arguments -> Keras 2 references [layer, node, tensor, {}]."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        h = value["config"]["keras_history"]
        return [[h[0], h[1], h[2], {}]]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _k2_refs(v)]
    return []


def _k2_layer(cfg):
    """A Keras 3 layer config in the Keras 2 dialect (dtype strings, batch_input_shape, alpha)."""
    c = dict(cfg["config"])
    c["dtype"] = "float32" if cfg["class_name"] != "InputLayer" else c.get("dtype", "float32")
    if "batch_shape" in c:
        c["batch_input_shape"] = c.pop("batch_shape")
    if cfg["class_name"] == "LeakyReLU":
        c["alpha"] = c.pop("negative_slope")
    if cfg["class_name"] == "BatchNormalization":
        c["axis"] = [3]
    return c


def save_tf_keras_h5(model, path):
    """Write ``model`` the way tf.keras 2.x's ``model.save('m.h5')`` does: a Keras 2 ``model_config``
    (functional: nested-list inbound nodes) and ``model_weights/<layer>/<layer>/<var>:0`` datasets."""
    cfg = model.get_config()
    if isinstance(model, keras.Sequential):
        config = {"class_name": "Sequential", "config": {"name": cfg["name"], "layers": [
            {"class_name": l["class_name"], "config": _k2_layer(l)} for l in cfg["layers"]]}}
    else:
        layers = [{"class_name": l["class_name"], "name": l["name"], "config": _k2_layer(l),
                   "inbound_nodes": [_k2_refs(n["args"]) for n in l["inbound_nodes"]]} for l in cfg["layers"]]
        ends = {k: cfg[k] if isinstance(cfg[k][0], list) else [cfg[k]]  # one tensor: a bare reference
                for k in ("input_layers", "output_layers")}
        config = {"class_name": "Functional", "config": {"name": cfg["name"], "layers": layers, **ends}}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config)
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [l.name.encode() for l in model.layers]
        for layer in model.layers:
            lg = group.create_group(layer.name)
            names = []
            for w in layer.weights:
                cell = "lstm_cell/" if "lstm" in type(layer).__name__.lower() else ""
                names.append(f"{layer.name}/{cell}{w.name}:0")
                lg.create_dataset(names[-1], data=np.asarray(w))
            lg.attrs["weight_names"] = [n.encode() for n in names]


@pytest.mark.parametrize("name", ["residual_cnn", "dcgan_generator", "lstm_classifier"])
def test_tf_keras_2_h5(name, built, tmp_path):
    model, x, ref = built(name)
    src = tmp_path / f"{name}.h5"
    save_tf_keras_h5(model, str(src))
    out = tmp_path / f"{name}.dcm"
    convert(str(src), str(out), **LOSSLESS)
    assert_close(run_dcm(out, x), ref)


# -- compression -----------------------------------------------------------------------------------


def test_default_compression_decodes_exactly(built, tmp_path):
    model, x, ref = built("residual_cnn")
    src = tmp_path / "m.keras"
    model.save(str(src))
    out = tmp_path / "m.dcm"
    result = convert(str(src), str(out))
    assert result.records
    dcm = open_dcm(str(out))
    for name, tensor in dcm.tensors.items():
        assert np.array_equal(tensor.decode(), result.weights[name]), name
    probs = run_dcm(out, x)[0]
    assert probs.shape == ref[0].shape and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_pruned_and_clustered_model_is_kept_exactly(tmp_path):
    """A model pruned and clustered elsewhere (what tfmot's strip_pruning / strip_clustering save:
    plain layers whose kernels hold zeros and a few shared values) keeps its weights bit for bit."""
    L = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 3), name="img"), L.Conv2D(16, 3, name="conv"),
                              L.Flatten(name="flat"), L.Dense(10, name="fc")])
    rng = np.random.default_rng(0)
    for layer in (model.get_layer("conv"), model.get_layer("fc")):
        kernel, bias = layer.get_weights()
        shared = rng.normal(0, 0.2, 6).astype("float32")[rng.integers(0, 6, kernel.shape)]
        layer.set_weights([shared * (rng.random(kernel.shape) > 0.8), bias])
    src = tmp_path / "pruned.keras"
    model.save(str(src))
    result = convert(str(src), str(tmp_path / "pruned.dcm"), prune=False)  # default codebook sizes
    dcm = open_dcm(str(tmp_path / "pruned.dcm"))
    conv, fc = model.get_layer("conv").get_weights()[0], model.get_layer("fc").get_weights()[0]
    assert np.array_equal(dcm.tensors["conv.weight"].decode(), conv.transpose(3, 2, 0, 1))
    assert np.array_equal(dcm.tensors["fc.weight"].decode(), fc.T)
    assert result.records["fc.weight"].stats.sparsity == pytest.approx(np.mean(fc == 0))


# -- refusals --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="dcrt_test")
class Doubler(keras.layers.Layer):
    """A custom layer: code that lives in the user's program, not in the file."""

    def call(self, x):
        return x * 2.0


# Keras's numpy backend builds the model by calling its layers on uninitialised arrays: the custom
# layer's ``x * 2.0`` then may overflow, a numpy warning about Keras's placeholder, not about dcrt.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning",
                            "ignore:invalid value encountered in multiply:RuntimeWarning")
def test_lambda_and_custom_layers_are_refused_without_running_them(tmp_path):
    sentinel = tmp_path / "ran"

    def touch_and_double(t):
        sentinel.touch()
        return t * 2.0

    L = keras.layers
    x_in = keras.Input((4,), name="x")
    h = L.Dense(3, name="dense")(x_in)
    h = L.Lambda(touch_and_double, output_shape=(3,), name="double_it")(h)
    h = Doubler(name="my_doubler")(h)
    model = keras.Model(x_in, h)
    for ext in ("keras", "h5"):
        src = tmp_path / f"lam.{ext}"
        model.save(str(src))
        sentinel.unlink(missing_ok=True)       # building the model ran the lambda; converting must not
        with pytest.raises(UnsupportedOperatorError) as info:
            convert(str(src), str(tmp_path / f"lam_{ext}.dcm"))
        message = str(info.value)
        assert "Lambda 'double_it'" in message and "never executes code" in message
        assert "Doubler 'my_doubler'" in message           # every problem in one message
        assert info.value.ops == ["Doubler", "Lambda"]
        assert not sentinel.exists()
        assert not (tmp_path / f"lam_{ext}.dcm").exists()


def test_broken_files_are_conversion_errors(tmp_path, built):
    with pytest.raises(ConversionError, match="model.h5: no such file"):
        from_keras("model.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(ConversionError, match="bad.h5"):
        from_keras(str(bad))
    not_keras = tmp_path / "x.keras"
    import zipfile
    with zipfile.ZipFile(not_keras, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ConversionError, match="config.json"):
        from_keras(str(not_keras))
    model, _, _ = built("residual_cnn")
    weights_only = tmp_path / "w.weights.h5"
    with h5py.File(weights_only, "w") as f:  # what model.save_weights wrote in Keras 2
        f.attrs["layer_names"] = [b"stem"]
    with pytest.raises(ConversionError, match="weights only"):
        from_keras(str(weights_only))


@pytest.mark.parametrize("small_first", [True, False])
def test_merge_layers_broadcast_whichever_input_comes_first(small_first, tmp_path):
    """A squeeze-and-excitation block, ``Multiply()([scale (N,1,1,C), x (N,8,8,C)])``: the output is
    8x8 (the frontend took the first input's shape, so a stride-2 'same' Conv after it was padded for
    a 1x1 map), and a broadcast Add before Flatten + Dense was refused as a damaged file."""
    layers = keras.layers
    inp = keras.Input((8, 8, 4))
    y = layers.Conv2D(4, 1)(inp)
    s = layers.Dense(4, activation="sigmoid")(layers.GlobalAveragePooling2D(keepdims=True)(y))
    m = layers.Multiply()([s, y] if small_first else [y, s])
    z = layers.Conv2D(3, 3, strides=2, padding="same")(m)
    a = layers.Add()([layers.GlobalAveragePooling2D(keepdims=True)(inp), inp] if small_first else
                     [inp, layers.GlobalAveragePooling2D(keepdims=True)(inp)])
    d = layers.Dense(2)(layers.Flatten()(a))
    model = keras.Model(inp, [z, d])
    models.randomize(model, 3)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    model.save(str(tmp_path / "se.keras"))
    convert(str(tmp_path / "se.keras"), str(tmp_path / "se.dcm"), **LOSSLESS)
    assert_close(run_dcm(tmp_path / "se.dcm", x), [np.asarray(r) for r in model.predict(x, verbose=0)])


def _lossless_modes(model, x, path):
    """The model saved, converted lossless and run in every mode, against Keras's predictions."""
    model.save(str(path))
    convert(str(path), str(path.with_suffix(".dcm")), **LOSSLESS)
    ref = model.predict(x, verbose=0)
    ref = [np.asarray(r) for r in (ref if isinstance(ref, list) else [ref])]
    for mode in ("index", "dense", "stream"):
        sess = dcrt.Session(str(path.with_suffix(".dcm")), mode=mode)
        got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], x if isinstance(x, list) else [x])))
        assert [g.dtype for g in got] == [np.dtype(np.float32)] * len(got)
        assert_close(got, ref)


def test_integer_inputs_are_computed_in_float32(tmp_path):
    """A uint8 image into Rescaling and Conv2D, int32 features into Dense: Keras computes in float32
    (dcrt kept the integer type, so outputs came back truncated: Rescaling gave all zeros)."""
    layers = keras.layers
    image = keras.Input((6, 6, 3), dtype="uint8")
    conv = layers.Conv2D(4, 3)(layers.Rescaling(1 / 255)(image))
    feats = keras.Input((5,), dtype="int32")
    model = keras.Model([image, feats], [conv, layers.Dense(3)(feats)])
    models.randomize(model, 1)
    rng = np.random.default_rng(0)
    x = [rng.integers(0, 256, (2, 6, 6, 3)).astype(np.uint8), rng.integers(-5, 6, (2, 5)).astype(np.int32)]
    _lossless_modes(model, x, tmp_path / "ints.keras")


def test_a_dense_layer_shared_by_a_2d_and_a_3d_input(tmp_path):
    """One Dense called on (N, 8) and on (N, 5, 8): a Gemm with its kernel transposed and a MatMul with
    it as Keras holds it, two weights (both were one name: one call read the other's form)."""
    layers = keras.layers
    shared = layers.Dense(8)
    flat, seq = keras.Input((8,)), keras.Input((5, 8))
    model = keras.Model([flat, seq], [shared(flat), shared(seq)])
    models.randomize(model, 2)
    rng = np.random.default_rng(0)
    _lossless_modes(model, [rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(5, 5, 8)).astype(np.float32)],
                    tmp_path / "shared.keras")


@pytest.mark.parametrize("merge", ["Add", "Multiply"])
def test_merge_layers_expand_a_lower_rank_input_at_axis_1(merge, tmp_path):
    """Keras's merge layers turn (N, C) into (N, 1, C) before broadcasting with (N, T, C); dcrt aligned
    from the right (wrong whenever the batch equals T, an error otherwise)."""
    seq, vec = keras.Input((4, 3)), keras.Input((3,))
    model = keras.Model([seq, vec], getattr(keras.layers, merge)()([seq, vec]))
    rng = np.random.default_rng(0)
    for batch in (4, 2):
        _lossless_modes(model, [rng.normal(size=(batch, 4, 3)).astype(np.float32),
                                rng.normal(size=(batch, 3)).astype(np.float32)], tmp_path / f"{merge}{batch}.keras")


@pytest.mark.parametrize("layer", ["Conv2D", "Conv2DTranspose", "Conv1D"])
def test_a_softmax_activation_of_a_channels_first_conv_is_over_the_last_axis(layer, tmp_path):
    """``activation="softmax"`` is over Keras's last axis: the width for channels_first (dcrt took the
    channels, as for channels_last)."""
    shape = (3, 6) if layer == "Conv1D" else (3, 6, 6)
    inp = keras.Input(shape)
    model = keras.Model(inp, getattr(keras.layers, layer)(4, 3, data_format="channels_first",
                                                          activation="softmax")(inp))
    models.randomize(model, 4)
    _lossless_modes(model, np.random.default_rng(0).normal(size=(2,) + shape).astype(np.float32),
                    tmp_path / f"{layer}.keras")


def test_keras_ops_reshape_is_named_as_unsupported(tmp_path):
    """``keras.ops.reshape`` is saved under the class name Reshape, with other settings than the layer:
    an unsupported-layer message, not "cannot be read" as if the file were damaged."""
    inp = keras.Input((4, 3))
    model = keras.Model(inp, keras.ops.reshape(inp, (-1, 12)))
    model.save(str(tmp_path / "r.keras"))
    with pytest.raises(UnsupportedOperatorError, match=r"keras.ops.reshape \(use a keras.layers.Reshape\)"):
        convert(str(tmp_path / "r.keras"), str(tmp_path / "r.dcm"))
