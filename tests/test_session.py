"""dcrt.Session: the onnxruntime-style API, memory modes, computing from indices, threads, damage."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import dcrt
from dcrt.errors import FormatError, InputError
from dcrt.runtime.indexed import ByInput, IndexedWeight, SparseWeight

LOSSLESS = dict(prune=False, bits=32)
WHOLE_MODELS = ["resnet18_tiny", "mobilenet_v2_tiny", "lstm_classifier", "gru_classifier", "dcgan_generator",
                "tiny_yolo", "crnn", "resnet_small", "lenet5", "with_constant_weights", "resnet50_tiny"]


def ort_run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("name", WHOLE_MODELS)
def test_lossless_matches_onnxruntime(name, onnx_path, dcm_path, zoo):
    feeds = zoo.sample_input(onnx.load(str(onnx_path(name))), batch=2)
    expected = ort_run(onnx_path(name), feeds)
    for mode in ("index", "dense", "stream"):
        got = dcrt.Session(str(dcm_path(name, **LOSSLESS)), mode=mode).run(None, feeds)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == e.dtype
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


@pytest.mark.parametrize("name", ["lenet5", "lstm_classifier", "resnet_small"])
def test_compressed_model_computes_with_its_decoded_weights(name, onnx_path, dcm_path, zoo):
    """Default compression: dcrt's output equals onnxruntime running the decoded weights."""
    from onnx_export import run_ort, to_onnx
    path = dcm_path(name)
    feeds = zoo.sample_input(onnx.load(str(onnx_path(name))), batch=3)
    dcm = dcrt.open_dcm(str(path))
    expected = run_ort(to_onnx(dcm.model, {n: t.decode() for n, t in dcm.tensors.items()}), feeds)
    for mode in ("index", "dense", "stream"):
        for g, e in zip(dcrt.Session(str(path), mode=mode).run(None, feeds), expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, op", [("lstm_classifier", "LSTM"), ("gru_classifier", "GRU")])
def test_recurrent_r_is_kept_as_product_table_slots(name, op, onnx_path, dcm_path, zoo):
    """Default compression (``rnn``: 8 bits, 60 % pruned): the recurrent ``R`` of the LSTM and GRU
    classifiers is held as product-table slots per direction (``memory.SLOTS``: 2 bytes a kept
    weight, fewer than the dense indices' byte a weight), ``W`` keeps its dense indices; at batch 1
    and 3 the outputs equal onnxruntime running the decoded weights, and ``dcrt size`` predicts the
    bytes held, in index mode and, with the batch-1 slices of ``R`` (where AVX-512 runs them; the
    GRU's reset after R), on x86 with AVX-512: it builds the slices on any machine, the session only
    there."""
    from dcrt import memory, report
    from dcrt.runtime import numba_kernels
    from dcrt.runtime.indexed import PerDirection, TableRows
    from dcrt.runtime.session import held_as
    from onnx_export import run_ort, to_onnx
    path = dcm_path(name)
    sess = dcrt.Session(str(path))
    node = next(n for n in sess._file.model.graph.nodes if n.op_type == op)
    w_name, r_name = node.inputs[1], node.inputs[2]
    assert memory.groupings(sess._file.model.graph)[r_name] == memory.SLOTS
    dcm = dcrt.open_dcm(str(path))
    decoded = {n: t.decode() for n, t in dcm.tensors.items()}
    for batch in (1, 3):
        feeds = zoo.sample_input(onnx.load(str(onnx_path(name))), batch=batch, seed=batch)
        for g, e in zip(sess.run(None, feeds), run_ort(to_onnx(dcm.model, decoded), feeds)):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    r = sess._weight(r_name)
    assert type(r) is PerDirection and all(type(m) is TableRows for m in r.matrices)
    assert held_as(r).startswith("table slots 40%") and held_as(sess._weight(w_name)) == "indices uint8"
    np.testing.assert_array_equal(r.dense(), decoded[r_name])
    slices = sum(m.__dict__["_sliced"].nbytes for m in r.matrices if m.__dict__.get("_sliced"))
    assert (slices > 0) == (numba_kernels.kernels() is not None and numba_kernels.wide_vectors())  # both at batch 1
    assert r.nbytes - slices < decoded[r_name].size      # the slots: under a byte a weight
    held, predicted = sess.resident_bytes(), report.size(str(path))["memory_bytes"]
    assert held["now"] - slices == held["index"] == predicted["index"]
    assert predicted["slices"] == slices if slices else predicted["slices"] > 0.1 * predicted["index"]
    assert report.inspect(str(path))["total"]["memory_bytes"] == predicted


@pytest.mark.parametrize("name", ["resnet18_tiny", "mobilenet_v2_tiny"])
def test_small_models_compute_from_small_tiles_and_few_columns(name, onnx_path, dcm_path, zoo, monkeypatch):
    """32-px models at batch 1, default compression: in index mode their weights of up to 64 KB are
    expanded whole for each call (the conv runners take them as arrays) and their last stage (2x2
    and 1x1 maps) multiplies from the indices (``lmatmul`` of 1-4 columns); the output equals
    onnxruntime running the decoded weights, and dense mode's."""
    from dcrt.runtime import indexed, kernels, numba_kernels
    from onnx_export import run_ort, to_onnx
    used = {"whole": 0, "by rows": 0}

    def counted(key, fn):
        def call(*args, **kwargs):
            used[key] += 1
            return fn(*args, **kwargs)
        return call
    original = kernels._as_array

    def as_array(w):
        whole = original(w)
        return whole if whole is None or isinstance(w, np.ndarray) else counted("whole", whole)
    monkeypatch.setattr(kernels, "_as_array", as_array)
    monkeypatch.setattr(indexed, "_lmatmul_by_rows", counted("by rows", indexed._lmatmul_by_rows))
    path = dcm_path(name)
    feeds = zoo.sample_input(onnx.load(str(onnx_path(name))), batch=1)
    dcm = dcrt.open_dcm(str(path))
    expected = run_ort(to_onnx(dcm.model, {n: t.decode() for n, t in dcm.tensors.items()}), feeds)
    got = dcrt.Session(str(path)).run(None, feeds)
    dense = dcrt.Session(str(path), mode="dense").run(None, feeds)
    for g, d, e in zip(got, dense, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g, d, rtol=1e-4, atol=1e-5)
    if numba_kernels.kernels() is not None:
        assert used["whole"] >= 10 and used["by rows"] >= 1, used


def test_api_forms(dcm_path, zoo):
    sess = dcrt.Session(dcm_path("lenet5"))
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "input" and inp.shape == ["N", 1, 28, 28] and inp.type == "tensor(float)"
    assert out.name == "logits"
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    y = sess.run(x)
    assert isinstance(y, np.ndarray) and y.shape == (2, 10)
    (y2,) = sess.run(None, {"input": x})
    (y3,) = sess.run(["logits"], {"input": x})
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(y, y3)
    from_bytes = dcrt.Session(dcm_path("lenet5").read_bytes())
    np.testing.assert_array_equal(from_bytes.run(x), y)


@pytest.mark.parametrize("feed, message", [
    ({"image": np.zeros((1, 1, 28, 28), np.float32)}, "unknown input"),
    ({"input": np.zeros((1, 1, 28, 28), np.float64)}, "must be float32"),
    ({"input": np.zeros((1, 3, 28, 28), np.float32)}, r"must have shape \['N', 1, 28, 28\]"),
    ({"input": np.zeros((1, 28, 28), np.float32)}, "must have shape"),
    ({}, "missing input"),
])
def test_wrong_inputs(feed, message, dcm_path):
    sess = dcrt.Session(dcm_path("lenet5"))
    with pytest.raises(InputError, match=message):
        sess.run(None, feed)
    with pytest.raises(InputError, match="unknown output"):
        sess.run(["nope"], {"input": np.zeros((1, 1, 28, 28), np.float32)})


def test_call_mistakes_are_named(dcm_path):
    """What onnxruntime's fingers get wrong, as InputErrors saying what to write instead; ``run([])``
    gives every output, as onnxruntime; ``profile(x)`` takes the array as ``run(x)`` does."""
    sess = dcrt.Session(dcm_path("lenet5"))
    x = np.zeros((1, 1, 28, 28), np.float32)
    for call, message in [(lambda: sess.run({"input": x}), r"run\(None, \{name: array\}\)"),
                          (lambda: sess.run(None, x), "the feed must be a dict"),
                          (lambda: sess.run("logits", {"input": x}), r"run\(\['logits'\], feed\)"),
                          (lambda: sess.run(None, {"input": [[1.0], [1.0, 2.0]]}), "input 'input' is not an array"),
                          (lambda: dcrt.Session(dcm_path("lenet5"), "Dense"), "mode must be one of"),
                          (lambda: dcrt.Session(dcm_path("lenet5"), ort.SessionOptions()), "not onnxruntime's "
                           "SessionOptions: leave it out"),
                          (lambda: dcrt.Session(dcm_path("lenet5"), sess_options=ort.SessionOptions()),
                           "not onnxruntime's SessionOptions")]:
        with pytest.raises(InputError, match=message):
            call()
    (y,) = sess.run([], {"input": x})
    np.testing.assert_array_equal(y, sess.run(x))
    assert [r.name for r in sess.profile(x, runs=1)][:1] == ["conv1"]
    # onnxruntime's code runs unchanged: providers, run_options
    as_ort = dcrt.Session(dcm_path("lenet5"), providers=[("CPUExecutionProvider", {})])
    assert as_ort.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(as_ort.run(None, {"input": x}, None)[0], y)
    with pytest.raises(InputError, match="CPU only"):
        dcrt.Session(dcm_path("lenet5"), providers=["CUDAExecutionProvider"])


def test_modelmeta_answers_as_onnxruntime(tmp_path):
    """``get_modelmeta()``: the graph name and the source's ``metadata_props`` under onnxruntime's
    attribute names, as its session answers them for the original; the producer is the .dcm's."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny_relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"labels": "cat,dog", "author": "dcrt tests"})
    onnx.save(model, tmp_path / "m.onnx")
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"))
    meta = dcrt.Session(tmp_path / "m.dcm").get_modelmeta()
    theirs = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.graph_name == theirs.graph_name == "tiny_relu"
    assert meta.custom_metadata_map == theirs.custom_metadata_map == {"labels": "cat,dog", "author": "dcrt tests"}
    assert meta.producer_name == f"dcrt {dcrt.__version__}" and meta.format_version == (1, 0)
    assert meta.opsets == {"": 13} and meta.source["file_name"] == "m.onnx" and meta.source["format"] == "onnx"
    # hashable as onnxruntime's objects are (sets, dict keys); equal ones hash alike
    again = dcrt.Session(tmp_path / "m.dcm")
    assert {meta, again.get_modelmeta()} == {meta} and hash(meta) == hash(again.get_modelmeta())
    args = again.get_inputs() + again.get_outputs()
    assert len(set(args)) == 2 and set(args) == set(dcrt.Session(tmp_path / "m.dcm").get_inputs() + args[1:])


def test_outputs_never_share_memory_with_inputs_or_each_other(tmp_path):
    """An output that is an input (or a view of one: Reshape) and two outputs that are the same value
    come back as arrays of their own, as onnxruntime's: writing to one changes nothing else."""
    from onnx import TensorProto, helper
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [6])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("Identity", ["flat"], ["same"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "flat", "same")], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for mode in ("index", "dense", "stream"):
        outs = dcrt.Session(str(tmp_path / "m.dcm"), mode=mode).run(None, {"x": x})
        outs += dcrt.Session(str(tmp_path / "m.dcm"), mode=mode).run(["flat", "flat"], {"x": x})
        for i, y in enumerate(outs):
            assert not np.may_share_memory(y, x) and not any(np.may_share_memory(y, o) for o in outs[:i])
        for y in outs:
            y[...] = -1
        np.testing.assert_array_equal(x, np.arange(6).reshape(2, 3))


def test_lazy_loading_and_modes(dcm_path):
    path = dcm_path("lenet_300_100")
    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    results, resident = {}, {}
    for mode in ("index", "dense", "stream"):
        sess = dcrt.Session(str(path), mode=mode)
        assert sess.resident_bytes()["now"] == 0                 # nothing decoded at open
        results[mode] = sess.run(x)
        resident[mode] = sess.resident_bytes()
    np.testing.assert_allclose(results["index"], results["dense"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results["stream"], results["dense"], rtol=1e-5, atol=1e-6)
    # what dcrt size predicts is what the session holds
    assert resident["index"]["now"] == resident["index"]["index"]
    assert resident["dense"]["now"] == resident["dense"]["dense"]
    assert resident["stream"]["now"] < resident["index"]["now"] < 0.2 * resident["dense"]["now"]


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5"])      # Gemm nodes; Conv nodes
def test_stream_mode_keeps_no_weight_after_a_run(name, onnx_path, dcm_path, zoo):
    """A stream-mode run decodes each weight for its node and lets it go: once it returns, nothing it
    decoded is still allocated (the nodes keep their prepared runners, which hold no weight)."""
    feeds = zoo.sample_input(onnx.load(str(onnx_path(name))), batch=1)
    sess = dcrt.Session(str(dcm_path(name)), mode="stream")
    sess.run(None, feeds)                   # runners prepared, kernels loaded
    tracemalloc.start()
    try:
        sess.run(None, feeds)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    weights = sess.resident_bytes()["index"]
    assert held < weights / 10, (held, weights)


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5", "lstm_classifier", "gru_classifier"])
def test_stream_mode_computes_from_index_forms(name, onnx_path, dcm_path, zoo, monkeypatch):
    """Stream mode never decodes a compressed weight to float32: each node gets an index form, the
    size ``dcrt.memory.stream_bytes`` says (and ``dcrt size``'s stream row is the most that one node
    holds at once, an LSTM or GRU its W and R, plus the raw tensors), and a run's peak allocation
    exceeds index mode's (activations, tiles, product tables) by under a third of the largest
    weight's float32: its decoded symbols, a byte a weight, beside its index form while it is built
    (with numba: numpy's Huffman decoder has temporaries of its own). The GRU classifier: 160 KB
    against 95 KB in index mode, whose GRU takes its R's slices and W's projection in one kernel."""
    from dcrt import memory
    from dcrt.format.reader import StoredTensor
    from dcrt.runtime import numba_kernels
    from dcrt.runtime import session as session_module
    original_decode, original_weight = StoredTensor.decode, session_module.stream_weight

    def refuse(self):
        assert self.encoding == "raw", f"stream mode decoded {self.name} to float32"
        return original_decode(self)
    built = {}

    def recorded(t, grouping=memory.ROWS):
        weight = original_weight(t, grouping)
        built[t.name] = weight.nbytes
        return weight

    def peak(sess):
        sess.run(None, feeds)      # weights decoded (index mode), kernels loaded, runners prepared
        tracemalloc.start()
        try:
            sess.run(None, feeds)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    feeds = zoo.sample_input(onnx.load(str(onnx_path(name))), batch=1)
    want = dcrt.Session(str(dcm_path(name)), mode="dense").run(None, feeds)
    index_peak = peak(dcrt.Session(str(dcm_path(name))))
    monkeypatch.setattr(StoredTensor, "decode", refuse)
    monkeypatch.setattr(session_module, "stream_weight", recorded)
    sess = dcrt.Session(str(dcm_path(name)), mode="stream")
    for got, expected in zip(sess.run(None, feeds), want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    tensors = sess._tensors
    assert built and set(built) == {n for n, t in tensors.items() if t.encoding != "raw"}
    for tensor_name, nbytes in built.items():
        assert nbytes == memory.stream_bytes(tensors[tensor_name].record, sess._grouping.get(tensor_name, memory.ROWS))
    raw = sum(t.record.stats.original_bytes for t in tensors.values() if t.encoding == "raw")
    together = max(sum(built.get(n, 0) for n in set(node.inputs)) for node in sess._file.model.graph.nodes)
    assert sess.resident_bytes()["stream"] == raw + together
    assert together > max(built.values()) if name == "lstm_classifier" else together == max(built.values())
    largest = max(t.size * 4 for t in tensors.values() if t.encoding != "raw")
    assert max(built.values()) < largest / 3
    stream_peak = peak(sess)
    assert stream_peak < index_peak + largest / 3 or numba_kernels.kernels() is None, (stream_peak, index_peak, largest)


def test_index_mode_never_expands_a_compressed_weight(dcm_path, monkeypatch):
    """By construction (dense() refuses) and by measurement (peak allocation < half the largest weight;
    with numba: numpy's expansion also builds intp indices, see ``indexed._tile_rows``). A recurrent
    ``R`` held as table slots adds its product table (codebook x columns, not the weight's rows: the
    LSTM classifier's 128 KB against its R's 256 KB as float32)."""
    from dcrt.format.reader import StoredTensor
    from dcrt.runtime import numba_kernels
    from dcrt.runtime.indexed import PerDirection, TableRows

    def refuse(self):
        raise AssertionError("a compressed weight was expanded to dense float32")
    monkeypatch.setattr(IndexedWeight, "dense", refuse)
    monkeypatch.setattr(SparseWeight, "dense", refuse)
    original_decode = StoredTensor.decode
    monkeypatch.setattr(StoredTensor, "decode",
                        lambda self: refuse(self) if self.encoding != "raw" else original_decode(self))
    for name, shape, dtype in [("lenet_300_100", (1, 784), np.float32), ("lenet5", (1, 1, 28, 28), np.float32),
                               ("lstm_classifier", (1, 16), np.int64)]:
        sess = dcrt.Session(str(dcm_path(name)))
        x = np.random.default_rng(0).integers(0, 1000, shape).astype(dtype) if dtype == np.int64 \
            else np.random.default_rng(0).standard_normal(shape).astype(dtype)
        sess.run(x)                                    # decode indices once
        largest = max(t.size * 4 for t in sess._tensors.values() if t.encoding != "raw")
        table = max((m.codebook.size * m.shape[1] * 4 for w in sess._cache.values() if isinstance(w, PerDirection)
                     for m in w.matrices if isinstance(m, TableRows)), default=0)
        assert (name == "lstm_classifier") == (table > 0)
        tracemalloc.start()
        sess.run(x)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < largest / 2 + table or numba_kernels.kernels() is None, (name, peak, largest, table)


def test_outputs_are_the_callers_and_weights_constant(tmp_path):
    """Decoded weights are read-only constants in every mode (kernels may keep what they derive from
    them); an output that is a weight comes back as the caller's own writable copy."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Identity", ["w"], ["w_out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    for options in ({}, LOSSLESS):
        dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"), force=True, **options)
        x = np.ones((1, 64), np.float32)
        for mode in ("index", "dense", "stream"):
            sess = dcrt.Session(str(tmp_path / "m.dcm"), mode=mode)
            y, w_out = sess.run(None, {"x": x})
            assert w_out.flags.writeable and y.flags.writeable
            w_out[...] = 0                          # the caller's copy: the session's weight is untouched
            y2, w_again = sess.run(None, {"x": x})
            np.testing.assert_array_equal(y2, y)
            assert np.abs(w_again).max() > 0
            assert all(not v.flags.writeable for v in sess._cache.values() if isinstance(v, np.ndarray))


def test_threads_share_one_session(dcm_path):
    sess = dcrt.Session(dcm_path("resnet_small"))
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    expected = [dcrt.Session(dcm_path("resnet_small")).run(x) for x in xs]
    results = [None] * len(xs)

    def work(i):
        for j in range(i, len(xs), 4):
            results[j] = sess.run(xs[j])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, e in zip(results, expected):
        np.testing.assert_array_equal(r, e)


def test_damaged_file_fails_cleanly(dcm_path):
    data = dcm_path("lenet5").read_bytes()
    x = np.zeros((1, 1, 28, 28), np.float32)
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "ok": 0}
    expected = dcrt.Session(data).run(x)
    for trial in range(60):
        buf = bytearray(data)
        if trial % 3 == 0:
            buf = buf[: rng.integers(1, len(buf))]
        else:
            for _ in range(rng.integers(1, 4)):
                buf[rng.integers(0, len(buf))] ^= 1 << int(rng.integers(0, 8))
        try:
            y = dcrt.Session(bytes(buf)).run(x)
        except FormatError:
            outcomes["error"] += 1
            continue
        np.testing.assert_array_equal(y, expected)    # a flip in padding may be harmless, never silent
        outcomes["ok"] += 1
    assert outcomes["error"] >= 50


def test_runtime_imports_nothing_heavy(dcm_path, tmp_path):
    """Run a model with onnx, onnxruntime, h5py, protobuf and numba blocked from import."""
    script = tmp_path / "blocked.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("onnx", "onnxruntime", "h5py", "google", "numba", "yaml"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, dcrt
        sess = dcrt.Session({str(dcm_path("lenet5"))!r})
        y = sess.run(np.zeros((1, 1, 28, 28), np.float32))
        assert y.shape == (1, 10)
        heavy = [m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime", "google", "numba", "h5py")]
        assert not heavy, heavy
        print("ok")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_dcrt_run_command(dcm_path, tmp_path, capsys):
    from dcrt.cli import main
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(dcm_path("lenet5")), "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "y.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), dcrt.Session(dcm_path("lenet5")).run(x))
    np.save(tmp_path / "bad.npy", x[0])
    assert main(["run", str(dcm_path("lenet5")), "--input", str(tmp_path / "bad.npy")]) == 2
    assert "must have shape" in capsys.readouterr().err


def test_profile_times_each_node_where_its_work_is(dcm_path, tmp_path):
    """One row per step, in execution order, named after its node, an activation run in the node's pass
    named with it, its weight described as the mode holds it; the time of each node is its own: a
    heavy MatMul outweighs the Relu after it, and in stream mode a node's time includes decoding its
    weight (which the executor does while gathering the node's inputs)."""
    path = dcm_path("lenet_300_100")
    x = {"input": np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)}
    profiles = {mode: dcrt.Session(str(path), mode=mode).profile(x, runs=3) for mode in ("index", "dense", "stream")}
    for mode, rows in profiles.items():
        assert [(r.name, r.op_type) for r in rows] == [("fc1", "Gemm+Relu"), ("fc2", "Gemm+Relu"), ("fc3", "Gemm")]
        assert all(r.seconds > 0 for r in rows)
    assert [r.weight for r in profiles["index"]] == ["CSR 10% by input and by rows", "CSR 10% by input", "CSR 10%"]
    assert {r.weight for r in profiles["dense"]} == {"float32"}
    # fc3 is stored QUANTIZED (smaller to download): stream mode takes its indices as decoded
    assert [r.weight for r in profiles["stream"]] == ["decoded per run: CSR 10% by input"] * 2 + [
        "decoded per run: indices uint8"]
    # decoding fc1 (23,520 Huffman-coded kept weights) costs far more than computing with it
    assert profiles["stream"][0].seconds > 5 * profiles["index"][0].seconds

    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="big"), helper.make_node("Relu", ["h"], ["y"], name="act")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 512])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"), **LOSSLESS)
    sess = dcrt.Session(str(tmp_path / "m.dcm"), mode="dense")
    big, act = sess.profile({"x": np.ones((64, 512), np.float32)}, runs=5)
    assert (big.name, big.op_type, big.weight, act.name, act.op_type, act.weight) == (
        "big", "MatMul", "float32", "act", "Relu", "")
    assert big.seconds > 3 * act.seconds        # 16.8M multiply-adds against 32K comparisons
    with pytest.raises(InputError, match="runs"):
        sess.profile({"x": np.ones((64, 512), np.float32)}, runs=0)
    with pytest.raises(ValueError, match="one entry per step"):
        sess._executor.run({"x": np.ones((64, 512), np.float32)}, sess._weight, None, [0.0])


def test_dense_layers_run_as_one_step_in_every_mode(dcm_path):
    """LeNet-300-100's three Gemm layers run as one step (``ops.nn.gemm_chain``) in index and dense
    mode, and compute exactly what they compute one by one (the plan ``profile`` times), at batch 1
    and 8, on the first call (which prepares the runners) and the next (which reuses them). Stream
    mode runs them one by one: a chain reads all its weights first, stream mode one at a time."""
    for mode in ("index", "dense", "stream"):
        sess = dcrt.Session(str(dcm_path("lenet_300_100")), mode=mode)
        steps = [s.node.name for s in sess._executor._default_plan.steps]
        assert steps == (["fc1", "fc2", "fc3"] if mode == "stream" else ["fc1 > fc2 > fc3"])
        out = sess.get_outputs()[0].name
        for batch in (1, 8, 1):
            x = np.random.default_rng(batch).standard_normal((batch, 784)).astype(np.float32)
            first, again = sess.run(x), sess.run(x)
            one_by_one = sess._executor.run({"input": x}, sess._weight, None, [0.0] * 3)[out]
            np.testing.assert_array_equal(first, one_by_one)
            np.testing.assert_array_equal(again, one_by_one)


def test_profile_names_every_way_a_weight_is_held(onnx_path, zoo, tmp_path):
    """The LSTM classifier with W and R pruned 90 %: its embedding stays dense 8-bit indices, W and R
    become one CSR matrix per direction, and the 2x128 head keeps CSR rows (a pointer per input
    would cost more than grouping by input saves)."""
    path = tmp_path / "lstm90.dcm"
    dcrt.convert(str(onnx_path("lstm_classifier")), str(path),
                 config={"layers": {"lstm.W": {"sparsity": 0.9}, "lstm.R": {"sparsity": 0.9}}})
    feed = zoo.sample_input(onnx.load(str(onnx_path("lstm_classifier"))), batch=1)
    held = {r.op_type: r.weight for r in dcrt.Session(str(path)).profile(feed, runs=1)}
    assert held["Gather"] == "indices uint8"
    assert held["LSTM"] == "CSR 10% per direction, CSR 10% per direction"
    assert held["Gemm"] == "CSR 10%"


def test_gemm_weights_are_kept_by_input(tmp_path):
    """In index mode a pruned weight read only by ``Gemm(transB=1)`` is kept grouped by input
    (``memory.by_input``); one also read another way, read by ``Gemm(transB=0)``, or so wide that a
    pointer per input would cost over 1/8 more bytes keeps its rows. The results match dense mode,
    and ``dcrt size`` predicts the bytes each form holds."""
    from onnx import TensorProto, helper, numpy_helper

    from dcrt import memory, report
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (128, 256)), ("w2", (128, 64)), ("w3", (64, 64)), ("w4", (8, 2048)))]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h1"], transB=1), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2"], ["h2"]),                  # transB=0: x @ W
             helper.make_node("Gemm", ["h2", "w3"], ["h3"], transB=1),
             helper.make_node("MatMul", ["h2", "w3"], ["h4"]), helper.make_node("Add", ["h3", "h4"], ["y"]),
             helper.make_node("Gemm", ["z", "w4"], ["v"], transB=1)]          # 2048 inputs, ~1.6 kept each
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x", ["N", 256]), value("z", ["N", 2048])],
                              [value("y", ["N", 64]), value("v", ["N", 8])], inits)
    src, dst = tmp_path / "m.onnx", tmp_path / "m.dcm"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dcrt.convert(str(src), str(dst))
    feed = {"x": rng.standard_normal((3, 256)).astype(np.float32),
            "z": rng.standard_normal((3, 2048)).astype(np.float32)}
    sess, dense = dcrt.Session(str(dst)), dcrt.Session(str(dst), mode="dense")
    for got, expected in zip(sess.run(None, feed), dense.run(None, feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert memory.by_input(sess._file.model.graph) == {"w1"}
    assert isinstance(sess._weight("w1"), ByInput) and sess._weight("w1").inner.shape == (256, 128)
    assert all(type(sess._weight(n)) is SparseWeight for n in ("w2", "w3", "w4"))
    held = sess.resident_bytes()
    assert held["now"] == held["index"] == report.size(str(dst))["memory_bytes"]["index"]


def test_gemm_weights_with_a_product_table_are_kept_both_ways(tmp_path):
    """A Gemm weight kept by input whose rows would take a product table (``memory.BOTH``: LeNet's fc1,
    300x784 at 10 %, reading the graph input) is also kept by rows, as table slots; one that reads a
    ReLU's output (w3: through a Flatten) or has too few kept weights for its table (w2, 100x300 at
    10 %) only by input. Dense and sparse activations (the two paths) give dense mode's results, and
    ``dcrt size`` predicts the bytes held."""
    from onnx import TensorProto, helper, numpy_helper

    from dcrt import memory, report
    from dcrt.runtime.indexed import TableRows
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (300, 784)), ("w3", (300, 300)), ("w2", (100, 300)))]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "w3"], ["h3"], transB=1),
             helper.make_node("Relu", ["h3"], ["r3"]), helper.make_node("Gemm", ["r3", "w2"], ["y"], transB=1)]
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x", ["N", 784])], [value("y", ["N", 100])], inits)
    src, dst = tmp_path / "m.onnx", tmp_path / "m.dcm"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dcrt.convert(str(src), str(dst))
    sess, dense = dcrt.Session(str(dst)), dcrt.Session(str(dst), mode="dense")
    records = {n: sess._tensors[n].record for n in ("w1", "w3", "w2")}
    assert [memory.product_table_pays(r.shape[1], r.stats.codebook_size + 1, r.stats.nonzero_count)
            for r in records.values()] == [True, True, False]
    assert memory.groupings(sess._file.model.graph) == {"w1": memory.BOTH, "w3": memory.INPUTS, "w2": memory.INPUTS}
    w1, w2 = sess._weight("w1"), sess._weight("w2")
    assert isinstance(w1, ByInput) and isinstance(w1.rows, TableRows) and w1.rows.slots.dtype == np.uint16
    assert isinstance(w2, ByInput) and w2.rows is None and sess._weight("w3").rows is None
    x = rng.standard_normal((1, 784)).astype(np.float32)
    sparse_x = np.where(rng.random((1, 784)) < 0.6, 0, x).astype(np.float32)
    for feed in (x, sparse_x, np.concatenate([x, sparse_x])):
        np.testing.assert_allclose(sess.run(None, {"x": feed})[0], dense.run(None, {"x": feed})[0],
                                   rtol=1e-4, atol=1e-4)
    held = sess.resident_bytes()
    assert held["now"] == held["index"] == report.size(str(dst))["memory_bytes"]["index"]
    assert [r.weight for r in sess.profile({"x": x}, runs=1)] == ["CSR 10% by input and by rows", "",
                                                                  "CSR 10% by input", "CSR 10% by input"]


def test_pruned_quantized_weights_are_kept_as_csr(tmp_path):
    """A QUANTIZED tensor with a zero centroid for its pruned weights (the converter's choice when it
    downloads smaller than SPARSE) is kept in index mode as CSR when that takes fewer bytes than its
    dense indices (80 % pruned; grouped by input for a Gemm weight), and as dense indices when not
    (30 %) or when nothing is pruned. The results match dense mode; ``dcrt size`` predicts the bytes."""
    from onnx import TensorProto, helper, numpy_helper

    from dcrt import memory, report
    from dcrt.format.tensor import QUANTIZED
    rng = np.random.default_rng(1)
    shapes = {"w80": (16, 2, 3, 3), "w30": (16, 2, 3, 3), "w0": (16, 2, 3, 3), "fc": (64, 24)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["im", n], [f"c{n}"]) for n in shapes if n != "fc"]
    nodes.append(helper.make_node("Gemm", ["x", "fc"], ["y"], transB=1))
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("im", ["N", 2, 8, 8]), value("x", ["N", 24])],
                              [value(f"c{n}", ["N", 16, 6, 6]) for n in shapes if n != "fc"] + [value("y", ["N", 64])],
                              inits)
    src, dst = tmp_path / "m.onnx", tmp_path / "m.dcm"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    sparsity = {"w80": 0.8, "w30": 0.3, "w0": 0.0, "fc": 0.8}
    dcrt.convert(str(src), str(dst), config={"layers": {n: {"sparsity": s, "bits": 4} for n, s in sparsity.items()}})
    sess, dense = dcrt.Session(str(dst)), dcrt.Session(str(dst), mode="dense")
    records = {n: sess._tensors[n].record for n in shapes}
    assert all(r.encoding == QUANTIZED for r in records.values())     # what the test is about
    assert [memory.pruned(records[n]) for n in shapes] == [True, True, False, True]
    assert memory.by_input(sess._file.model.graph) == {"fc"}         # 25 pointers by input, 65 by rows
    feed = {"im": rng.standard_normal((2, 2, 8, 8)).astype(np.float32),
            "x": rng.standard_normal((3, 24)).astype(np.float32)}
    for got, expected in zip(sess.run(None, feed), dense.run(None, feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    kept = sess._weight("w80")
    assert type(kept) is SparseWeight and kept.nnz == records["w80"].stats.nonzero_count
    np.testing.assert_array_equal(kept.dense(), dense._weight("w80"))
    assert type(sess._weight("w30")) is IndexedWeight and type(sess._weight("w0")) is IndexedWeight
    assert type(sess._weight("fc")) is ByInput
    np.testing.assert_array_equal(sess._weight("fc").dense(), dense._weight("fc"))
    held = sess.resident_bytes()
    assert held["now"] == held["index"] == report.size(str(dst))["memory_bytes"]["index"]


def test_recurrent_weights_are_kept_per_direction(tmp_path):
    """In index mode a pruned W or R read only by recurrent operators is kept as one CSR matrix per
    direction (``memory.per_direction``: taking a direction costs nothing), whether the file stores
    it SPARSE or QUANTIZED; one that is also a graph output keeps the CSR over directions. The results
    match onnxruntime on the dense weights, and ``dcrt size`` predicts the bytes."""
    from onnx import TensorProto, helper, numpy_helper

    from dcrt import memory, report
    from dcrt.runtime.indexed import PerDirection
    rng = np.random.default_rng(2)
    hidden, inputs = 24, 40
    shapes = {"W": (2, 4 * hidden, inputs), "R": (2, 4 * hidden, hidden), "Wg": (1, 3 * hidden, inputs),
              "Rg": (1, 3 * hidden, hidden)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden, direction="bidirectional"),
             helper.make_node("GRU", ["x", "Wg", "Rg"], ["yg"], hidden_size=hidden)]
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x", [5, 3, inputs])],
                              [value("y", None), value("yg", None), value("Rg", None)], inits)   # Rg: an output too
    src, dst = tmp_path / "m.onnx", tmp_path / "m.dcm"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dcrt.convert(str(src), str(dst), config={"layers": {n: {"sparsity": 0.9, "bits": 5} for n in shapes}})
    sess = dcrt.Session(str(dst))
    from dcrt.format.tensor import QUANTIZED, SPARSE
    assert {sess._tensors[n].record.encoding for n in ("W", "R", "Wg")} == {QUANTIZED, SPARSE}
    assert memory.per_direction(sess._file.model.graph) == {"W", "R", "Wg"}
    feed = {"x": rng.standard_normal((5, 3, inputs)).astype(np.float32)}
    got = sess.run(None, feed)
    for n in ("W", "R", "Wg"):
        weight = sess._weight(n)
        assert type(weight) is PerDirection and all(type(m) is SparseWeight for m in weight.matrices)
        assert weight[0] is weight[0] and weight.shape == shapes[n]
    assert type(sess._weight("Rg")) is SparseWeight and sess._weight("Rg").shape == shapes["Rg"]
    dense = dcrt.Session(str(dst), mode="dense")
    decoded = {n: dense._weight(n) for n in shapes}
    for n in ("W", "R", "Wg"):
        np.testing.assert_array_equal(sess._weight(n).dense(), decoded[n])
    # onnxruntime on the original graph with the weights as the file holds them
    exact = onnx.load(str(src))
    for t in exact.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(decoded[t.name], t.name))
    ref = ort.InferenceSession(exact.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    held = sess.resident_bytes()
    assert held["now"] == held["index"] == report.size(str(dst))["memory_bytes"]["index"]


@pytest.mark.parametrize("op, opset", [("Conv", 17), ("Softmax", 11), ("LogSoftmax", 11), ("Hardmax", 11)])
def test_an_empty_batch_gives_empty_outputs(op, opset, tmp_path):
    """N = 0, as onnxruntime: outputs of the right shape with no rows, in every mode (Conv's kernels and
    the 2-D view of opset-11 Softmax reshaped by -1, which a size of 0 leaves undefined)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    conv = op == "Conv"
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node(op, ["x", "w"] if conv else ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")] if conv else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"), bits=32, prune=False)
    for batch in (0, 2):
        x = np.random.default_rng(1).standard_normal((batch, 4, 8, 8)).astype(np.float32)
        want = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for mode in ("index", "dense", "stream"):
            got = dcrt.Session(str(tmp_path / "m.dcm"), mode=mode).run(x)
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lstm_classifier", "gru_classifier"])
@pytest.mark.parametrize("options", [{}, {"sparsity": 0.9}])
def test_recurrent_layers_on_an_empty_batch(name, options, dcm_path):
    """N = 0 reaches no compiled recurrent kernel (their batch-1 paths read and wrote row 0 of empty
    arrays: heap corruption, a crash later); the outputs are empty, as dense mode's."""
    path = dcm_path(name, **options)
    for mode in ("index", "dense", "stream"):
        sess = dcrt.Session(path, mode=mode)
        assert sess.run(np.zeros((0, 7), np.int64)).shape == (0, 2)
        y = sess.run(np.ones((3, 7), np.int64))                   # and the session still runs
        assert y.shape == (3, 2) and np.isfinite(y).all()
        with pytest.raises(InputError, match=r"node 'embedding' \(Gather\): index 1000 is out of bounds .* "
                                             r"\(valid: -1000 to 999\)"):
            sess.run(np.full((1, 7), 1000, np.int64))


def test_a_file_written_over_while_open(dcm_path, tmp_path):
    """The file is memory-mapped: cut short in place (``cp smaller.dcm model.dcm``), a read past its new
    end would end the process with SIGBUS. Reads of the file check first (FormatError); once every
    weight is decoded (index and dense mode) runs read only memory of their own. In a subprocess:
    a regression is a crash."""
    import shutil
    path = tmp_path / "m.dcm"
    script = textwrap.dedent(f"""
        import numpy as np, dcrt, shutil
        x = np.ones((1, 784), np.float32)
        for mode in ("index", "dense", "stream"):
            for warm in (False, True):
                shutil.copy({str(dcm_path("lenet_300_100"))!r}, {str(path)!r})
                s = dcrt.Session({str(path)!r}, mode=mode)
                y = s.run(x) if warm else None
                with open({str(path)!r}, "r+b") as f:
                    f.truncate(1000)
                try:
                    again = s.run(x)
                    print(mode, warm, "ran", bool(np.array_equal(again, y)))
                except dcrt.FormatError as e:
                    print(mode, warm, "FormatError", "was written over while open" in str(e))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:-1] == ["index False FormatError True", "index True ran True",
                                            "dense False FormatError True", "dense True ran True",
                                            "stream False FormatError True", "stream True FormatError True"]
    shutil.copy(dcm_path("lenet_300_100"), path)
    buf = bytearray(path.read_bytes())
    sess = dcrt.Session(buf)
    y = sess.run(np.ones((1, 784), np.float32))
    buf[:] = b"\0" * len(buf)           # the caller's buffer reused: the session kept its own copy
    np.testing.assert_array_equal(sess.run(np.ones((1, 784), np.float32)), y)
    import copy
    import pickle
    for clone in (pickle.dumps, copy.deepcopy):
        with pytest.raises(InputError, match="cannot be pickled or copied"):
            clone(sess)
    assert repr(sess) == f"<dcrt.Session {len(buf)} bytes mode=index>"
    sess.close()
    with pytest.raises(InputError, match="the session is closed"):
        sess.run(np.ones((1, 784), np.float32))
    assert repr(sess).endswith("closed>")


def test_weights_inside_if_branches_are_counted_and_kept(tmp_path, monkeypatch):
    """Initializers of subgraphs (an If branch's weight) are rows of `dcrt inspect`, part of every size
    and memory number and of `dcrt verify`, and a session decodes each once and keeps it as the
    graph's own (they were read from the file on every run and counted nowhere). The two branches
    each have their own weight named W: each computes with its own."""
    from onnx import TensorProto, helper, numpy_helper
    from dcrt.format import open_dcm
    from dcrt.format.reader import StoredTensor
    from dcrt.report import inspect, size
    rng = np.random.default_rng(1)

    def branch(name):
        w = numpy_helper.from_array((rng.standard_normal((256, 256)) * 0.05).astype(np.float32), "W")
        return helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["o_" + name], transB=1)], name, [],
                                 [helper.make_tensor_value_info("o_" + name, TensorProto.FLOAT, [1, 256])], [w])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "if.onnx"))
    dcm = str(tmp_path / "if.dcm")
    dcrt.convert(str(tmp_path / "if.onnx"), dcm)
    weights = 4 + 2 * 256 * 256 * 4
    assert {r["layer"] for r in inspect(dcm)["layers"]} == {"zero", "W", "W (in then)"}
    report = size(dcm)
    assert report["memory_bytes"]["dense"] == report["original"]["weight_bytes"] == weights
    with open_dcm(dcm) as f:
        assert set(f.tensors) == {"zero", "W", "W (in then)"}
    decoded = []
    decode = StoredTensor.decode
    monkeypatch.setattr(StoredTensor, "decode", lambda t: decoded.append(t.name) or decode(t))
    for mode in ("index", "dense", "stream"):
        sess = dcrt.Session(dcm, mode=mode)
        assert sess.resident_bytes()[mode] == weights
        for x in (np.ones((1, 256), np.float32), -np.ones((1, 256), np.float32), np.ones((1, 256), np.float32)):
            np.testing.assert_allclose(sess.run(x), ort_run(tmp_path / "if.onnx", {"x": x})[0], rtol=1e-5, atol=1e-6)
        assert sorted(decoded) == ["W", "W", "zero"], (mode, decoded)     # once each, not every run
        assert sess.resident_bytes()["now"] == weights
        decoded.clear()


def test_a_weight_on_the_left_of_matmul_is_never_expanded(tmp_path):
    """``MatMul(W, x)``, a compressed W read first: computed from its held form (index and stream mode
    allocated a float32 copy of W on every run), equal to onnxruntime on the decoded weight."""
    from onnx import TensorProto, helper, numpy_helper
    from dcrt.format import open_dcm
    from dcrt.runtime import numba_kernels
    w = (np.random.default_rng(0).standard_normal((256, 256)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["W", "x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 4])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"))
    with open_dcm(str(tmp_path / "m.dcm")) as f:
        assert f.tensors["W"].encoding != "raw"
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(f.tensors["W"].decode(), "W"))
    onnx.save(model, str(tmp_path / "decoded.onnx"))
    x = np.random.default_rng(1).standard_normal((256, 4)).astype(np.float32)
    want = ort_run(tmp_path / "decoded.onnx", {"x": x})[0]
    for mode in ("index", "stream", "dense"):
        sess = dcrt.Session(str(tmp_path / "m.dcm"), mode=mode)
        np.testing.assert_allclose(sess.run(x), want, rtol=1e-4, atol=1e-5)
        tracemalloc.start()
        try:
            sess.run(x)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if mode == "index" or (mode == "stream" and numba_kernels.kernels() is not None):
            assert peak < w.nbytes / 2, (mode, peak)    # a copy of W: 262 KB; numpy twins hold tiles


def test_a_branch_weight_named_as_a_compressed_one_is_its_own(tmp_path):
    """An If branch's own ``W`` beside a top-level ``W`` that is compressed: the writer stored the
    branch's under the top-level one's record, so the branch computed with the other weight."""
    from onnx import TensorProto, helper, numpy_helper
    from dcrt.format import open_dcm
    rng = np.random.default_rng(0)
    w_top = rng.standard_normal((64, 64)).astype(np.float32)
    w_then = (rng.standard_normal((64, 64)) * 5).astype(np.float32)
    vi = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["yt"])], "then", [],
                             [vi("yt", TensorProto.FLOAT, ["B", 64])], [numpy_helper.from_array(w_then, "W")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["ye"])], "else", [],
                              [vi("ye", TensorProto.FLOAT, ["B", 64])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["h"], then_branch=then, else_branch=other),
                               helper.make_node("MatMul", ["h", "W"], ["y"])], "g",
                              [vi("c", TensorProto.BOOL, []), vi("x", TensorProto.FLOAT, ["B", 64])],
                              [vi("y", TensorProto.FLOAT, ["B", 64])], [numpy_helper.from_array(w_top, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"), bits=6, sparsity=0.5)
    with open_dcm(str(tmp_path / "m.dcm")) as f:
        assert f.tensors["W"].encoding != "raw" and np.array_equal(f.tensors["W (in then)"].decode(), w_then)
        graph.initializer[0].CopyFrom(numpy_helper.from_array(f.tensors["W"].decode(), "W"))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "decoded.onnx"))
    for cond in (True, False):
        feed = {"c": np.array(cond), "x": rng.standard_normal((2, 64)).astype(np.float32)}
        want = ort_run(tmp_path / "decoded.onnx", feed)[0]
        for mode in ("index", "dense", "stream"):
            np.testing.assert_allclose(dcrt.Session(str(tmp_path / "m.dcm"), mode=mode).run(None, feed)[0], want,
                                       rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("node", ["x @ W", "W @ x", "Gemm"])
def test_an_input_of_the_wrong_inner_size_is_an_error_in_every_mode(node, tmp_path):
    """A dynamic input fed with the wrong inner size: dense mode's numpy refused it, but index and
    stream modes' compiled kernels read past the weight's arrays and returned garbage."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    inputs = {"x @ W": ["x", "W"], "W @ x": ["W", "x"], "Gemm": ["x", "W"]}[node]
    op = helper.make_node("Gemm" if node == "Gemm" else "MatMul", inputs, ["y"])
    graph = helper.make_graph([op], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["A", "B"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"))
    wrong = np.ones((3, 16), np.float32) if node != "W @ x" else np.ones((16, 3), np.float32)
    for mode in ("index", "stream", "dense"):
        with pytest.raises(dcrt.DcrtError, match="failed on inputs of shape"):
            dcrt.Session(str(tmp_path / "m.dcm"), mode=mode).run(None, {"x": wrong})
