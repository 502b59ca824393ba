"""Accuracy-aware compression: data loading, eval, centroid refinement, sweeps, budgets, CLI."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import os

import numpy as np
import pytest

from dcrt.cli import main
from dcrt.converters.accuracy_cli import below_minimum
from dcrt.converters import passes
from dcrt.converters.accuracy import (Runner, cosine, evaluate, feeds_of, judged_output, load_data,
                                      load_labels, output_metrics, psnr, run_onnx_file)
from dcrt.converters.budget import (damage, frontier, greedy_path, hull, parse_size, plan_for_budget,
                                    state_bytes)
from dcrt.converters.calibrate import (calibrate, layer_rows, layer_view, normal_equations, output_error,
                                       quantize, refine_centroids, row_count)
from dcrt.converters.compress import compress_tensor
from dcrt.converters.convert import convert
from dcrt.converters.onnx_frontend import from_onnx
from dcrt.converters.plan import LayerPlan, load_config, make_plan
from dcrt.converters.sweep import Sweep, SweepPoint, sweep, write_plots, write_tables
from dcrt.errors import ConfigError, ConversionError, InputError
from dcrt.files import json_safe
from dcrt.format import open_dcm
from dcrt.graph import Graph, Node, ValueInfo


def _ir(onnx_path):
    model = from_onnx(str(onnx_path))
    passes.simplify(model.graph)
    return model


def _feeds(zoo, name, batch, seed):
    return zoo.sample_input(zoo.ZOO[name](), batch=batch, seed=seed)


# -- least squares on the centroids ----------------------------------------------------------------


def _layer_problem(rng, n=2000, features=64, outputs=32, sparsity=0.9, bits=3):
    """ReLU-like correlated inputs (as real activations are) and a pruned, clustered weight."""
    mix = rng.standard_normal((features, features)) / np.sqrt(features)
    x = np.maximum(rng.standard_normal((n, features)) @ mix + 0.3 * rng.standard_normal((n, features)) + 0.3, 0)
    w = rng.standard_normal((outputs, features)).astype(np.float32)
    approx, keep, (labels, codebook), exact = quantize(w, LayerPlan(bits=bits, sparsity=sparsity))
    assert not exact
    return x, w, approx, keep, labels, codebook


def _apply(w, keep, labels, centroids):
    out = np.zeros_like(w)
    out[keep] = centroids[labels[keep]]
    return out


def test_refined_centroids_reduce_layer_output_error_on_held_out_data():
    rng = np.random.default_rng(0)
    x, w, approx, keep, labels, codebook = _layer_problem(rng)
    fit, held = x[:1000], x[1000:]
    better = _apply(w, keep, labels, refine_centroids(fit, w, labels, codebook))
    before, after = output_error(held, w, approx), output_error(held, w, better)
    # a wide layer has little to gain from K free values alone (the pruned weights dominate) ...
    assert after < 0.97 * before, (before, after)
    # ... the assignment is unchanged: same zeros, no more distinct values
    assert np.array_equal(better != 0, approx != 0)
    assert len(np.unique(better[keep])) <= len(codebook)


def test_refinement_absorbs_the_error_of_the_layers_before():
    rng = np.random.default_rng(4)
    x, w, approx, keep, labels, codebook = _layer_problem(rng, sparsity=0.5, bits=4)
    # upstream compression shrank this layer's inputs by 20 % (and added noise)
    seen = 0.8 * x + 0.02 * rng.standard_normal(x.shape)
    better = _apply(w, keep, labels, refine_centroids(seen[:1000], w, labels, codebook, x_target=x[:1000]))
    before = output_error(seen[1000:], w, approx, x_target=x[1000:])
    after = output_error(seen[1000:], w, better, x_target=x[1000:])
    assert after < 0.8 * before, (before, after)
    # about as good as k-means would be with no upstream error at all
    assert after < 1.05 * output_error(x[1000:], w, approx)


def test_refinement_is_the_least_squares_solution():
    rng = np.random.default_rng(1)
    x, w, _, _, labels, codebook = _layer_problem(rng, n=300, features=20, outputs=6, bits=2)
    k = len(codebook)
    design = np.stack([(x @ (labels == c).T.astype(np.float64)).ravel() for c in range(k)], axis=1)
    best = np.linalg.lstsq(design, (x @ w.T.astype(np.float64)).ravel(), rcond=None)[0]
    np.testing.assert_allclose(refine_centroids(x, w, labels, codebook, ridge=0.0), best, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_both_ways_of_forming_the_normal_equations_agree(groups):
    from dcrt.converters import calibrate as cal
    rng = np.random.default_rng(2)
    x = rng.standard_normal((groups, 200, 12))
    xt = x + 0.05 * rng.standard_normal(x.shape)
    w = rng.standard_normal((4 * groups, 12))
    labels = rng.integers(-1, 5, size=w.shape)
    # the explicit design matrix: column c is the layer output when only cluster c is 1
    design = np.stack([np.stack([x[g] @ (labels[4 * g:4 * g + 4] == c).T for g in range(groups)]).ravel()
                       for c in range(5)], axis=1)
    target = np.stack([xt[g] @ w[4 * g:4 * g + 4].T for g in range(groups)]).ravel()
    gram, rhs = normal_equations(x, w, labels, 5, xt)
    for method in (cal._by_products, cal._by_covariance):
        g_m, b_m = np.zeros((5, 5)), np.zeros(5)
        for g in range(groups):
            method(x[g], xt[g], w[4 * g:4 * g + 4], labels[4 * g:4 * g + 4], 5, g_m, b_m)
        np.testing.assert_allclose(g_m, design.T @ design, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(b_m, design.T @ target, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gram, design.T @ design, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(rhs, design.T @ target, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attrs", [
    {},
    {"pads": [1, 2, 1, 0], "strides": [2, 1]},
    {"dilations": [2, 2], "auto_pad": "SAME_UPPER"},
    {"group": 2, "pads": [1, 1, 1, 1]},
    {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]},     # depthwise
])
def test_conv_input_rows_reproduce_the_convolution(attrs):
    from dcrt.runtime.ops.nn import conv
    rng = np.random.default_rng(3)
    group = attrs.get("group", 1)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    node = Node("Conv", ["x", "w"], ["y"], dict(attrs))
    graph = Graph([node], [ValueInfo("x", np.float32, [2, 4, 9, 8])], [ValueInfo("y", np.float32)], {"w": w})
    view = layer_view(graph, "w")
    y = conv(dict(attrs), x, w)
    total = row_count(view, x.shape, w.shape)
    assert total == y.shape[0] * y.shape[2] * y.shape[3]
    rows = np.random.default_rng(0).choice(total, 17, replace=False)
    got = layer_rows(view, x, w.shape, rows)                    # [groups, rows, features]
    wm = view.matrix(w)
    per = w.shape[0] // group
    n, i, j = np.unravel_index(rows, (y.shape[0],) + y.shape[2:])
    for g in range(group):
        expect = y[n, g * per:(g + 1) * per, i, j]
        np.testing.assert_allclose(got[g] @ wm[g * per:(g + 1) * per].T, expect, rtol=1e-4, atol=1e-4)


def test_gemm_and_matmul_views():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    g = Graph([Node("Gemm", ["x", "w"], ["y"], {"transB": 1}), Node("MatMul", ["y2", "v"], ["z"])],
              [ValueInfo("x", np.float32)], [ValueInfo("z", np.float32)], {"w": w, "v": w})
    assert layer_view(g, "w").matrix(w).shape == (3, 4)        # y = x @ w.T
    assert layer_view(g, "v").matrix(w).shape == (4, 3)        # z = y2 @ v
    shared = Graph([Node("Gemm", ["x", "w"], ["y"]), Node("Gemm", ["y", "w"], ["z"])], [], [], {"w": w})
    assert layer_view(shared, "w") is None                     # a shared weight is left to k-means


@pytest.fixture(scope="module")
def lenet5_calibration(onnx_path, zoo):
    model = _ir(onnx_path("lenet5"))
    plans = make_plan(model.graph)
    calib, held = _feeds(zoo, "lenet5", 192, seed=5), _feeds(zoo, "lenet5", 192, seed=6)
    return model, plans, calib, held, calibrate(model, plans, calib)


def test_calibration_improves_the_whole_model_on_held_out_data(lenet5_calibration):
    model, plans, calib, held, cal = lenet5_calibration
    runner = Runner(model, variable=list(plans))
    reference = runner.run(held)[0]
    kmeans = {n: quantize(model.graph.initializers[n], p)[0] for n, p in plans.items()}
    plain = output_metrics(reference, runner.run(held, kmeans)[0])
    refined = output_metrics(reference, runner.run(held, cal.weights)[0])
    assert refined["cosine"] > plain["cosine"] + 0.05, (plain, refined)
    assert refined["top1_agreement"] >= plain["top1_agreement"]
    assert refined["psnr_db"] > plain["psnr_db"]
    done = [c for c in cal.layers.values() if c.refined]
    assert {c.name for c in done} >= {"conv2.weight", "fc1.weight", "fc2.weight"}
    assert all(c.error_refined <= c.error_kmeans for c in done)


def test_calibrated_weights_are_stored_exactly(lenet5_calibration):
    model, plans, _, _, cal = lenet5_calibration
    for name, plan in plans.items():
        rec, approx = compress_tensor(name, cal.weights[name], cal.plans[name])
        np.testing.assert_array_equal(approx, cal.weights[name] if cal.layers[name].refined
                                      else quantize(model.graph.initializers[name], plan)[0])
        assert rec.stats.codebook_size <= (1 << plan.bits)
        assert rec.stats.sparsity == pytest.approx(plan.sparsity, abs=1.5 / rec.stats.element_count)


def test_activation_saliency_keeps_the_planned_sparsity(onnx_path, zoo):
    model = _ir(onnx_path("lenet_300_100"))
    plans = make_plan(model.graph)
    cal = calibrate(model, plans, _feeds(zoo, "lenet_300_100", 64, seed=1), saliency="activation")
    for name, plan in plans.items():
        w = cal.weights[name]
        assert np.count_nonzero(w == 0) == int(round(plan.sparsity * w.size)), name
    with pytest.raises(ConfigError):
        calibrate(model, plans, _feeds(zoo, "lenet_300_100", 8, seed=1), saliency="hessian")


def test_convert_cli_prunes_by_activation_saliency(onnx_path, zoo, tmp_path, capsys):
    """``dcrt convert --calib --saliency activation``: inputs that are always zero in the data lose
    all their weights first (their ``|w| * ||x||`` is 0); by magnitude about 10 % of them stay."""
    src = str(onnx_path("lenet_300_100"))
    feeds = _feeds(zoo, "lenet_300_100", 64, seed=4)
    (name, x), = feeds.items()
    x[:, :392] = 0                                    # the top half of every image is blank
    np.savez(tmp_path / "calib.npz", **{name: x})
    kept = {}
    for saliency in ("magnitude", "activation"):
        out = tmp_path / f"{saliency}.dcm"
        assert main(["convert", src, "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                     "--saliency", saliency, "-q"]) == 0
        w = open_dcm(str(out)).tensors["fc1.weight"].decode()          # [300, 784]
        assert np.count_nonzero(w) == pytest.approx(0.1 * w.size, abs=1)
        kept[saliency] = np.count_nonzero(w[:, :392])
    assert kept["activation"] == 0 and kept["magnitude"] > 0.05 * 300 * 392
    assert main(["convert", src, "-o", str(tmp_path / "x.dcm"), "--saliency", "activation", "-q"]) == 2
    assert "needs calibration data" in capsys.readouterr().err


# -- data and metrics ------------------------------------------------------------------------------


def test_load_data_formats(tmp_path):
    inputs = [ValueInfo("input", np.float32, ["N", 3])]
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez(tmp_path / "byname.npz", input=x, labels=np.arange(4))
    feeds, labels = load_data(str(tmp_path / "byname.npz"), inputs)
    assert feeds["input"].dtype == np.float32 and np.array_equal(feeds["input"], x)
    assert np.array_equal(labels, np.arange(4))
    np.savez(tmp_path / "single.npz", whatever=x)
    assert np.array_equal(load_data(str(tmp_path / "single.npz"), inputs)[0]["input"], x)
    np.save(tmp_path / "x.npy", x)
    assert load_data(str(tmp_path / "x.npy"), inputs, max_samples=2)[0]["input"].shape == (2, 3)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(4):                                   # one sample per file, no batch axis
        np.save(folder / f"{i:03d}.npy", x[i])
    assert np.array_equal(load_data(str(folder), inputs)[0]["input"], x)
    np.savez(tmp_path / "wrong.npz", a=x, b=x)
    with pytest.raises(InputError, match="input"):
        load_data(str(tmp_path / "wrong.npz"), inputs)
    np.save(tmp_path / "rank.npy", np.zeros((2, 2, 2, 2)))
    with pytest.raises(InputError, match="shape"):
        load_data(str(tmp_path / "rank.npy"), inputs)
    with pytest.raises(InputError, match="no such"):
        load_data(str(tmp_path / "missing.npz"), inputs)


def test_data_and_labels_a_user_can_get_wrong(tmp_path):
    """Non-finite inputs (a NaN row's arg-max is 0 on both sides: it would count as agreeing), a damaged
    .npz and labels that are no class indices are InputErrors; labels inside the .npz are checked and
    read as --labels are (one-hot rows become indices); arrays given to the API are checked so too."""
    import zipfile
    inputs = [ValueInfo("input", np.float32, ["N", 3])]
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    bad = x.copy()
    bad[1, 2] = np.nan
    np.savez(tmp_path / "nan.npz", input=bad)
    with pytest.raises(InputError, match="holds 1 NaN or infinite values"):
        load_data(str(tmp_path / "nan.npz"), inputs)
    with pytest.raises(InputError, match="NaN or infinite"):
        feeds_of({"input": bad}, inputs)
    assert np.array_equal(feeds_of(x.astype(np.float64), inputs, max_samples=2)["input"], x[:2])
    np.savez(tmp_path / "ok.npz", input=x)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:100])
    with pytest.raises(zipfile.BadZipFile):
        np.load(tmp_path / "cut.npz")
    with pytest.raises(InputError, match="cannot read the data .not a .npz or .npy file written by numpy"):
        load_data(str(tmp_path / "cut.npz"), inputs)
    np.savez(tmp_path / "onehot.npz", input=x, labels=np.eye(5)[[0, 4, 2, 1]])
    assert np.array_equal(load_data(str(tmp_path / "onehot.npz"), inputs)[1], [0, 4, 2, 1])
    for labels, message in [(np.array(["cat"] * 4), "not <U3 values"), (np.full(4, 0.5), "not float64 values"),
                            (np.array([0, 1, -1, 2]), "from 0; found -1"), (np.full(4, np.inf), "float64")]:
        np.savez(tmp_path / "lab.npz", input=x, labels=labels)
        with pytest.raises(InputError, match=message):
            load_data(str(tmp_path / "lab.npz"), inputs)
        np.save(tmp_path / "lab.npy", labels)
        with pytest.raises(InputError, match=message):
            load_labels(str(tmp_path / "lab.npy"))


def test_time_major_inputs_are_refused_not_cut_into_time_steps(tmp_path):
    """An input an LSTM reads as [seq, batch, features] (ONNX's default layout) would be cut along its
    time axis by the tools, which take samples along the first axis: an InputError saying so."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in [("W", (1, 64, 8)), ("R", (1, 64, 16))]]
    graph = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], hidden_size=16, name="lstm")],
                              "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", "N", 8])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(tmp_path / "m.onnx"))
    convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((30, 4, 8)).astype(np.float32))
    with pytest.raises(InputError, match="input 'x' is time-major .* LSTM 'lstm' reads it with layout 0"):
        evaluate(str(tmp_path / "m.dcm"), str(tmp_path / "m.onnx"), str(tmp_path / "d.npz"))
    with pytest.raises(InputError, match="export the model batch-first"):
        Runner(_ir(tmp_path / "m.onnx"))
    graph.node[0].attribute.append(helper.make_attribute("layout", 1))     # batch-first: accepted
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 8]))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(tmp_path / "b.onnx"))
    assert Runner(_ir(tmp_path / "b.onnx")).run({"x": np.zeros((2, 3, 8), np.float32)})[0].shape == (2, 1, 16)


def _two_heads(path, rng):
    """x [N, 16] -> a regression head r [N, 1] (first) and a 10-class head c [N, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in [("reg.weight", (1, 64)), ("cls.weight", (10, 64)), ("trunk.weight", (64, 16))]]
    nodes = [helper.make_node("Gemm", ["x", "trunk.weight"], ["t"], transB=1), helper.make_node("Relu", ["t"], ["h"]),
             helper.make_node("Gemm", ["h", "reg.weight"], ["r"], transB=1),
             helper.make_node("Gemm", ["h", "cls.weight"], ["c"], transB=1),
             helper.make_node("ReduceSum", ["c"], ["total"], keepdims=0, noop_with_empty_axes=0)]
    graph = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("r", "c", "total")],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def test_agreement_is_judged_on_the_output_with_classes(tmp_path, capsys):
    """A regression head first (one value per sample always "agrees") and a classifier after it: eval,
    --min-agreement, sweeps and budgets judge the classifier; a 0-d output is reported, not a crash;
    labels inside the .npz alone are enough to evaluate."""
    rng = np.random.default_rng(0)
    src = _two_heads(tmp_path / "m.onnx", rng)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(64) % 10)
    dcm = str(tmp_path / "m.dcm")
    convert(src, dcm, bits=2, sparsity=0.95)
    report = evaluate(dcm, src, str(tmp_path / "d.npz"))
    assert set(report["outputs"]) == {"r", "c", "total"}
    assert "top1_agreement" not in report["outputs"]["r"] and "compressed_top1_accuracy" in report["outputs"]["c"]
    agreement = report["outputs"]["c"]["top1_agreement"]
    assert agreement < 1.0
    assert main(["eval", dcm, "--reference", src, "--data", str(tmp_path / "d.npz"), "--min-agreement",
                 f"{100 * agreement + 1:.3f}"]) == 1
    capsys.readouterr()
    only_labels = evaluate(dcm, None, str(tmp_path / "d.npz"))
    assert list(only_labels["outputs"]) == ["c"]
    model = _ir(src)
    plans = make_plan(model.graph)
    feeds = {"x": x}
    result = sweep(model, plans, feeds, sparsities=(0.0, 0.95), bits=(2, 8))
    reg = {(p.sparsity, p.bits): p for p in result.of("reg.weight")}
    cls = {(p.sparsity, p.bits): p for p in result.of("cls.weight")}
    assert reg[(0.95, 2)].top1_agreement == 1.0 and cls[(0.95, 2)].top1_agreement < 1.0   # the classifier's
    assert reg[(0.95, 2)].cosine < 0.999        # the regression head's damage shows in the cosine
    assert judged_output([np.zeros((4, 1)), np.zeros((4, 10))]) == 1 and judged_output([np.zeros(4)]) == 0
    with pytest.raises(ConfigError, match="no output of the model has classes"):
        plan_for_budget(_regression_only(tmp_path, rng), {"x": rng.standard_normal((8, 64)).astype(np.float32)},
                        max_drop=1.0, sparsities=(0.0, 0.5), bits=(4, 8))


def _regression_only(tmp_path, rng):
    """x [N, 64] -> one value per sample."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "reg.weight"], ["r"], transB=1)], "reg",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rng.standard_normal((1, 64)).astype(np.float32), "reg.weight")])
    path = tmp_path / "reg.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def test_output_metrics_by_hand():
    ref = np.array([[3.0, 1, 0, 0, 0, 0], [0, 2, 1, 0, 0, 0], [0, 0, 1, 5, 0, 0]])
    got = np.array([[3.0, 1, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0], [0, 0, 1, 5, 0, 0]])
    m = output_metrics(ref, got, labels=np.array([0, 2, 1]))
    assert m["top1_agreement"] == pytest.approx(2 / 3)
    assert m["top5_agreement"] == 1.0
    assert m["reference_top1_accuracy"] == pytest.approx(1 / 3)
    assert m["compressed_top1_accuracy"] == pytest.approx(2 / 3)
    assert m["cosine"] == pytest.approx(float(np.sum(ref * got) / np.sum(ref * ref)))
    assert m["psnr_db"] == pytest.approx(10 * np.log10(25 / (2 / 18)))
    assert psnr(ref, ref) == float("inf") and cosine(ref, ref) == pytest.approx(1.0)
    with pytest.raises(InputError, match="label 6 names no class: the output has 6"):
        output_metrics(ref, got, labels=np.array([0, 6, 1]))


def test_eval_matches_a_direct_computation(onnx_path, dcm_path, zoo, tmp_path):
    src, dcm = onnx_path("lenet5"), dcm_path("lenet5")
    feeds = _feeds(zoo, "lenet5", 40, seed=9)
    labels = np.random.default_rng(0).integers(0, 10, 40)
    np.savez(tmp_path / "data.npz", **feeds)
    np.save(tmp_path / "labels.npy", labels)
    report = evaluate(str(dcm), str(src), str(tmp_path / "data.npz"), str(tmp_path / "labels.npy"), batch_size=16)
    import dcrt
    expected = run_onnx_file(str(src), feeds)[0]
    got = dcrt.Session(str(dcm)).run(None, feeds)[0]
    m = report["outputs"]["logits"]
    assert report["samples"] == 40
    assert m["top1_agreement"] == pytest.approx(np.mean(expected.argmax(1) == got.argmax(1)))
    assert m["compressed_top1_accuracy"] == pytest.approx(np.mean(got.argmax(1) == labels))
    assert m["reference_top1_accuracy"] == pytest.approx(np.mean(expected.argmax(1) == labels))
    assert m["cosine"] == pytest.approx(cosine(expected, got), rel=1e-6)
    original = _ir(src).graph.initializers
    tensors = open_dcm(str(dcm)).tensors
    rows = {r["layer"]: r for r in report["layers"]}
    assert set(rows) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    for name, r in rows.items():
        assert r["psnr_db"] == pytest.approx(psnr(original[name], tensors[name].decode()))


def test_eval_cli(onnx_path, dcm_path, zoo, tmp_path, capsys):
    src, dcm = onnx_path("lenet_300_100"), dcm_path("lenet_300_100")
    np.savez(tmp_path / "data.npz", **_feeds(zoo, "lenet_300_100", 24, seed=2),
             labels=np.arange(24) % 10)
    data = str(tmp_path / "data.npz")
    assert main(["eval", str(dcm), "--reference", str(src), "--data", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "compressed_top1_accuracy" in report["outputs"]["logits"]   # labels found inside the .npz
    assert main(["eval", str(dcm), "--reference", str(src), "--data", data]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement" in text and "fc1.weight" in text and "PSNR" in text
    harsh = str(tmp_path / "harsh.dcm")     # 2-bit codebooks: some of the 24 answers change
    convert(str(src), harsh, bits=2, sparsity=0.95)
    assert main(["eval", harsh, "--reference", str(src), "--data", data, "--min-agreement", "100"]) == 1
    assert "is below --min-agreement 100.0 %" in capsys.readouterr().err
    assert below_minimum(28 / 100, 29) and not below_minimum(29 / 100, 29)     # 100 * 0.29 is 28.999...
    for bad in ("100.1", "-5", "nan"):
        with pytest.raises(SystemExit):     # argparse: a message and status 2
            main(["eval", str(dcm), "--reference", str(src), "--data", data, "--min-agreement", bad])
        assert "a percentage is in [0, 100]" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", a=np.zeros((2, 5)), b=np.zeros((2, 5)))
    assert main(["eval", str(dcm), "--reference", str(src), "--data", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert "dcrt: error:" in err and "Traceback" not in err
    np.save(tmp_path / "none.npy", np.zeros((0, 784), np.float32))
    np.save(tmp_path / "text.npy", np.array([["a"] * 784]))
    for data, message in [("none.npy", "no samples"), ("text.npy", "holds <U1 values")]:
        assert main(["eval", str(dcm), "--reference", str(src), "--data", str(tmp_path / data)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(dcm), "--reference", str(src), "--data", data, "--batch-size", "0"])
    assert "--batch-size: must be at least 1" in capsys.readouterr().err


def test_eval_json_is_strict_json(tmp_path, capsys):
    """An output reproduced exactly has an infinite PSNR: printed as the string "inf" (json.dumps would
    write ``Infinity``, which strict parsers refuse)."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    assert main(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.dcm"), "-q"]) == 0
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    assert main(["eval", str(tmp_path / "m.dcm"), "--reference", str(tmp_path / "m.onnx"), "--data",
                 str(tmp_path / "x.npy"), "--json"]) == 0
    text = capsys.readouterr().out

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    report = json.loads(text, parse_constant=refuse)
    assert report["outputs"]["y"]["psnr_db"] == "inf"


# -- sweep -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_sweep(onnx_path, zoo):
    model = _ir(onnx_path("lenet_300_100"))
    plans = make_plan(model.graph)
    feeds = _feeds(zoo, "lenet_300_100", 128, seed=4)
    return model, plans, feeds, sweep(model, plans, feeds, sparsities=(0.0, 0.5, 0.9), bits=(3, 5, 8))


def test_sweep_rows_and_sizes_are_what_convert_writes(mlp_sweep, onnx_path, tmp_path):
    model, plans, feeds, result = mlp_sweep
    assert result.layers() == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert len(result.points) == 3 * 3 * 3
    gentle = {p.layer: p for p in result.points if p.sparsity == 0.0 and p.bits == 8}
    assert all(p.cosine > 0.99 for p in gentle.values())
    p = next(p for p in result.points if p.layer == "fc1.weight" and p.sparsity == 0.9 and p.bits == 3)
    out = tmp_path / "one.dcm"
    res = convert(str(onnx_path("lenet_300_100")), str(out),
                  config={"layers": {"fc1.weight": {"sparsity": 0.9, "bits": 3}}})
    assert res.records["fc1.weight"].stats.coded_bytes == p.coded_bytes
    # fidelity of the row is that model's: only fc1 compressed
    runner = Runner(model, variable=list(plans))
    got = runner.run(feeds, {"fc1.weight": res.weights["fc1.weight"]})[0]
    assert output_metrics(runner.run(feeds)[0], got)["cosine"] == pytest.approx(p.cosine)
    # more pruning, fewer bits: smaller
    by = {(q.sparsity, q.bits): q.coded_bytes for q in result.of("fc1.weight")}
    assert by[(0.9, 3)] < by[(0.5, 3)] < by[(0.0, 3)] and by[(0.0, 3)] < by[(0.0, 8)]


def test_sweep_report_files(mlp_sweep, tmp_path):
    model, _, _, result = mlp_sweep
    written = write_tables(result, str(tmp_path))
    lines = pathlib.Path(written[0]).read_text().splitlines()
    assert lines[0].startswith("layer,op_type,category,sparsity,bits")
    assert len(lines) == 1 + len(result.points)
    again = Sweep.from_json(json.loads(pathlib.Path(written[1]).read_text()))
    assert len(again.points) == len(result.points) and again.plans["fc1.weight"].bits == 5
    # an exact point (infinite PSNR) is written as strict JSON and read back as a float
    exact = dataclasses.replace(result, points=[dataclasses.replace(result.points[0], psnr_db=float("inf"))])
    written = write_tables(exact, str(tmp_path))
    text = pathlib.Path(written[1]).read_text()
    assert "Infinity" not in text and Sweep.from_json(json.loads(text)).points[0].psnr_db == float("inf")
    pytest.importorskip("matplotlib")
    plots = write_plots(result, str(tmp_path), model)
    names = sorted(os.path.basename(p) for p in plots)
    assert names == ["bits.png", "hist_fc1.weight.png", "hist_fc2.weight.png", "hist_fc3.weight.png",
                     "sparsity.png"]
    for p in plots:
        assert pathlib.Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_cli_without_matplotlib(onnx_path, zoo, tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    np.savez(tmp_path / "d.npz", **_feeds(zoo, "lenet_300_100", 16, seed=1))
    rc = main(["sweep", str(onnx_path("lenet_300_100")), "--data", str(tmp_path / "d.npz"), "-o",
               str(tmp_path / "rep"), "--sparsities", "0,0.9", "--bits", "4", "--layers", "fc3*", "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "plots skipped" in out
    assert sorted(os.listdir(tmp_path / "rep")) == ["sweep.csv", "sweep.json"]
    assert main(["sweep", str(onnx_path("lenet_300_100")), "--data", str(tmp_path / "d.npz"), "-o",
                 str(tmp_path / "rep"), "--sparsities", "1.5"]) == 2
    assert main(["sweep", str(onnx_path("lenet_300_100")), "--data", str(tmp_path / "d.npz"), "-o",
                 str(tmp_path / "rep" / "sweep.csv")]) == 2
    assert "is a file; dcrt sweep writes a report folder" in capsys.readouterr().err


# -- budgets ---------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size("2MB") == 2_000_000
    assert parse_size("500 KB") == 500_000
    assert parse_size("1.5MiB") == 1_572_864
    assert parse_size("1234") == 1234
    with pytest.raises(ConfigError):
        parse_size("two megs")


def _point(layer, s, b, size, agree, cos):
    return SweepPoint(layer, "Gemm", "fc", s, b, 1000, 4000, size, agree, cos, 20.0, 20.0)


def test_greedy_path_takes_the_cheapest_bytes_first():
    pts = [_point("a", 0.0, 8, 1000, 1.0, 1.0), _point("a", 0.5, 8, 600, 1.0, 0.99),
           _point("a", 0.9, 8, 200, 0.5, 0.8),
           _point("b", 0.0, 8, 1000, 1.0, 1.0), _point("b", 0.5, 8, 500, 0.9, 0.95),
           _point("b", 0.5, 4, 700, 0.8, 0.9)]          # dominated: bigger and worse than (0.5, 8)
    result = Sweep(pts, 10, (0.0, 0.5, 0.9), (4, 8))
    assert [p.coded_bytes for p in frontier(result.of("b"))] == [1000, 500]
    path = greedy_path(result)
    sizes = [state_bytes(s) for s in path]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert path[1]["a"].coded_bytes == 600                 # 400 bytes for 0.01 damage: the cheapest move
    assert path[-1]["a"].coded_bytes == 200 and path[-1]["b"].coded_bytes == 500
    assert all(damage(q) >= damage(p) for p, q in zip(hull(pts[:3]), hull(pts[:3])[1:]))


def test_budget_target_size_writes_a_file_that_fits(mlp_sweep, onnx_path, zoo, tmp_path):
    src = str(onnx_path("lenet_300_100"))
    _, _, feeds, result = mlp_sweep
    budget = plan_for_budget(src, feeds, target_size="60KB", sweep_result=result)
    assert budget.file_bytes <= 60_000
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(budget.config))
    out = tmp_path / "budget.dcm"
    convert(src, str(out), config=load_config(str(path)))
    assert os.path.getsize(out) <= 60_000
    assert os.path.getsize(out) == budget.file_bytes
    # a smaller target gives a smaller (or equal) plan, with at least as much drop
    small = plan_for_budget(src, feeds, target_size="40KB", sweep_result=result)
    assert small.file_bytes <= 40_000 and small.drop >= budget.drop - 1e-9
    with pytest.raises(ConfigError, match="cannot reach"):
        plan_for_budget(src, feeds, target_size="2KB", sweep_result=result)


def test_budget_max_drop_is_measured_on_the_whole_model(mlp_sweep, onnx_path, tmp_path):
    src = str(onnx_path("lenet_300_100"))
    model, _, feeds, result = mlp_sweep
    budget = plan_for_budget(src, feeds, max_drop=5.0, sweep_result=result)
    assert budget.drop <= 5.0
    out = tmp_path / "drop.dcm"
    convert(src, str(out), config=budget.config)
    import dcrt
    reference = run_onnx_file(src, feeds)[0]
    got = dcrt.Session(str(out)).run(None, feeds)[0]
    assert 100 * (1 - np.mean(reference.argmax(1) == got.argmax(1))) == pytest.approx(budget.drop)
    # allowing more drop never gives a bigger model
    loose = plan_for_budget(src, feeds, max_drop=50.0, sweep_result=result)
    assert loose.estimated_bytes <= budget.estimated_bytes
    with pytest.raises(ConfigError, match="both"):
        plan_for_budget(src, feeds, max_drop=1.0, target_size="40KB", sweep_result=result)
    with pytest.raises(ConfigError, match="gentlest"):
        plan_for_budget(src, feeds, max_drop=0.0, sweep_result=result)


def test_plan_cli_writes_a_reusable_config(onnx_path, zoo, tmp_path, capsys):
    src = str(onnx_path("lenet_300_100"))
    np.savez(tmp_path / "calib.npz", **_feeds(zoo, "lenet_300_100", 64, seed=3))
    out = tmp_path / "plan.json"
    rc = main(["plan", src, "--calib", str(tmp_path / "calib.npz"), "--target-size", "80KB", "-o", str(out),
               "--sparsities", "0,0.8,0.9", "--bits", "4,6", "-q"])
    assert rc == 0
    config = load_config(str(out))
    assert set(config["layers"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert main(["convert", src, "-o", str(tmp_path / "m.dcm"), "--config", str(out), "-q"]) == 0
    assert os.path.getsize(tmp_path / "m.dcm") <= 80_000
    assert main(["plan", src, "--calib", str(tmp_path / "calib.npz"), "-o", str(out), "--force"]) == 2
    assert "budget" in capsys.readouterr().err
    written = out.read_bytes()      # an existing plan is replaced only with --force, as convert's output
    assert main(["plan", src, "--calib", str(tmp_path / "calib.npz"), "--target-size", "70KB", "-o", str(out)]) == 2
    assert f"{out} exists; pass --force" in capsys.readouterr().err and out.read_bytes() == written
    # convert --target-size checks its output before the sweep and writes no plan beside a refused one
    (tmp_path / "kept.dcm").write_bytes(b"precious")
    assert main(["convert", src, "-o", str(tmp_path / "kept.dcm"), "--calib", str(tmp_path / "calib.npz"),
                 "--target-size", "80KB", "-q"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "kept.dcm").read_bytes() == b"precious" and not (tmp_path / "kept.dcm.plan.json").exists()


def test_plans_reuse_a_sweep_of_more_layers_and_refuse_an_edited_one(mlp_sweep, onnx_path, tmp_path, capsys):
    """``dcrt plan --sweep`` with a base plan that skips a swept layer walks the others only; a sweep.json
    whose values were edited into other types is a ConfigError, not a TypeError deep in the walk."""
    model, plans, feeds, result = mlp_sweep
    src = str(onnx_path("lenet_300_100"))
    (tmp_path / "sweep.json").write_text(json.dumps(json_safe(result.to_json())))
    (tmp_path / "skip.json").write_text(json.dumps({"layers": {"fc3.weight": {"skip": True}}}))
    np.savez(tmp_path / "calib.npz", **feeds)
    out = tmp_path / "plan.json"
    assert main(["plan", src, "--data", str(tmp_path / "calib.npz"), "--sweep", str(tmp_path / "sweep.json"),
                 "--config", str(tmp_path / "skip.json"), "--max-drop", "50", "-o", str(out), "-q"]) == 0
    layers = load_config(str(out))["layers"]
    assert layers["fc3.weight"]["skip"] is True and {"bits", "sparsity"} <= set(layers["fc1.weight"])
    edited = result.to_json()
    edited["points"][0]["coded_bytes"] = "12"
    (tmp_path / "edited.json").write_text(json.dumps(json_safe(edited)))
    assert main(["plan", src, "--data", str(tmp_path / "calib.npz"), "--sweep", str(tmp_path / "edited.json"),
                 "--max-drop", "50", "-o", str(out), "--force", "-q"]) == 2
    assert "coded_bytes must be int, not '12'" in capsys.readouterr().err


def test_api_configs_and_few_calibration_samples(onnx_path, zoo, tmp_path):
    """A config dict given to ``convert`` is checked as a file is; with too few calibration samples for a
    layer's centroids, the layer keeps its k-means centroids (the fit would only match those samples)."""
    src = str(onnx_path("lenet_300_100"))
    for config, message in [({"layers": {"fc1.weight": {"sparsity": -0.5}}}, "sparsity must be in"),
                            ({"layers": {"fc1.weight": {"bits": 40}}}, "bits must be 1..16"),
                            ({"bogus": {}}, "unknown section"), ([1], "top level must be a mapping")]:
        with pytest.raises(ConfigError, match=message):
            convert(src, str(tmp_path / "m.dcm"), config=config)
    assert not (tmp_path / "m.dcm").exists()
    model = _ir(onnx_path("lenet_300_100"))
    plans = make_plan(model.graph)
    few = calibrate(model, plans, _feeds(zoo, "lenet_300_100", 2, seed=5))
    assert not few.layers["fc3.weight"].refined and "too few" in few.layers["fc3.weight"].reason
    assert np.array_equal(few.weights["fc3.weight"], model.graph.initializers["fc3.weight"])
    many = calibrate(model, plans, _feeds(zoo, "lenet_300_100", 64, seed=5))
    assert many.layers["fc3.weight"].refined


# -- plumbing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet_small", "lstm_classifier"])
def test_runner_backends_agree_and_replace_weights(name, onnx_path, zoo):
    model = _ir(onnx_path(name))
    plans = make_plan(model.graph)
    feeds = _feeds(zoo, name, 6, seed=1)
    ort_runner = Runner(model, variable=list(plans))
    own = Runner(model, variable=list(plans), backend="dcrt")
    assert (ort_runner.backend, own.backend) == ("onnxruntime", "dcrt")
    expected = run_onnx_file(str(onnx_path(name)), feeds)[0]
    np.testing.assert_allclose(ort_runner.run(feeds)[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(own.run(feeds)[0], expected, rtol=1e-4, atol=1e-4)
    layer = next(iter(plans))
    zero = {layer: np.zeros_like(model.graph.initializers[layer])}
    np.testing.assert_allclose(ort_runner.run(feeds, zero)[0], own.run(feeds, zero)[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(ort_runner.run(feeds, zero)[0], expected)


def test_calibrate_reads_a_data_file_and_skips_what_it_cannot_refine(onnx_path, zoo, tmp_path):
    model = _ir(onnx_path("lstm_classifier"))
    plans = make_plan(model.graph)
    np.savez(tmp_path / "calib.npz", **_feeds(zoo, "lstm_classifier", 8, seed=2))
    cal = calibrate(model, plans, str(tmp_path / "calib.npz"))
    assert set(cal.weights) == set(plans)
    rnn = [n for n, p in plans.items() if p.category == "rnn"]
    assert rnn and all(not cal.layers[n].refined and "k-means" in cal.layers[n].reason for n in rnn)
    for n in rnn:                       # left to compress_tensor exactly as without calibration
        assert cal.weights[n] is model.graph.initializers[n] or np.array_equal(cal.weights[n],
                                                                                model.graph.initializers[n])
        assert cal.plans[n] == plans[n]


def test_convert_with_a_budget_writes_the_plan_next_to_the_output(onnx_path, zoo, tmp_path, capsys, monkeypatch):
    """``dcrt convert --target-size --calib``: the .dcm fits and its plan lands beside it, only once the
    conversion succeeded; an existing plan is replaced only with --force; pruning flags the sweep
    did not measure with are refused before any work."""
    import argparse
    from dcrt.converters.accuracy_cli import convert_budget_config
    src = str(onnx_path("lenet_300_100"))
    np.savez(tmp_path / "calib.npz", **_feeds(zoo, "lenet_300_100", 32, seed=3))
    out, calib = tmp_path / "m.dcm", str(tmp_path / "calib.npz")
    assert main(["convert", src, "-o", str(out), "--calib", calib, "--target-size", "90KB", "-q"]) == 0
    assert out.stat().st_size <= 90_000
    plan = load_config(str(tmp_path / "m.dcm.plan.json"))
    with open_dcm(str(out)) as dcm:
        assert {n: {"bits": p["bits"], "sparsity": p["sparsity"]} for n, p in dcm.plan["layers"].items()
                if not p.get("skip")} == {n: {"bits": p["bits"], "sparsity": p["sparsity"]}
                                          for n, p in plan["layers"].items()}
    out.unlink()        # the plan alone is left: refused without --force, before the sweep
    assert main(["convert", src, "-o", str(out), "--calib", calib, "--target-size", "90KB", "-q"]) == 2
    assert "m.dcm.plan.json exists" in capsys.readouterr().err and not out.exists()
    for flag in (["--no-prune"], ["--threshold", "0.01"]):
        assert main(["convert", src, "-o", str(tmp_path / "n.dcm"), "--calib", calib, "--target-size", "90KB",
                     *flag]) == 2
        assert "leave out --no-prune and --threshold" in capsys.readouterr().err
    from dcrt.converters import convert as convert_module

    def full_disk(*args, **kwargs):
        raise ConversionError("no space left on the device")
    monkeypatch.setattr(convert_module, "write_dcm", full_disk)     # the plan is made, the writing fails
    bad = tmp_path / "bad.dcm"
    assert main(["convert", src, "-o", str(bad), "--calib", calib, "--target-size", "90KB", "-q"]) == 2
    assert "no space left" in capsys.readouterr().err and not list(tmp_path.glob("bad.dcm*"))
    assert convert_budget_config(argparse.Namespace(target_size=None, max_drop=None)) is None
    args = argparse.Namespace(model=src, output=str(tmp_path / "c.dcm"), calib=None, target_size="90KB",
                              max_drop=None, config=None, bits=None, sparsity=None, coder=None, weights=None,
                              quiet=True)
    with pytest.raises(ConfigError, match="calibration data"):
        convert_budget_config(args)
