"""Compare the coders on the example models, as seed 000 did for YOLOv2: the README's coder table.

    python benchmarks/coders_table.py [names...]

Each model is converted with the default plan once per coder chain; the table gives the bytes of all
coded index streams (payload + side information: code lengths, chunk offsets), the empirical entropy
bound of the same symbols (sum over streams of count x H), and the whole .dcm size.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import dcrt  # noqa: E402
import zoo  # noqa: E402
from dcrt import codecs  # noqa: E402
from dcrt.report import human  # noqa: E402

CHAINS = ("none", "huffman", "lzw", "huffman+lzw", "lzw+huffman", "auto")
DEFAULT = ["lenet_300_100", "lenet5", "lstm_classifier", "resnet18_tiny", "mobilenet_v2_tiny", "tiny_yolo"]


def entropy_bytes(symbols: np.ndarray) -> float:
    """Empirical (order-0) entropy of a symbol sequence, in bytes."""
    if symbols.size == 0:
        return 0.0
    p = np.bincount(symbols.astype(np.int64)) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * symbols.size / 8)


def streams(result):
    for rec in result.records.values():
        for s in (rec.indices, rec.relative_index, rec.column_counts):
            if s is not None:
                yield s


def main(names) -> int:
    print("| model | entropy bound | " + " | ".join(CHAINS) + " |")
    print("|---|---:|" + "---:|" * len(CHAINS))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            src = Path(tmp) / f"{name}.onnx"
            onnx.save(zoo.ZOO[name](), str(src))
            cells, bound = [], 0.0
            for chain in CHAINS:
                result = dcrt.convert(str(src), str(Path(tmp) / f"{name}.{chain}.dcm"), coder=chain, force=True)
                coded = sum(codecs.stream_bytes(s) for s in streams(result))
                if chain == "none":
                    bound = sum(entropy_bytes(codecs.decode(s)) for s in streams(result))
                cells.append(f"{human(coded)} ({result.file_bytes / 1000:.1f} KB file)")
            print(f"| {name} | {human(bound)} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
