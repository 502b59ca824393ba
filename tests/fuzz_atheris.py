"""Coverage-guided fuzzing of the .dcm reader, decoders and runtime with atheris (libFuzzer) — long runs.

Not part of the default suite (``tests/test_fuzz.py`` is its hypothesis-driven short version, and
shares its corpus, schema walker and resealing). Needs ``pip install atheris`` (and dcrt[convert] to
build the seed corpus once)::

    python tests/fuzz_atheris.py --make-corpus /var/tmp/dcm-corpus          # seeds: real .dcm files
    python tests/fuzz_atheris.py /var/tmp/dcm-corpus -max_total_time=600 -timeout=20 -rss_limit_mb=3072

(any libFuzzer flag works: ``-runs=N``, ``-jobs=4 -workers=4``, ``-artifact_prefix=crashes/``). The first
byte of each input picks how it is treated: even = the bytes as they are (the checksums stop most
damage, so this explores the structure checks), odd = resealed first (tensor and graph checksums
recomputed, as a hostile file would do, so mutations reach the decoders and operators). An input fails
(libFuzzer saves it as ``crash-*``) if it raises anything but a ``dcrt`` error, if a ``MemoryError`` or
``RecursionError`` is behind a dcrt error (an allocation or a recursion the reader or an operator should
have bounded), or if it takes
longer than ``-timeout`` or more memory than ``-rss_limit_mb``. While an input runs, the address space is
limited to its current size plus 1 GiB (``RLIMIT_AS``), so an attempted huge allocation surfaces as a
``MemoryError``.

Reproduce one input: ``python tests/fuzz_atheris.py crash-<sha1>``. To keep fuzzing past a bug already
reported, ``DCRT_FUZZ_IGNORE=KeyError`` (builtin exception names, comma-separated) sets it aside.
"""
from __future__ import annotations

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

try:
    import atheris
except ImportError:  # pragma: no cover - the long run is optional
    atheris = None

MAX_FEED_ELEMENTS = 1 << 20


def make_corpus(folder: pathlib.Path) -> None:
    """Seed inputs: the fuzz corpus of test_fuzz (real files, every coder), each plain and resealed."""
    import tempfile

    import onnx

    import dcrt
    import zoo
    from test_fuzz import CORPUS, control_flow_model
    from dcrt.format.writer import to_bytes

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, options) in enumerate(CORPUS):
            src = pathlib.Path(tmp) / f"{name}.onnx"
            onnx.save(zoo.SMALL[name](), str(src))
            out = pathlib.Path(tmp) / f"{i}.dcm"
            dcrt.convert(str(src), str(out), **options)
            data = out.read_bytes()
            for mark in (b"\0", b"\1"):
                (folder / f"seed-{i}-{mark[0]}.bin").write_bytes(mark + data)
    model, records = control_flow_model()
    data = to_bytes(model, records, {"format": "test"})
    for mark in (b"\0", b"\1"):
        (folder / f"seed-control-{mark[0]}.bin").write_bytes(mark + data)
    print(f"{len(list(folder.iterdir()))} seeds in {folder}")


def _feeds(sess):
    """An input for every model input, from the declared shapes (free dims = 1); None if absurd."""
    import numpy as np

    feeds = {}
    for arg in sess.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else 1 for d in (arg.shape or [])]
        if int(np.prod(shape, dtype=object)) > MAX_FEED_ELEMENTS:
            return None
        if arg.dtype.kind == "f":
            feeds[arg.name] = np.linspace(-1, 1, int(np.prod(shape, dtype=np.int64))).astype(arg.dtype).reshape(shape)
        else:
            feeds[arg.name] = np.zeros(shape, arg.dtype)
    return feeds


def main(argv) -> int:
    if atheris is None:
        print("atheris is not installed (pip install atheris): skipping the coverage-guided fuzz run")
        return 0
    if len(argv) > 2 and argv[1] == "--make-corpus":
        make_corpus(pathlib.Path(argv[2]))
        return 0

    with atheris.instrument_imports(include=["dcrt"]):
        import importlib

        import dcrt
        from dcrt.errors import DcrtError
        from dcrt.format import open_dcm
        # dcrt imports most modules lazily: import them now, while the import hook instruments them
        for module in ("dcrt.runtime.session", "dcrt.runtime.executor", "dcrt.runtime.kernels",
                       "dcrt.runtime.indexed", "dcrt.runtime.ops", "dcrt.format.reader", "dcrt.format.tensor",
                       "dcrt.format.digest", "dcrt.codecs.huffman", "dcrt.codecs.lzw", "dcrt.codecs.raw",
                       "dcrt.sparse", "dcrt.memory", "dcrt.graph"):
            importlib.import_module(module)
    import test_fuzz

    schema = test_fuzz.parse_schema(test_fuzz.SCHEMA.read_text())
    import builtins
    IGNORE = tuple(getattr(builtins, n.strip()) for n in os.environ.get("DCRT_FUZZ_IGNORE", "").split(",") if n.strip())
    os.environ.setdefault("DCRT_NO_NUMBA", "1")  # numba's compiled code is not instrumented anyway

    def one_input(data: bytes) -> None:
        if not data:
            return
        buf = bytearray(data[1:])
        if data[0] & 1:
            test_fuzz.seal(buf, schema)
        try:
            with dcrt.Session(bytes(buf), mode=("index", "dense", "stream")[data[0] % 3]) as sess:
                feeds = _feeds(sess)
                if feeds is not None:
                    sess.run(None, feeds)
            with open_dcm(bytes(buf)) as f:
                f.verify()
        except IGNORE as e:  # a reported bug, set aside to keep fuzzing past it (DCRT_FUZZ_IGNORE)
            del e
        except DcrtError as e:
            bad = [c for c in test_fuzz._chain(e) if isinstance(c, test_fuzz.BAD_CAUSES)]
            if bad:
                raise AssertionError(f"{type(e).__name__} caused by {bad[0]!r}: {e}") from e

    import resource

    def bounded(data: bytes) -> None:
        # Like test_fuzz's worker: an allocation of more than MEMORY_BOUND fails (a MemoryError, judged
        # above) instead of growing until libFuzzer's -rss_limit_mb stops the run. Set per input, from
        # the current size: libFuzzer's own memory grows as it runs.
        resource.setrlimit(resource.RLIMIT_AS, (test_fuzz._vm_bytes() + test_fuzz.MEMORY_BOUND,
                                                resource.RLIM_INFINITY))
        try:
            one_input(data)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    atheris.Setup(argv, bounded)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
