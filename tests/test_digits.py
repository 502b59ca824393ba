"""The real-data benchmark (examples/digits.py): trainer, ONNX export, and the seed-001 table, quickly."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("sklearn")
import digits  # noqa: E402  (examples/ is on sys.path, see conftest.py)

import dcrt  # noqa: E402
from dcrt.converters.accuracy import run_onnx_file  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return digits.load_digits_28()


def test_data_is_a_stratified_mnist_like_split(data):
    x_train, y_train, x_test, y_test = data
    assert x_train.shape[1:] == (1, 28, 28) and x_train.dtype == np.float32
    assert len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert np.all(x_train[:, :, :4] == 0) and np.all(x_train[:, :, 24:] == 0)     # a 20x20 digit, centred
    share = np.bincount(y_test, minlength=10) / np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    assert np.allclose(share, 0.3, atol=0.02)


def _numeric_grad(net, x, y, name, index, eps=1e-4):
    w = net.params[name]
    plus, minus = w.copy(), w.copy()
    plus[index] += eps
    minus[index] -= eps
    net.set(name, plus)
    lp = digits.softmax_xent(net.forward(x).astype(np.float64), y)[0]
    net.set(name, minus)
    lm = digits.softmax_xent(net.forward(x).astype(np.float64), y)[0]
    net.set(name, w)
    return (lp - lm) / (2 * eps)


def test_trainer_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    net = digits.Net("tiny", [digits.Conv("c1", 1, 3, 3, rng), digits.MaxPool2(), digits.Conv("c2", 3, 4, 3, rng),
                              digits.Flatten(), digits.Dense("d1", 4 * 2 * 2, 6, rng), digits.ReLU(),
                              digits.Dense("d2", 6, 3, rng)], ["N", 1, 10, 10])
    x = rng.standard_normal((5, 1, 10, 10))          # float64 activations: exact enough differences
    y = rng.integers(0, 3, 5)
    _, g = digits.softmax_xent(net.forward(x), y)
    grads = net.backward(g)
    for name in ("c1.weight", "c2.weight", "d1.weight", "d2.bias", "c1.bias"):
        for index in [tuple(rng.integers(0, s) for s in net.params[name].shape) for _ in range(3)]:
            assert grads[name][index] == pytest.approx(_numeric_grad(net, x, y, name, index), rel=0.01, abs=1e-4), \
                (name, index)


@pytest.mark.parametrize("make", [digits.lenet_300_100, digits.lenet5])
def test_onnx_export_computes_what_numpy_does(make, data, tmp_path):
    net = make()
    x = data[2][:32]
    path = str(tmp_path / f"{net.name}.onnx")
    digits.to_onnx(net, path)
    expected = net.forward(x)
    feed = {"input": x.reshape([len(x)] + list(net.input_shape[1:]))}
    np.testing.assert_allclose(run_onnx_file(path, feed)[0], expected, rtol=1e-4, atol=1e-4)
    lossless = str(tmp_path / f"{net.name}.dcm")
    dcrt.convert(path, lossless, prune=False, bits=32)
    np.testing.assert_allclose(dcrt.Session(lossless).run(None, feed)[0], expected, rtol=1e-4, atol=1e-4)
    assert sum(v.size for v in net.params.values()) == {"lenet_300_100": 266_610, "lenet5": 431_080}[net.name]


def test_seed_001_table_for_lenet_300_100(data, tmp_path):
    """Short training; the table's claims: exact U, harmless Q, ~30x P+Q, recovery by data and retraining."""
    x_train, y_train, x_test, y_test = data
    net = digits.lenet_300_100()
    digits.train(net, x_train, y_train, epochs=8)
    trained = digits.accuracy(net, x_test, y_test)
    assert trained > 0.93
    path = str(tmp_path / "lenet_300_100.onnx")
    digits.to_onnx(net, path)
    digits.finetune(net, x_train, y_train, epochs=2, steps=2)
    tuned = str(tmp_path / "lenet_300_100.finetuned.onnx")
    digits.to_onnx(net, tuned)
    calib = x_train[:256]
    rows = {r.setting.split(":")[0].split(",")[0] + ("cal" if "data" in r.setting else "") +
            ("ft" if "retrained" in r.setting else ""): r
            for r in digits.compress_rows(path, str(tmp_path), x_test, y_test, calib, tuned)}
    u, uq, p, pq, cal, ft = rows["U"], rows["U+Q"], rows["P"], rows["P+Q"], rows["P+Qcal"], rows["P+Qft"]
    assert u.accuracy == pytest.approx(trained)                 # lossless .dcm: same predictions
    assert abs(uq.accuracy - trained) <= 0.01                   # 6-bit codebooks alone cost ~nothing
    assert p.nonzero == pq.nonzero == cal.nonzero == ft.nonzero
    assert u.weights / pq.nonzero == pytest.approx(12.2, abs=0.1)   # the paper's 92/91/74 % pruning
    import os
    onnx_bytes = os.path.getsize(path)
    assert onnx_bytes / pq.file_bytes > 28                      # paper: 40x (weights only, MNIST)
    assert onnx_bytes / ft.file_bytes > 28
    assert cal.accuracy >= pq.accuracy + 0.02                   # data-aware centroids recover accuracy
    assert ft.accuracy >= pq.accuracy + 0.02                    # so does the paper's retraining
    out = io.StringIO()
    digits.print_table("lenet_300_100", path, list(rows.values()), trained, out=out)
    text = out.getvalue()
    assert "| P+Q: pruned + quantized |" in text and "40x" in text


def test_lenet5_trains_and_compresses(data, tmp_path):
    x_train, y_train, x_test, y_test = data
    net = digits.lenet5()
    digits.train(net, x_train[:600], y_train[:600], epochs=2)
    acc = digits.accuracy(net, x_test, y_test)
    assert acc > 0.7
    path = str(tmp_path / "lenet5.onnx")
    digits.to_onnx(net, path)
    out = str(tmp_path / "lenet5.dcm")
    dcrt.convert(path, out, config=digits.paper_config("lenet5"))
    nz, total = digits._counts(out)
    assert total / nz == pytest.approx(11.9, abs=0.1)
    import os
    assert os.path.getsize(path) / os.path.getsize(out) > 28
    assert digits._dcm_accuracy(out, x_test, y_test) > 0.5
