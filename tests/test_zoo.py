"""The example model zoo builds valid ONNX that onnxruntime runs with sane outputs."""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

# examples/ is not a package (no __init__.py): import the zoo from its directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import zoo  # noqa: E402

ort = pytest.importorskip("onnxruntime")


def _shapes(name: str, b: int) -> dict:
    """Expected output shapes of each small model at batch ``b`` (written out, not read back
    from the model, so a wrong declared shape is caught too)."""
    return {
        "lenet5": {"logits": (b, 10)},
        "lenet_300_100": {"logits": (b, 10)},
        "resnet_small": {"logits": (b, 10)},
        "lstm_classifier": {"probs": (b, 2)},
        "gru_classifier": {"probs": (b, 2)},
        "dcgan_generator": {"image": (b, 3, 32, 32)},
        "resnet18_tiny": {"logits": (b, 10)},
        "mobilenet_v2_tiny": {"logits": (b, 10)},
        "resnet50_tiny": {"logits": (b, 10)},
        "tiny_yolo": {"boxes32": (b, 3, 25, 5, 5), "boxes16": (b, 3, 25, 10, 10)},
        "crnn": {"probs": (24, b, 37)},
        "vgg_fc_small": {"logits": (b, 50)},
        "with_constant_weights": {"logits": (b, 10)},
        "pruned_clustered_mlp": {"logits": (b, 10)},
    }[name]


BATCH_AXIS = {"crnn": 1}  # time-major output; every other model is batch-first


@lru_cache(maxsize=None)
def _model(name: str) -> onnx.ModelProto:
    return zoo.ZOO[name]()


def _session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feed: dict) -> dict:
    sess = _session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def test_registry():
    assert set(zoo.ZOO) == set(zoo.SMALL) | set(zoo.LARGE)
    assert not set(zoo.SMALL) & set(zoo.LARGE)
    for name in zoo.SMALL:
        _shapes(name, 1)  # every small model has an expected-shape entry


@pytest.mark.parametrize("name", list(zoo.SMALL))
def test_model_is_valid_onnx(name):
    m = _model(name)
    onnx.checker.check_model(m, full_check=True)  # full_check: strict shape inference too
    assert m.ir_version == 8
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    # Named nodes and PyTorch-style weight names, which the converter's reports rely on.
    node_names = [n.name for n in m.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    inits = [t.name for t in m.graph.initializer]
    assert len(set(inits)) == len(inits)
    for n in m.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            assert n.input[1] == f"{n.name}.weight"
            if len(n.input) > 2:
                assert n.input[2] == f"{n.name}.bias"
    # The batch dim is symbolic everywhere.
    for vi in list(m.graph.input) + list(m.graph.output):
        assert "N" in [d.dim_param for d in vi.type.tensor_type.shape.dim], vi.name
    assert zoo.count_params(m) > 0


@pytest.mark.parametrize("name", list(zoo.SMALL))
def test_model_runs(name):
    m = _model(name)
    sess = _session(m)
    declared = {o.name: o for o in m.graph.output}
    results = {}
    for batch in (1, 2):
        feed = zoo.sample_input(m, batch=batch, seed=batch)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        expected = _shapes(name, batch)
        assert set(outs) == set(expected) == set(declared)
        for out_name, y in outs.items():
            assert y.shape == expected[out_name], out_name
            assert y.dtype == np.float32
            assert np.isfinite(y).all(), out_name
            assert y.std() > 0, f"{out_name} is constant"
            # Activations stay O(1): neither saturated nor vanishing.
            assert 1e-3 < float(np.sqrt(np.mean(y.astype(np.float64) ** 2))) < 100
            dims = declared[out_name].type.tensor_type.shape.dim
            assert [d.dim_value or {"N": batch}[d.dim_param] for d in dims] == list(y.shape)
        results[batch] = (feed, outs)
    # Samples are independent: item 0 of the batch-2 run equals a batch-1 run on it alone, which
    # catches Reshapes and Transposes that mix the batch into other dims.
    feed2, outs2 = results[2]
    single = {k: v[:1] for k, v in feed2.items()}
    axis = BATCH_AXIS.get(name, 0)
    for out_name, y in zip([o.name for o in sess.get_outputs()], sess.run(None, single)):
        np.testing.assert_allclose(y, np.take(outs2[out_name], [0], axis=axis),
                                   rtol=1e-4, atol=1e-5, err_msg=out_name)


@pytest.mark.parametrize("name", ["lenet5", "resnet_small", "lstm_classifier", "tiny_yolo"])
def test_deterministic(name):
    a = zoo.ZOO[name]().SerializeToString()
    assert a == zoo.ZOO[name]().SerializeToString()
    fn = getattr(zoo, name)
    assert fn(seed=1).SerializeToString() != a


@pytest.mark.parametrize("builder, shapes", [
    pytest.param(lambda: zoo.resnet18(width=16, num_classes=7, size=64), [(2, 7)], id="resnet18"),
    pytest.param(lambda: zoo.mobilenet_v2(width_mult=0.5, num_classes=7, size=64), [(2, 7)],
                 id="mobilenet_v2"),
    pytest.param(lambda: zoo.resnet50(width=8, size=64, num_classes=7), [(2, 7)], id="resnet50"),
    pytest.param(lambda: zoo.vgg_fc(scale=0.02), [(2, 20)], id="vgg_fc"),
    pytest.param(lambda: zoo.tiny_yolo(size=64), [(2, 3, 25, 2, 2), (2, 3, 25, 4, 4)],
                 id="tiny_yolo"),
    pytest.param(lambda: zoo.crnn(width=64, num_classes=11), [(zoo.crnn_seq_len(64), 2, 11)],
                 id="crnn"),
])
def test_parameterised_variants(builder, shapes):
    m = builder()
    onnx.checker.check_model(m, full_check=True)
    outs = _run(m, zoo.sample_input(m, batch=2))
    assert [y.shape for y in outs.values()] == shapes
    assert all(np.isfinite(y).all() and y.std() > 0 for y in outs.values())


def test_full_size_parameter_counts():
    # torchvision's counts plus the BatchNorm running statistics (buffers there, initializers
    # here) and, for MobileNetV2, the two shared Clip bounds.
    assert zoo.count_params(zoo.resnet18()) == 11_689_512 + 9_600
    assert zoo.count_params(zoo.mobilenet_v2()) == 3_504_872 + 34_112 + 2
    assert zoo.count_params(zoo.resnet50()) == 25_557_032 + 53_120
    assert zoo.count_params(zoo.lenet5()) == 431_080
    assert zoo.count_params(zoo.lenet_300_100()) == 266_610
    # VGG-16 fc6-fc8 at scale 0.1: 2509 -> 410 -> 410 -> 100.
    assert zoo.count_params(zoo.vgg_fc(0.1)) == 2509 * 410 + 410 + 410 * 410 + 410 + 410 * 100 + 100


@pytest.mark.parametrize("sparsity, bits", [(0.9, 5), (0.5, 3), (0.99, 2)])
def test_pruned_clustered_mlp(sparsity, bits):
    m = zoo.pruned_clustered_mlp(sparsity=sparsity, bits=bits)
    dense = {t.name: numpy_helper.to_array(t) for t in zoo.lenet_300_100().graph.initializer}
    weights = 0
    for t in m.graph.initializer:
        w = numpy_helper.to_array(t)
        if not t.name.endswith(".weight"):
            assert np.count_nonzero(w) == w.size  # biases stay dense
            continue
        weights += 1
        assert w.dtype == np.float32
        assert abs((w == 0).mean() - sparsity) < 1e-3, t.name
        nz = w[w != 0]
        assert len(np.unique(nz)) <= 2 ** bits - 1, t.name
        # Survivors are the largest-magnitude dense weights, with their signs kept.
        d = dense[t.name]
        assert np.all(np.sign(w[w != 0]) == np.sign(d[w != 0]))
        assert np.abs(d[w != 0]).min() >= np.abs(d[w == 0]).max()
    assert weights == 3
    outs = _run(m, zoo.sample_input(m, batch=2))
    assert np.isfinite(outs["logits"]).all() and outs["logits"].std() > 0


def test_constant_weights_are_constant_nodes():
    m = zoo.with_constant_weights()
    assert not [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    consts = {n.output[0] for n in m.graph.node if n.op_type == "Constant"}
    assert {"conv1.weight", "conv1.bias", "fc1.weight", "fc2.weight"} <= consts
    assert zoo.count_params(m) == 8 * 9 + 8 + 1568 * 32 + 32 + 32 * 10 + 10


def test_external_data_roundtrip(tmp_path):
    m = zoo.resnet_small()
    path = tmp_path / "resnet_small.onnx"
    for _ in range(2):  # saving twice must replace the data file, not fail or append to it
        zoo.save_with_external_data(m, path)
    data = tmp_path / "resnet_small.data"
    assert data.exists()
    total = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)
    assert total <= data.stat().st_size < 2 * total
    assert path.stat().st_size < 0.2 * data.stat().st_size  # weights are not inline
    # The caller's model is untouched (onnx's conversion strips raw data in place).
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in m.graph.initializer)

    loaded = onnx.load(str(path))  # loads the external data from beside the file
    a = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    onnx.checker.check_model(str(path))

    feed = zoo.sample_input(m, batch=2)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, feed)[0], _run(m, feed)["logits"])


def test_sample_input():
    feed = zoo.sample_input(zoo.lstm_classifier(), batch=3, seed=5)
    assert list(feed) == ["tokens"]
    t = feed["tokens"]
    assert t.dtype == np.int64 and t.shape == (3, 16) and t.min() >= 0 and t.max() < 1000
    assert zoo.sample_input(zoo.lstm_classifier(), batch=2, seq_len=7)["tokens"].shape == (2, 7)
    f = zoo.sample_input(zoo.lenet5(), batch=4)["input"]
    assert f.dtype == np.float32 and f.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(feed["tokens"],
                                  zoo.sample_input(zoo.lstm_classifier(), 3, 5)["tokens"])
