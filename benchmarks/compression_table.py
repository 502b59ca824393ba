"""Print the README's results table: size and output fidelity of every small example model.

    python benchmarks/compression_table.py [names...]

For each zoo model: parameters, the ONNX file (and gzip'd), the .dcm with the default plan (and
gzip'd), the compression ratio, index-mode resident weight bytes, output fidelity against
onnxruntime on the original (cosine similarity, top-1 agreement, PSNR) on a random batch of 8, and
the worst relative error of a lossless conversion (``--no-prune --bits 32``).
"""
from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import dcrt  # noqa: E402
import zoo  # noqa: E402
from dcrt.report import human  # noqa: E402


def fidelity(expected, got):
    """(cosine, top-1 agreement, PSNR dB) of the first output, per sample flattened."""
    e = expected.reshape(expected.shape[0], -1).astype(np.float64)
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    cos = float(np.sum(e * g) / (np.linalg.norm(e) * np.linalg.norm(g)))
    top1 = float(np.mean(e.argmax(1) == g.argmax(1)))
    mse = float(np.mean((e - g) ** 2))
    psnr = 10 * np.log10(float(np.max(np.abs(e))) ** 2 / mse) if mse > 0 else float("inf")
    return cos, top1, psnr


def main(names) -> int:
    print("| model | params | ONNX | ONNX gz | .dcm | .dcm gz | ratio (gz/gz) | index-mode weights "
          "| cosine | top-1 | PSNR dB | lossless max rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model = zoo.ZOO[name]()
            src = Path(tmp) / f"{name}.onnx"
            onnx.save(model, str(src))
            raw = src.read_bytes()
            feeds = zoo.sample_input(model, batch=8)
            expected = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
            dcm, lossless = Path(tmp) / f"{name}.dcm", Path(tmp) / f"{name}.lossless.dcm"
            dcrt.convert(str(src), str(dcm))
            dcrt.convert(str(src), str(lossless), prune=False, bits=32)
            sess = dcrt.Session(str(dcm))
            got = sess.run(None, feeds)
            exact = dcrt.Session(str(lossless)).run(None, feeds)
            err = max(float(np.max(np.abs(g - e)) / (np.max(np.abs(e)) + 1e-30)) for g, e in zip(exact, expected))
            cos, top1, psnr = fidelity(expected[0], got[0])
            data = dcm.read_bytes()
            gz_src, gz_dcm = len(gzip.compress(raw, 9)), len(gzip.compress(data, 9))
            print(f"| {name} | {zoo.count_params(model):,} | {human(len(raw))} | {human(gz_src)} | "
                  f"{human(len(data))} | {human(gz_dcm)} | {gz_src / gz_dcm:.1f}x | "
                  f"{human(sess.resident_bytes()['index'])} | {cos:.3f} | {100 * top1:.0f}% | {psnr:.1f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [n for n in zoo.SMALL]))
