"""Write zoo models to ONNX files.

    python examples/make_models.py [--out examples/models] [--large] [--external] [names...]

With no names, writes every small model (``zoo.SMALL``); ``--large`` adds the full-size ones
(``zoo.LARGE``: ResNet-18/50, MobileNetV2, VGG-16 fc, ~700 MB in all). Prints each model's name,
parameter count and file size.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so `import zoo` works from anywhere

import onnx  # noqa: E402

import zoo  # noqa: E402


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"models to write (default: all small). Known: {', '.join(zoo.ZOO)}")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models",
                    help="output directory (default: examples/models)")
    ap.add_argument("--large", action="store_true", help="also write the large models")
    ap.add_argument("--external", action="store_true",
                    help="store initializers in <name>.data beside each <name>.onnx")
    ap.add_argument("--list", action="store_true", help="list model names and exit")
    args = ap.parse_args(argv)

    if args.list:
        for name in zoo.ZOO:
            print(name + ("  (large)" if name in zoo.LARGE else ""))
        return 0
    unknown = [n for n in args.names if n not in zoo.ZOO]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(zoo.ZOO)}")
    names = args.names or list(zoo.SMALL) + (list(zoo.LARGE) if args.large else [])

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'model':24s} {'params':>13s} {'file':>10s} {'time':>7s}")
    for name in names:
        t0 = time.perf_counter()
        model = zoo.ZOO[name]()
        path = args.out / f"{name}.onnx"
        if args.external:
            zoo.save_with_external_data(model, path)
            size = path.stat().st_size + path.with_name(path.stem + ".data").stat().st_size
        else:
            onnx.save_model(model, str(path))
            size = path.stat().st_size
        dt = time.perf_counter() - t0
        print(f"{name:24s} {zoo.count_params(model):>13,d} {_size(size):>10s} {dt:>6.2f}s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
