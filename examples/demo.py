"""The main job on example models: build ONNX models, compress them to .dcm, report sizes and fidelity.

    python examples/demo.py [names...]      # default: lenet_300_100 lenet5 resnet_small lstm_classifier

Builds each model with ``zoo.py`` (no download), converts it with the paper's default plan
(8-bit conv / 5-bit FC codebooks, conv pruned 50 %, FC 90 %, Huffman), prints the per-layer table
and the size report, then runs the .dcm (and a lossless conversion) with ``dcrt.Session`` and compares
the outputs with onnxruntime on the original ONNX file.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import dcrt  # noqa: E402
import zoo  # noqa: E402
from dcrt.cli import _print_layers, _print_size  # noqa: E402
from dcrt.report import inspect, size  # noqa: E402

DEFAULT = ["lenet_300_100", "lenet5", "resnet_small", "lstm_classifier"]


def fidelity(dcm_path: Path, lossless_path: Path, onnx_path: Path) -> str:
    """dcrt's outputs against onnxruntime on the original, on a random batch of 8."""
    import onnxruntime as ort
    model = onnx.load(str(onnx_path))
    feeds = zoo.sample_input(model, batch=8)
    expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    exact = dcrt.Session(str(lossless_path)).run(None, feeds)[0]
    got = dcrt.Session(str(dcm_path)).run(None, feeds)[0]
    err = float(np.max(np.abs(exact - expected)) / np.max(np.abs(expected)))
    e, g = expected.reshape(len(expected), -1), got.reshape(len(got), -1)
    cos = float(np.sum(e * g) / (np.linalg.norm(e) * np.linalg.norm(g)))
    top1 = float(np.mean(e.argmax(1) == g.argmax(1)))
    return (f"dcrt vs onnxruntime: lossless .dcm max relative error {err:.1e}; default compression "
            f"cosine {cos:.3f}, top-1 agreement {100 * top1:.0f}% (random weights, no retraining)")


def main(names) -> int:
    out = HERE / "models"
    out.mkdir(exist_ok=True)
    for name in names:
        src, dst = out / f"{name}.onnx", out / f"{name}.dcm"
        onnx.save(zoo.ZOO[name](), str(src))
        print(f"\n=== {name}: dcrt convert {src.name} -o {dst.name}")
        dcrt.convert(str(src), str(dst), force=True)
        lossless = out / f"{name}.lossless.dcm"
        dcrt.convert(str(src), str(lossless), force=True, prune=False, bits=32)
        _print_layers(inspect(str(dst)), only_coded=True)
        _print_size(size(str(dst), str(src)))
        print(fidelity(dst, lossless, src))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
