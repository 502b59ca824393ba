"""Print how much of the ONNX backend node-test suite dcrt's runtime passes (for the README).

    python tests/conformance_report.py [--failures]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_conformance as conformance  # noqa: E402


def main(argv: list) -> int:
    start = time.perf_counter()
    passed, selected, total, per_op, per_op_pass, failures = conformance.summary()
    print(f"passed {passed} of {selected} selected ({total} node tests in onnx "
          f"{conformance.onnx.__version__}, {selected} with all ops supported) "
          f"in {time.perf_counter() - start:.1f} s")
    print()
    print(f"{'operator':<28}{'passed':>8}{'selected':>10}")
    for op in sorted(per_op):
        print(f"{op:<28}{per_op_pass[op]:>8}{per_op[op]:>10}")
    if "--failures" in argv:
        print()
        for name, why in sorted(failures.items()):
            known = conformance.EXPECTED_FAILURES.get(name)
            print(f"{name}: {why}" + (f"  [expected: {known}]" if known else "  [UNEXPECTED]"))
    unexpected = [n for n in failures if n not in conformance.EXPECTED_FAILURES]
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
