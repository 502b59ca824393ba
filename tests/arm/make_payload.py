"""Build the payload the device-side check runs on (host side: needs dcrt[convert] and onnxruntime).

    python tests/arm/make_payload.py OUT_DIR

Writes ``OUT_DIR/dcrt`` (dcrt's core and runtime, as installed: ``runtime/`` becomes ``dcrt/runtime``;
no converters, no numba caches), ``OUT_DIR/device_check.py`` and ``OUT_DIR/models``: a few zoo models
converted with different plans and coders, each ``NAME.dcm`` with ``NAME.npz`` holding

- ``feed.<input>``: the input;
- ``ort.<j>``: onnxruntime's output on the original ONNX model (a lossless .dcm must match it);
- ``host.<mode>.<j>``: dcrt's output on this host in each mode (every .dcm must match it closely);
- ``w.<k>``: the values every compressed tensor decodes to on this host (must match bit for bit:
  decoding is integer work, so any endianness, alignment or int-size problem shows here);

and ``manifest.json`` (tensor names of the ``w.<k>`` keys, which plans are lossless).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

MODES = ("index", "dense", "stream")
LOSSLESS = {"prune": False, "bits": 32}
# (file name, zoo model, conversion options)
MODELS = [
    ("lenet_300_100", "lenet_300_100", {}),
    ("lenet_300_100-lossless", "lenet_300_100", LOSSLESS),
    ("lenet_300_100-none", "lenet_300_100", {"coder": "none"}),
    ("lenet_300_100-lzw", "lenet_300_100", {"coder": "lzw"}),
    ("lenet5-huffman+lzw", "lenet5", {"coder": "huffman+lzw"}),
    ("lenet5-lzw+huffman", "lenet5", {"coder": "lzw+huffman"}),
    ("lenet5-lossless", "lenet5", LOSSLESS),
    ("resnet_small", "resnet_small", {}),
    ("resnet_small-lossless", "resnet_small", LOSSLESS),
    ("mobilenet_v2_tiny", "mobilenet_v2_tiny", {}),
    ("lstm_classifier", "lstm_classifier", {}),
    ("gru_classifier-lossless", "gru_classifier", LOSSLESS),
    ("dcgan_generator", "dcgan_generator", {"coder": "lzw"}),
    ("with_constant_weights", "with_constant_weights", {}),
    ("pruned_clustered_mlp", "pruned_clustered_mlp", {}),
]


def copy_runtime(out: Path) -> None:
    """dcrt's core + runtime in the installed layout, without converters or compiled caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc", "converters")
    if (out / "dcrt").exists():
        shutil.rmtree(out / "dcrt")
    shutil.copytree(ROOT / "dcrt", out / "dcrt", ignore=ignore)
    shutil.copytree(ROOT / "runtime", out / "dcrt" / "runtime", ignore=ignore)
    shutil.copy(ROOT / "tests" / "arm" / "device_check.py", out / "device_check.py")


def main(out: Path) -> int:
    import onnx
    import onnxruntime as ort

    import dcrt
    import zoo
    from dcrt.format.tensor import RAW

    out.mkdir(parents=True, exist_ok=True)
    copy_runtime(out)
    models = out / "models"
    if models.exists():
        shutil.rmtree(models)
    models.mkdir()
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_name, options in MODELS:
            model = zoo.SMALL[model_name]()
            src = Path(tmp) / f"{name}.onnx"
            onnx.save(model, str(src))
            dcm = models / f"{name}.dcm"
            dcrt.convert(str(src), str(dcm), **options)
            feeds = zoo.sample_input(model, batch=2)
            arrays = {f"feed.{k}": v for k, v in feeds.items()}
            sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
            for j, y in enumerate(sess.run(None, feeds)):
                arrays[f"ort.{j}"] = np.asarray(y)
            for mode in MODES:
                for j, y in enumerate(dcrt.Session(str(dcm), mode=mode).run(None, feeds)):
                    arrays[f"host.{mode}.{j}"] = np.asarray(y)
            names = []
            with dcrt.open_dcm(str(dcm)) as f:
                for tname, t in sorted(f.tensors.items()):
                    if t.record.encoding != RAW:
                        arrays[f"w.{len(names)}"] = t.decode()
                        names.append(tname)
            np.savez(models / f"{name}.npz", **arrays)
            manifest[name] = {"model": model_name, "options": options, "tensors": names,
                              "lossless": options.get("bits") == 32 and options.get("prune") is False}
            print(f"{name}: {dcm.stat().st_size} bytes, {len(names)} compressed tensors", flush=True)
        # the control-flow model of the fuzz corpus: If subgraphs, a Constant attribute tensor, sparse weight
        from test_fuzz import control_flow_model
        from dcrt.format.writer import to_bytes
        model, records = control_flow_model()
        data = to_bytes(model, records, {"format": "test"})
        (models / "control_flow.dcm").write_bytes(data)
        feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
        arrays = {"feed.x": feeds["x"]}
        for mode in MODES:
            for j, y in enumerate(dcrt.Session(data, mode=mode).run(None, feeds)):
                arrays[f"host.{mode}.{j}"] = np.asarray(y)
        f = dcrt.open_dcm(data)
        names = sorted(n for n, t in f.tensors.items() if t.record.encoding != RAW)
        for k, n in enumerate(names):
            arrays[f"w.{k}"] = f.tensors[n].decode()
        np.savez(models / "control_flow.npz", **arrays)
        manifest["control_flow"] = {"model": "control_flow", "options": {}, "tensors": names, "lossless": False}
    (models / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"payload in {out}: {len(manifest)} models")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
