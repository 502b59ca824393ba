"""The dcrt command: convert / inspect / size / verify, and errors as messages with a non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dcrt.cli import main


@pytest.fixture(scope="module")
def converted(tmp_path_factory, onnx_path):
    out = tmp_path_factory.mktemp("cli") / "lenet5.dcm"
    assert main(["convert", str(onnx_path("lenet5")), "-o", str(out), "-q"]) == 0
    return out


def test_convert_prints_progress_table_and_summary(tmp_path, onnx_path, capsys):
    out = tmp_path / "m.dcm"
    assert main(["convert", str(onnx_path("lenet_300_100")), "-o", str(out), "--bits", "4",
                 "--sparsity", "0.8", "--coder", "auto"]) == 0
    captured = capsys.readouterr()
    assert "3/3 layers" in captured.err                       # the progress bar ran to the end
    assert "fc1.weight" in captured.out and "download (gzip -9)" in captured.out
    assert "80.0%" in captured.out
    assert "(+3 tensors stored uncompressed" in captured.out      # the three biases: a line, not rows
    assert "fc1.bias" not in captured.out
    # every tensor stored as float32: no rows, the line says where they went
    assert main(["convert", str(onnx_path("lenet_300_100")), "-o", str(out), "--bits", "32", "--no-prune",
                 "--force"]) == 0
    assert "(+6 tensors stored uncompressed" in capsys.readouterr().out


def test_inspect_json_matches_stored_stats(converted, capsys):
    assert main(["inspect", str(converted), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["layer"]: r for r in info["layers"]}
    assert rows["fc1.weight"]["shape"] == [500, 800] and rows["fc1.weight"]["codebook"] <= 31
    assert rows["fc1.weight"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert rows["conv1.weight"]["sparsity"] == pytest.approx(0.5, abs=2e-3)
    assert info["total"]["weights"] == 431080
    assert info["total"]["ratio"] > 10
    # running memory per layer (each mode) adds up to `dcrt size`'s totals; stream mode's is a peak
    memory = {mode: [r["memory_bytes"][mode] for r in info["layers"]] for mode in ("index", "dense", "stream")}
    assert rows["fc1.weight"]["memory_bytes"]["dense"] == 4 * 500 * 800
    assert rows["fc1.weight"]["memory_bytes"]["index"] < rows["fc1.weight"]["memory_bytes"]["dense"] / 5
    assert main(["size", str(converted), "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)["memory_bytes"]
    assert info["total"]["memory_bytes"] == sizes
    assert sum(memory["index"]) == sizes["index"] and sum(memory["dense"]) == sizes["dense"]
    assert max(memory["stream"]) < sizes["stream"] < sum(memory["stream"])
    assert main(["inspect", str(converted)]) == 0
    text = capsys.readouterr().out
    assert "bits/w" in text and "conv2.weight" in text and "total" in text and "in memory" in text


def test_inspect_plan_is_a_config_that_gives_the_same_bytes(converted, onnx_path, tmp_path, capsys):
    """``dcrt inspect --plan`` prints the stored plan (also ``--json``'s "plan"): edited and given back with
    ``--config`` it converts; unedited it gives the same bytes."""
    assert main(["inspect", str(converted), "--plan"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"]["fc1.weight"]["sparsity"] == pytest.approx(0.9) and plan["layers"]["fc1.weight"]["bits"] == 5
    assert main(["inspect", str(converted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == plan
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["convert", str(onnx_path("lenet5")), "-o", str(tmp_path / "again.dcm"), "--config",
                 str(tmp_path / "plan.json"), "-q"]) == 0
    assert (tmp_path / "again.dcm").read_bytes() == converted.read_bytes()
    plan["layers"]["fc1.weight"]["bits"] = 3
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["convert", str(onnx_path("lenet5")), "-o", str(tmp_path / "edited.dcm"), "--config",
                 str(tmp_path / "plan.json"), "-q"]) == 0
    assert main(["inspect", str(tmp_path / "edited.dcm"), "--plan"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"]["fc1.weight"]["bits"] == 3


def test_size_against_original(converted, onnx_path, capsys):
    original = onnx_path("lenet5")
    assert main(["size", str(converted), str(original), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["extracted_bytes"] == converted.stat().st_size
    assert r["original"]["file_bytes"] == original.stat().st_size
    assert r["download_bytes"] <= r["extracted_bytes"] < r["original"]["gzip_bytes"]
    assert r["memory_bytes"]["index"] < r["memory_bytes"]["dense"] / 3
    assert r["memory_bytes"]["stream"] < r["memory_bytes"]["dense"]
    assert r["memory_bytes"]["slices"] == 0                     # no recurrent weight
    assert main(["size", str(converted)]) == 0                 # original sizes stored in the file
    out = capsys.readouterr().out
    assert "lenet5.onnx" in out and "AVX-512" not in out


def test_size_adds_the_recurrent_slices_on_avx512(dcm_path, capsys):
    """``dcrt size`` of an LSTM model: a row for x86 with AVX-512, the index-mode bytes and the
    32-row slices a session builds there for ``R`` (``test_recurrent_r_is_kept_as_product_table_slots``
    checks them against a session's)."""
    from dcrt.report import human
    path = dcm_path("lstm_classifier")
    assert main(["size", str(path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["memory_bytes"]
    assert m["slices"] > 0.2 * m["index"]
    assert main(["size", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "AVX-512 (+ slices)" in line)
    assert human(m["index"] + m["slices"]) in row


def test_verify(converted, tmp_path, capsys):
    assert main(["verify", str(converted)]) == 0
    data = bytearray(converted.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(data))
    assert main(["verify", str(bad)]) != 0
    out = capsys.readouterr()
    assert "DAMAGED" in out.out or "damaged" in out.err
    bad.write_bytes(converted.read_bytes()[:-100])      # unreadable, not a verdict on its tensors: 2
    assert main(["verify", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["inspect", "/nonexistent.dcm"], "cannot open"),
    (["convert", "/nonexistent.onnx", "-o", "x.dcm"], "no such file"),
    (["convert", "model.h5", "-o", "x.dcm"], "no such file"),
    (["convert", "{onnx}", "-o", "{tmp}/x.dcm", "--bits", "99"], "bits must be"),
    (["convert", "{onnx}", "-o", "{tmp}/x.dcm", "--sparsity", "1.2"], "sparsity must be"),
    (["convert", "{onnx}", "-o", "{tmp}/x.dcm", "--coder", "zip"], "coder must be"),
])
def test_errors_are_messages_not_tracebacks(args, message, tmp_path, onnx_path, capsys):
    args = [a.format(onnx=onnx_path("lenet_300_100"), tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.dcm").exists()


def test_python_m_dcrt_and_not_a_dcm(tmp_path):
    bogus = tmp_path / "bogus.dcm"
    bogus.write_bytes(b"\x00" * 64)
    proc = subprocess.run([sys.executable, "-m", "dcrt", "inspect", str(bogus)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a .dcm" in proc.stderr and "Traceback" not in proc.stderr


def test_profile_command(dcm_path, tmp_path, capsys):
    """Per-node medians as a table or JSON, on random inputs (free dimensions set to 1, said on
    stderr) or the given ones; a bad --runs is refused by the parser."""
    import numpy as np
    path = str(dcm_path("lenet_300_100"))
    assert main(["profile", path, "--runs", "2", "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert [(n["name"], n["op_type"]) for n in report["nodes"]] == [("fc1", "Gemm+Relu"), ("fc2", "Gemm+Relu"),
                                                                    ("fc3", "Gemm")]
    assert all(n["ms"] > 0 for n in report["nodes"]) and report["run_ms"] > 0 and report["mode"] == "index"
    assert sum(report["by_op_ms"].values()) == pytest.approx(sum(n["ms"] for n in report["nodes"]))
    assert "input input: random float32 [1, 784] (free dimensions set to 1)" in out.err
    np.save(tmp_path / "x.npy", np.zeros((3, 784), np.float32))
    assert main(["profile", path, "--runs", "2", "--mode", "dense", "--input", f"input={tmp_path / 'x.npy'}"]) == 0
    out = capsys.readouterr()
    assert out.err == ""                          # nothing made up: the input was given
    assert "dense mode" in out.out and "by op type: Gemm+Relu" in out.out
    assert [line.split()[0] for line in out.out.splitlines()[2:5]] == ["fc1", "fc2", "fc3"]
    with pytest.raises(SystemExit):
        main(["profile", path, "--runs", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_profile_makes_up_only_the_inputs_not_given(tmp_path, capsys):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    import dcrt
    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT, name="cast"),
         helper.make_node("Add", ["a", "bf"], ["y"], name="sum")], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("b", TensorProto.INT64, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"))
    np.save(tmp_path / "a.npy", np.ones((2, 4), np.float32))
    assert main(["profile", str(tmp_path / "m.dcm"), "--runs", "1", "--input", f"a={tmp_path / 'a.npy'}"]) == 0
    out = capsys.readouterr()
    assert out.err.strip() == "input b: zero int64 [2, 4]"
    assert [line.split()[:2] for line in out.out.splitlines()[2:4]] == [["cast", "Cast"], ["sum", "Add"]]
    assert main(["profile", str(tmp_path / "m.dcm"), "--runs", "1"]) == 0
    assert capsys.readouterr().err.splitlines() == ["input a: random float32 [1, 4] (free dimensions set to 1)",
                                                     "input b: zero int64 [2, 4]"]


def _two_in_two_out(tmp_path):
    """A .dcm with inputs ``a``, ``b`` and outputs ``s = a + b``, ``d = a - b`` (no weights)."""
    import onnx
    from onnx import TensorProto, helper

    import dcrt
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Sub", ["a", "b"], ["d"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 3]) for n in "ab"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "sd"])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    dcrt.convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.dcm"))
    return str(tmp_path / "m.dcm")


def test_run_inputs_by_name_or_order_and_outputs_where_asked(tmp_path, capsys):
    """``--input``: NAME= only when NAME is an input (a path may hold '='), unnamed files fill the inputs
    not named, in order; anything but a plain .npy is a message. ``--output`` is written at exactly
    the path given (.npy for one output, .npz for all), never elsewhere."""
    import numpy as np
    model = _two_in_two_out(tmp_path)
    (tmp_path / "x=1").mkdir()
    a, b = np.full((2, 3), 5, np.float32), np.ones((2, 3), np.float32)
    np.save(tmp_path / "x=1" / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "out.npz"
    assert main(["run", model, "--input", f"b={tmp_path / 'b.npy'}", "--input", str(tmp_path / "x=1" / "a.npy"),
                 "--output", str(out)]) == 0
    with np.load(out) as z:
        np.testing.assert_array_equal(z["s"], a + b)
        np.testing.assert_array_equal(z["d"], a - b)       # a.npy went to 'a', the input left unnamed
    assert not (tmp_path / "out.npz.npz").exists()
    capsys.readouterr()
    np.savez(tmp_path / "ab.npz", a=a, b=b)
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "empty.npy").write_bytes(b"")
    for args, message in [
        ([f"a={tmp_path / 'ab.npz'}", str(tmp_path / "b.npy")], "is a .npz archive (holding a, b)"),
        ([str(tmp_path / "obj.npy"), str(tmp_path / "b.npy")], "not a .npy array (an array of Python objects"),
        ([str(tmp_path / "empty.npy"), str(tmp_path / "b.npy")], "not a .npy array"),
        ([str(tmp_path / "b.npy")] * 3, "3 unnamed --input file(s) but the model has 2 input(s) left"),
        ([f"a={tmp_path / 'b.npy'}"] * 2, "input 'a' is given twice"),
        ([f"bogus={tmp_path / 'b.npy'}"], "'bogus' is not an input of the model (its inputs: a, b)"),
    ]:
        assert main(["run", model] + [x for spec in args for x in ("--input", spec)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    feeds = ["--input", str(tmp_path / "x=1" / "a.npy"), "--input", str(tmp_path / "b.npy")]
    for target, message in [(tmp_path / "two.npy", "give --output a .npz path"), (tmp_path / "x=1", "is a folder")]:
        assert main(["run", model] + feeds + ["--output", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("two.npy*")) and sorted(p.name for p in (tmp_path / "x=1").iterdir()) == ["a.npy"]
    assert main(["run", model] + feeds + ["--output", str(tmp_path / "b.npy")]) == 2      # an input, not written over
    assert "is one of the --input files" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), b)


def test_convert_refuses_outputs_it_must_not_write_before_any_work(tmp_path, onnx_path, capsys):
    """The source itself (even with --force), a folder, a missing folder, a pipe: refused first, with
    the source untouched; through a symbolic link the target is replaced and the link kept."""
    import os
    import shutil
    src = tmp_path / "m.onnx"
    shutil.copy(onnx_path("lenet_300_100"), src)
    before = src.read_bytes()
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    for output, extra, message in [
        (src, ["--force"], "is the source file"),
        (tmp_path / "folder", ["--force"], "is a folder"),
        (tmp_path / "missing" / "m.dcm", [], "does not exist; create it first"),
        (tmp_path / "pipe", ["--force"], "not a regular file"),
    ]:
        assert main(["convert", str(src), "-o", str(output), "-q"] + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert src.read_bytes() == before and not (tmp_path / "missing").exists()
    assert not os.path.isfile(tmp_path / "pipe")
    (tmp_path / "target.dcm").write_bytes(b"old")
    os.symlink("target.dcm", tmp_path / "link.dcm")
    assert main(["convert", str(src), "-o", str(tmp_path / "link.dcm"), "-q", "--force"]) == 0
    assert os.path.islink(tmp_path / "link.dcm") and b"DCM1" in (tmp_path / "target.dcm").read_bytes()[:16]


def test_size_with_a_damaged_original_and_whole_number_options(converted, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    assert main(["size", str(converted), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.onnx is not a readable ONNX model" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["profile", str(converted), "--runs", "abc"])
    assert "--runs: expected a whole number, got 'abc'" in capsys.readouterr().err


def test_broken_pipe_ends_quietly(converted):
    """``dcrt inspect x.dcm | head -1``: no error message when the reader stops early."""
    proc = subprocess.run(f"{sys.executable} -m dcrt inspect {converted} | head -c 10", shell=True,
                          capture_output=True, text=True)
    assert proc.stderr == "" and len(proc.stdout) == 10
