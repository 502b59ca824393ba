"""Fuzzing the .dcm reader, decoders and runtime with mutated real files, and hand-made hostile files.

Every mutated file must either open and run (``Session.run`` gives a result) or raise a ``dcrt`` error
(a ``DcrtError`` subclass): no other exception, no hang, no allocation beyond a bound. When a result
comes from a file that was mutated but not re-sealed, the checksums must have made the damage harmless,
so the output must equal the unmutated file's output bit for bit.

The corpus is real: zoo models converted with the default plan and losslessly, with every coder chain
(none, huffman, lzw, huffman+lzw, lzw+huffman), plus a hand-built model with a ``Constant`` attribute
tensor, an ``If`` with two subgraphs, a quantized and a sparse weight. Mutations (``hypothesis``):

- byte level: bit flips, byte overwrites, truncations, insertions, deletions, splices (a copied chunk
  of the file over another place), with the size prefix optionally fixed up so that they get past it;
- field level: the file is walked with its FlatBuffers structure (the tables and fields come from
  ``schema/dcm.fbs`` itself, so the fuzzer follows schema changes) and a field is set to an interesting
  value (0, 1, 2**31, 2**32 - 1, 2**40, 2**64 - 1, +-small, bit flips, ...): stage counts, alphabets,
  chunk sizes, chunk offsets, code lengths, shapes, vector and string lengths, offsets, vtable entries;
- "sealed": after mutating, the tensor checksums and the graph checksum are recomputed and written
  back, as a hostile file would do (a CRC is not a signature), so the mutation reaches the decoders and
  the operators instead of being stopped by the checksum.

The examples run in a worker subprocess (``python tests/test_fuzz.py --worker DIR N``) whose address
space is limited (``RLIMIT_AS``: its size after warm-up plus ``MEMORY_BOUND``), with a per-example
``SIGALRM`` bound, and a watchdog in the test that kills the worker if it stops making progress; the
input being tried is always on disk (``DIR/current.dcm``, ``DIR/current.txt``) so a hang leaves a
reproducer. A ``MemoryError`` (or ``RecursionError``) anywhere in an error's chain fails the test
too, even when dcrt turned it into a ``FormatError``.

Inputs tried: the default run tries ``DCRT_FUZZ_EXAMPLES`` (default 1500, about 40 s) mutated files,
always the same ones (hypothesis ``derandomize``); set ``DCRT_FUZZ_SEED=<int>`` for another random
sequence and ``DCRT_FUZZ_EXAMPLES`` for a longer run (``tests/fuzz_atheris.py`` is the coverage-guided
long run). While this was written, seeds 1-4 ran 13,000 more examples: no failure once the reader was
hardened, but resealed hostile graphs made operators attempt huge arrays (Conv / MaxPool pads of 2**24
and more); operators now check the size of what they create first (``runtime.ops.bounded``, a
LimitError), and seed 1 ran 5,000 more examples with no MemoryError anywhere.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schema" / "dcm.fbs"

EXAMPLES = int(os.environ.get("DCRT_FUZZ_EXAMPLES", "1500"))
SEED = os.environ.get("DCRT_FUZZ_SEED")
EXAMPLE_SECONDS = 10        # SIGALRM bound of one example in the worker
STALL_SECONDS = 60          # the watchdog kills a worker that has not started a new example for this long
MEMORY_BOUND = 1 << 30      # bytes of address space an example may add to the warmed-up worker
MODES = ("index", "dense", "stream")

# (zoo model, conversion options): small models, every coder chain, default and lossless plans.
CORPUS = [
    ("lenet_300_100", {}),
    ("lenet_300_100", {"prune": False, "bits": 32}),
    ("lenet_300_100", {"coder": "none"}),
    ("lenet_300_100", {"coder": "huffman"}),
    ("lenet_300_100", {"coder": "lzw"}),
    ("lenet_300_100", {"coder": "huffman+lzw"}),
    ("lenet_300_100", {"coder": "lzw+huffman"}),
    ("resnet_small", {}),
    ("resnet_small", {"prune": False, "bits": 32, "coder": "lzw"}),
    ("lenet5", {"coder": "huffman+lzw"}),
    ("pruned_clustered_mlp", {}),
    ("with_constant_weights", {"coder": "lzw+huffman"}),
    ("gru_classifier", {}),
]


# ---------------------------------------------------------------------------------------------------
# The FlatBuffers structure, from the schema


_SCALARS = {"bool": 1, "byte": 1, "ubyte": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2,
            "int16": 2, "uint16": 2, "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4,
            "float32": 4, "long": 8, "ulong": 8, "int64": 8, "uint64": 8, "double": 8, "float64": 8}


class Schema(NamedTuple):
    tables: Dict[str, List[Tuple[str, str]]]   # table -> [(field, type)] in slot order
    structs: Dict[str, List[Tuple[str, str]]]
    enums: Dict[str, str]                       # enum -> underlying scalar type
    root: str


def parse_schema(text: str) -> Schema:
    """Tables, structs and enums of a .fbs file (enough of the grammar for dcm.fbs)."""
    text = re.sub(r"//[^\n]*", "", text)
    tables, structs, enums = {}, {}, {}
    for kind, name, base, body in re.findall(r"\b(table|struct|enum)\s+(\w+)\s*(?::\s*(\w+))?\s*\{(.*?)\}",
                                             text, re.S):
        if kind == "enum":
            enums[name] = base or "int"
            continue
        fields = []
        for stmt in body.split(";"):
            if ":" not in stmt:
                continue
            field, rest = stmt.split(":", 1)
            ftype = re.split(r"[\s=(]", rest.strip(), maxsplit=1)[0]
            fields.append((field.strip(), ftype))
        (tables if kind == "table" else structs)[name] = fields
    root = re.search(r"root_type\s+(\w+)", text).group(1)
    return Schema(tables, structs, enums, root)


class Field(NamedTuple):
    pos: int
    width: int
    kind: str    # scalar, uoffset, length, soffset, voffset, vtable
    path: str


class Table(NamedTuple):
    name: str
    pos: int
    fields: Dict[str, int]  # field name -> position of its value (present fields only)


def walk(buf, schema: Schema, limit: int = 20000) -> Tuple[List[Field], List[Table]]:
    """Every field of a (size-prefixed) .dcm buffer, and every table, following the schema.

    Robust to damaged buffers: it stops where the structure stops making sense.
    """
    fields: List[Field] = []
    tables: List[Table] = []
    seen = set()
    n = len(buf)

    def u32(p):
        return struct.unpack_from("<I", buf, p)[0]

    def scalar(p, ftype, path):
        base = schema.enums.get(ftype, ftype)
        if p + _SCALARS[base] <= n:
            fields.append(Field(p, _SCALARS[base], "scalar", path))

    def value(p, ftype, path, depth):
        if len(fields) > limit or p + 4 > n or p < 0:
            return
        base = schema.enums.get(ftype, ftype)
        if base in _SCALARS:
            scalar(p, base, path)
            return
        if ftype in schema.structs:
            at = 0
            for fname, t in schema.structs[ftype]:
                w = _SCALARS[schema.enums.get(t, t)]
                at = -(-at // w) * w
                scalar(p + at, t, f"{path}.{fname}")
                at += w
            return
        fields.append(Field(p, 4, "uoffset", path))
        target = p + u32(p)
        if target + 4 > n:
            return
        if ftype == "string":
            fields.append(Field(target, 4, "length", path + ".len"))
            return
        if ftype.startswith("["):
            elem = ftype[1:-1]
            count = u32(target)
            fields.append(Field(target, 4, "length", path + ".len"))
            ebase = schema.enums.get(elem, elem)
            if ebase in _SCALARS:
                w = _SCALARS[ebase]
                for j in range(min(count, 8)):
                    scalar(target + 4 + j * w, ebase, f"{path}[{j}]")
            else:
                for j in range(min(count, 512)):
                    value(target + 4 + 4 * j, elem, f"{path}[{j}]", depth)
            return
        table(target, ftype, path, depth + 1)

    def table(pos, tname, path, depth):
        if depth > 40 or (pos, tname) in seen or len(fields) > limit or not 0 <= pos <= n - 4:
            return
        seen.add((pos, tname))
        vt = pos - struct.unpack_from("<i", buf, pos)[0]
        if not 0 <= vt <= n - 4:
            return
        fields.append(Field(pos, 4, "soffset", path + ".<vtable>"))
        vlen = struct.unpack_from("<H", buf, vt)[0]
        fields.append(Field(vt, 2, "vtable", path + ".<vtable size>"))
        fields.append(Field(vt + 2, 2, "vtable", path + ".<table size>"))
        present = {}
        for i, (fname, ftype) in enumerate(schema.tables[tname]):
            slot = vt + 4 + 2 * i
            if 4 + 2 * i + 2 > vlen or slot + 2 > n:
                break
            fields.append(Field(slot, 2, "voffset", f"{path}.{fname}<slot>"))
            off = struct.unpack_from("<H", buf, slot)[0]
            if off:
                present[fname] = pos + off
                value(pos + off, ftype, f"{path}.{fname}", depth)
        tables.append(Table(tname, pos, present))

    try:
        if n >= 8:
            fields.append(Field(0, 4, "length", "<size prefix>"))
            fields.append(Field(4, 4, "uoffset", "<root>"))
            table(4 + u32(4), schema.root, schema.root, 0)
    except (struct.error, KeyError, IndexError):
        pass
    return fields, tables


# ---------------------------------------------------------------------------------------------------
# Mutations


INTERESTING = (0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024,
               0x7FFF, 0x8000, 0xFFFF, 0x10000, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
               1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


def field_value(old: int, width: int, how: Tuple[str, int]) -> int:
    kind, v = how
    mask = (1 << (8 * width)) - 1
    if kind == "abs":
        return INTERESTING[v % len(INTERESTING)] & mask
    if kind == "delta":
        return (old + v) & mask
    if kind == "xor":
        return old ^ (1 << (v % (8 * width)))
    if kind == "neg":
        return (-old) & mask
    return (old * 2 if v else old >> 1) & mask  # "scale"


def apply(data: bytes, ops, fields: List[Field]) -> bytearray:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        n = len(buf)
        if n == 0:
            break
        if kind == "flip":
            buf[op[1] % n] ^= 1 << op[2]
        elif kind == "byte":
            buf[op[1] % n] = op[2]
        elif kind == "field" and fields:
            f = fields[op[1] % len(fields)]
            if f.pos + f.width <= n:
                old = int.from_bytes(buf[f.pos:f.pos + f.width], "little")
                buf[f.pos:f.pos + f.width] = field_value(old, f.width, op[2]).to_bytes(f.width, "little")
        elif kind == "truncate":
            del buf[op[1] % n:]
        elif kind == "insert":
            at = op[1] % (n + 1)
            buf[at:at] = op[2]
        elif kind == "delete":
            del buf[op[1] % n: op[1] % n + op[2]]
        elif kind == "splice":
            src, dst, size = op[1] % n, op[2] % n, op[3]
            chunk = bytes(buf[src:src + size])
            buf[dst:dst + len(chunk)] = chunk
    return buf


def fix_prefix(buf: bytearray) -> None:
    if len(buf) >= 4:
        struct.pack_into("<I", buf, 0, len(buf) - 4)


def seal(buf: bytearray, schema: Schema, graph: bool = True) -> Tuple[bool, bool]:
    """Recompute and write back the tensor checksums and (if ``graph``) the graph checksum, as a
    forger would. Returns whether tensor checksums and whether the graph checksum were resealed
    (the structure may be too damaged to parse)."""
    from dcrt.errors import DcrtError
    from dcrt.format import reader
    from dcrt.format.fb.Tensor import Tensor as FbTensor

    _, tables = walk(buf, schema)
    snapshot = bytes(buf)
    sealed = False
    for t in tables:
        if t.name != "Tensor" or "checksum" not in t.fields:
            continue
        fb = FbTensor()
        fb.Init(snapshot, t.pos)
        try:
            rec = reader._tensor(fb, reader._Limits(len(snapshot)))
            digest = rec.digest()
        except Exception:  # noqa: BLE001 - a table too damaged to reseal stays as it is
            continue
        if t.fields["checksum"] + 4 <= len(buf):
            struct.pack_into("<I", buf, t.fields["checksum"], digest & 0xFFFFFFFF)
            sealed = True
    model = [t for t in tables if t.name == schema.root]
    if not graph or not model or "graph_checksum" not in model[0].fields:
        return sealed, False
    captured = []
    original = reader.model_digest

    def spy(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    reader.model_digest = spy
    try:
        reader.DcmFile(bytes(buf))
    except (DcrtError, Exception):  # noqa: BLE001 - whatever stops the parse, the digest may be known
        pass
    finally:
        reader.model_digest = original
    if captured:
        struct.pack_into("<I", buf, model[0].fields["graph_checksum"], captured[-1] & 0xFFFFFFFF)
    return sealed, bool(captured)


# ---------------------------------------------------------------------------------------------------
# The oracle


class ExampleTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` in dcrt can swallow it."""


BAD_CAUSES = (MemoryError, RecursionError)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def check_one(data: bytes, feeds: Dict[str, np.ndarray], expected: List[np.ndarray], *,
              exact: bool, mode: str = "index") -> str:
    """Open, run and verify ``data``; returns "ok" or the dcrt error's class name.

    Raises AssertionError for anything the reader must never do. ``exact``: the file was not
    resealed, so a result must equal ``expected``.
    """
    import dcrt
    from dcrt.errors import DcrtError
    from dcrt.format import open_dcm

    try:
        with dcrt.Session(data, mode=mode) as sess:
            outputs = sess.run(None, feeds)
        with open_dcm(data) as dcm:
            problems = dcm.verify()
    except DcrtError as e:
        bad = [type(c).__name__ for c in _chain(e) if isinstance(c, BAD_CAUSES)]
        assert not bad, f"{type(e).__name__} caused by {bad}: {e}"
        return type(e).__name__
    except ExampleTimeout:
        raise AssertionError(f"example took more than {EXAMPLE_SECONDS} s") from None
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"non-dcrt exception {type(e).__name__}: {e}") from e
    if exact:
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected):
            assert np.array_equal(np.asarray(got), want, equal_nan=want.dtype.kind == "f"), \
                "a mutated file ran and gave a different result: the checksums missed the damage"
        assert not problems, f"a mutated file ran but verify() found {problems}"
    return "ok"


# ---------------------------------------------------------------------------------------------------
# The worker: hypothesis runs here, under the memory and time bounds


def _load_corpus(folder: pathlib.Path):
    """[(data, feeds, {(mode, numba): outputs})]: the outputs of the unmutated file, computed here
    (twice, to be sure they are reproducible) since modes and numba round differently."""
    import dcrt
    from dcrt.runtime import numba_kernels

    entries = []
    for i in range(len(list(folder.glob("*.dcm")))):
        data = (folder / f"{i}.dcm").read_bytes()
        with np.load(folder / f"{i}.npz") as z:
            feeds = {k[5:]: z[k] for k in z.files if k.startswith("feed.")}
        expected = {}
        for mode in MODES:
            for numba in (False, True):
                os.environ["DCRT_NO_NUMBA"] = "0" if numba else "1"
                numba_kernels.reset()       # the runtime reads it once
                first = [np.asarray(y) for y in dcrt.Session(data, mode=mode).run(None, feeds)]
                assert check_one(data, feeds, first, exact=True, mode=mode) == "ok", "not reproducible"
                expected[mode, numba] = first
        entries.append((data, feeds, expected))
    return entries


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(folder: pathlib.Path, examples: int, seed: Optional[int]) -> int:
    import resource

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st
    from dcrt.runtime import numba_kernels

    schema = parse_schema(SCHEMA.read_text())
    corpus = _load_corpus(folder / "corpus")
    structure = [walk(data, schema)[0] for data, _, _ in corpus]
    # Loading the corpus warmed up (numba compiled or loaded its cache, BLAS threads started): now
    # bound the address space.
    limit = _vm_bytes() + MEMORY_BOUND
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    def on_alarm(signum, frame):
        raise ExampleTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    stats = {"examples": 0, "outcomes": {}, "sealed": 0, "field_ops": 0}
    heartbeat = folder / "heartbeat"

    how = st.one_of(st.tuples(st.just("abs"), st.integers(0, len(INTERESTING) - 1)),
                    st.tuples(st.just("delta"), st.integers(-16, 16)),
                    st.tuples(st.just("xor"), st.integers(0, 63)),
                    st.tuples(st.just("neg"), st.just(0)),
                    st.tuples(st.just("scale"), st.integers(0, 1)))
    pos = st.integers(0, 1 << 24)

    def op_strategy(nfields: int):
        field_op = st.tuples(st.just("field"), st.integers(0, max(nfields - 1, 0)), how)
        return st.one_of(
            field_op, field_op, field_op,
            st.tuples(st.just("flip"), pos, st.integers(0, 7)),
            st.tuples(st.just("byte"), pos, st.integers(0, 255)),
            st.tuples(st.just("truncate"), pos),
            st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
            st.tuples(st.just("delete"), pos, st.integers(1, 64)),
            st.tuples(st.just("splice"), pos, pos, st.integers(1, 256)))

    chosen = dict(max_examples=examples, deadline=None, database=None, print_blob=True,
                  phases=[Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
    if seed is None:
        chosen["derandomize"] = True

    @settings(**chosen)
    @given(st.data())
    def fuzz(data):
        entry = data.draw(st.integers(0, len(corpus) - 1), label="entry")
        original, feeds, expected = corpus[entry]
        fields = structure[entry]
        ops = data.draw(st.lists(op_strategy(len(fields)), min_size=1, max_size=4), label="ops")
        resealed = data.draw(st.sampled_from(["no", "tensors", "tensors+graph"]), label="seal")
        prefix = data.draw(st.booleans(), label="fix size prefix")
        mode = data.draw(st.sampled_from(MODES), label="mode")
        numba = data.draw(st.booleans(), label="numba")
        buf = apply(original, ops, fields)
        if prefix:
            fix_prefix(buf)
        sealed, forged = seal(buf, schema, resealed == "tensors+graph") if resealed != "no" else (False, False)
        mutated = bytes(buf)
        stats["examples"] += 1
        stats["sealed"] += sealed or forged
        stats["field_ops"] += sum(op[0] == "field" for op in ops)
        (folder / "current.dcm").write_bytes(mutated)
        (folder / "current.txt").write_text(json.dumps(
            {"entry": entry, "corpus": CORPUS[entry] if entry < len(CORPUS) else "control_flow",
             "ops": [[o if not isinstance(o, bytes) else o.hex() for o in op] for op in ops],
             "seal": resealed, "fix_prefix": prefix, "mode": mode, "numba": numba}, default=str))
        heartbeat.write_text(str(stats["examples"]))
        os.environ["DCRT_NO_NUMBA"] = "0" if numba else "1"
        numba_kernels.reset()
        signal.alarm(EXAMPLE_SECONDS)
        try:
            outcome = check_one(mutated, feeds, expected[mode, numba], exact=resealed == "no", mode=mode)
        finally:
            signal.alarm(0)
        stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1

    if seed is not None:
        fuzz = hseed(seed)(fuzz)
    stats["vm_limit_mib"] = limit >> 20
    try:
        fuzz()
    finally:
        stats["vm_end_mib"] = _vm_bytes() >> 20
        print(json.dumps(stats), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# The corpus, built on the host


def control_flow_model():
    """A hand-built model with what the zoo lacks: a Constant attribute tensor, If subgraphs reading an
    outer sparse weight, a quantized Gemm weight."""
    from dcrt import codecs, sparse
    from dcrt.format.tensor import QUANTIZED, SPARSE, LayerStats, TensorRecord
    from dcrt.graph import Graph, Model, Node, ValueInfo

    rng = np.random.default_rng(0)
    book = np.sort(rng.standard_normal(15)).astype(np.float32)
    sym = rng.integers(0, 15, size=(4, 8))
    wq = TensorRecord("wq", 1, (4, 8), QUANTIZED, codebook=book, indices=codecs.encode(sym, 15, "huffman"),
                      stats=LayerStats(32, 32, 128, 60, 15, 4, 0))
    dense = rng.integers(1, 16, size=(4, 4)) * (rng.random((4, 4)) < 0.4)
    entries, rel, counts = sparse.encode_csc(dense, 2)
    ws = TensorRecord("ws", 1, (4, 4), SPARSE, codebook=book,
                      indices=codecs.encode(entries, 16, "lzw"), relative_index=codecs.encode(rel, 4, "none"),
                      column_counts=codecs.encode(counts, 5, "huffman+lzw"),
                      stats=LayerStats(16, int(np.count_nonzero(dense)), 64, 40, 15, 4, 2))
    for rec in (wq, ws):
        rec.checksum = rec.digest()
    flag = np.array(True)
    then_g = Graph([Node("MatMul", ["y2", "ws"], ["z"], name="mm")], [], [ValueInfo("z", np.float32, None)], {},
                   "then")
    else_g = Graph([Node("Neg", ["y2"], ["z"], name="neg")], [], [ValueInfo("z", np.float32, None)], {}, "else")
    g = Graph([Node("Gemm", ["x", "wq"], ["y1"], {"transB": 1}, "fc"),
               Node("Constant", [], ["c"], {"value": np.linspace(-1, 1, 4).astype(np.float32)}, "const"),
               Node("Add", ["y1", "c"], ["y2"], {}, "add"),
               Node("If", ["flag"], ["out"], {"then_branch": then_g, "else_branch": else_g}, "branch")],
              [ValueInfo("x", np.float32, ["N", 8])], [ValueInfo("out", np.float32, ["N", 4])],
              {"wq": np.zeros((4, 8), np.float32), "ws": np.zeros((4, 4), np.float32), "flag": flag}, "main")
    return Model(g, {"": 17}), {"wq": wq, "ws": ws}


def build_corpus(folder: pathlib.Path, dcm_path, zoo) -> int:
    import dcrt
    from dcrt.format.writer import to_bytes

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for name, options in CORPUS:
        items.append((dcm_path(name, **options).read_bytes(), zoo.sample_input(zoo.SMALL[name]())))
    model, records = control_flow_model()
    items.append((to_bytes(model, records, {"format": "test"}), {
        "x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}))
    for i, (data, feeds) in enumerate(items):
        dcrt.Session(data).run(None, feeds)  # the unmutated file runs
        (folder / f"{i}.dcm").write_bytes(data)
        np.savez(folder / f"{i}.npz", **{f"feed.{k}": v for k, v in feeds.items()})
    return len(items)


def run_worker(folder: pathlib.Path, examples: int, seed: Optional[str]) -> Tuple[int, str, str]:
    """Run the worker with a watchdog on its heartbeat; returns (status, stdout, stderr)."""
    heartbeat = folder / "heartbeat"
    # MALLOC_ARENA_MAX: glibc reserves 64 MiB of address space per thread arena, which would count
    # against the worker's RLIMIT_AS as threads come and go.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(folder), str(examples)]
    if seed is not None:
        cmd.append(str(seed))
    out, err = folder / "worker.out", folder / "worker.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env)
        last, last_change = None, time.monotonic()
        while proc.poll() is None:
            time.sleep(0.5)
            beat = heartbeat.read_text() if heartbeat.exists() else None
            if beat != last:
                last, last_change = beat, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS + (120 if beat is None else 0):
                proc.kill()
                proc.wait()
                pytest.fail(f"the fuzz worker hung on example {beat}: reproducer "
                            f"{folder / 'current.dcm'} ({(folder / 'current.txt').read_text()})")
    return proc.returncode, out.read_text(), err.read_text()


# ---------------------------------------------------------------------------------------------------
# Tests


def test_schema_walk_finds_every_stage_field(dcm_path):
    """The walker sees the fields the fuzzer targets (so the schema parse follows dcm.fbs)."""
    schema = parse_schema(SCHEMA.read_text())
    assert {"CoderStage", "Tensor", "Graph", "Model"} <= set(schema.tables)
    fields, tables = walk(dcm_path("lenet_300_100", coder="huffman+lzw").read_bytes(), schema)
    paths = {re.sub(r"\[\d+\]", "[]", f.path) for f in fields}
    for name in ("count", "alphabet", "chunk_size", "chunk_bit_offsets[]", "code_lengths[]", "max_code_width"):
        assert f"Model.graph.initializers[].indices.stages[].{name}" in paths, name
    assert "Model.graph.initializers[].shape[]" in paths
    assert sum(t.name == "Tensor" for t in tables) >= 6


def test_sealing_reaches_the_decoder(dcm_path):
    """A resealed mutation passes the checksums: what the fuzzer's sealed examples rely on."""
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm

    schema = parse_schema(SCHEMA.read_text())
    data = dcm_path("lenet_300_100", coder="huffman").read_bytes()
    fields, _ = walk(data, schema)
    target = next(i for i, f in enumerate(fields) if f.path.endswith("indices.stages[0].count"))
    buf = apply(data, [("field", target, ("abs", INTERESTING.index(1 << 40)))], fields)
    (message,) = open_dcm(bytes(buf)).verify().values()
    assert "checksum" in message                  # as damaged: caught by the tensor's checksum
    assert seal(buf, schema) == (True, True)
    (message,) = open_dcm(bytes(buf)).verify().values()
    assert "checksum" not in message and "1099511627776 symbols" in message  # as forged: by the count check
    with pytest.raises(FormatError):
        open_dcm(bytes(buf)).tensors[next(iter(open_dcm(bytes(buf)).verify()))].decode()


def test_damaged_structure_opened_by_path_is_a_format_error(tmp_path, dcm_path):
    """A vector's length damaged (the graph resealed), the file opened by path: FormatError, not the
    BufferError of closing a memory map the failed parse still had views of."""
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm

    schema = parse_schema(SCHEMA.read_text())
    data = dcm_path("lenet_300_100", coder="huffman").read_bytes()
    fields, _ = walk(data, schema)
    target = next(i for i, f in enumerate(fields) if f.path.endswith("relative_index.stages[0].chunk_bit_offsets"))
    buf = apply(data, [("field", target, ("delta", -3))], fields)
    seal(buf, schema)
    path = tmp_path / "damaged.dcm"
    path.write_bytes(bytes(buf))
    with pytest.raises(FormatError, match="damaged"):
        open_dcm(str(path))
    with pytest.raises(FormatError, match="damaged"):
        open_dcm(bytes(buf))


def test_fuzz_mutated_files(tmp_path, dcm_path, zoo):
    """Hypothesis-mutated real files: a result (equal to the original's unless resealed) or a dcrt error."""
    pytest.importorskip("hypothesis")
    n = build_corpus(tmp_path / "corpus", dcm_path, zoo)
    assert n == len(CORPUS) + 1
    status, out, err = run_worker(tmp_path, EXAMPLES, SEED)
    summary = out.strip().splitlines()[-1] if out.strip() else "{}"
    print(summary)
    assert status == 0, f"fuzz worker failed (reproducer: {tmp_path / 'current.dcm'}):\n{err[-6000:]}"
    stats = json.loads(summary)
    assert stats["examples"] >= EXAMPLES
    outcomes = stats["outcomes"]
    assert outcomes.get("ok", 0) > EXAMPLES // 20 and sum(outcomes.values()) - outcomes.get("ok", 0) > EXAMPLES // 4
    assert stats["sealed"] > EXAMPLES // 10


# -- hand-made hostile files -------------------------------------------------------------------------


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2 ** 20


def _file(records, shape_model=None, plan=None, metadata=None) -> bytes:
    from dcrt.format.writer import to_bytes
    from dcrt.graph import Graph, Model, ValueInfo

    inits = {name: np.zeros(0, np.float32) for name in records}
    g = shape_model or Graph([], [ValueInfo("x", np.float32, [1])], [ValueInfo("x", np.float32, [1])], inits, "g")
    return to_bytes(Model(g, {"": 17}, dict(metadata or {})), records, {}, plan)


def _sealed(rec):
    rec.checksum = rec.digest()
    return rec


@pytest.mark.parametrize("chain", ["none", "huffman", "lzw", "huffman+lzw", "lzw+huffman"])
def test_huge_stage_count_refused_before_allocating(chain):
    """A stage count of 2**40 over a 10-byte payload (checksums valid) is refused, allocating nothing."""
    from dcrt import codecs
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm
    from dcrt.format.tensor import QUANTIZED, TensorRecord

    stream = codecs.encode(np.arange(10) % 4, 4, chain)
    stream.stages[0].count = 1 << 40
    stream.payload = bytes(stream.payload)[:10]
    for shape in ((10,), (1 << 20, 1 << 20)):
        rec = _sealed(TensorRecord("w", 1, shape, QUANTIZED, codebook=np.arange(4, dtype=np.float32),
                                   indices=stream))

        def attempt():
            with pytest.raises(FormatError, match="'w'"):
                open_dcm(_file({"w": rec})).tensors["w"].decode()
        assert _peak_mib(attempt) < 16


def test_later_stage_count_bounded_by_the_previous_stage():
    from dcrt import codecs
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm
    from dcrt.format.tensor import QUANTIZED, TensorRecord

    stream = codecs.encode(np.arange(1000) % 7, 7, "huffman+lzw")
    stream.stages[1].count = 1 << 35
    rec = _sealed(TensorRecord("w", 1, (1000,), QUANTIZED, codebook=np.arange(7, dtype=np.float32),
                               indices=stream))
    with pytest.raises(FormatError, match="stage 1"):
        open_dcm(_file({"w": rec})).tensors["w"].decode()


def test_stream_without_stages_but_payload_refused():
    from dcrt.codecs import EncodedStream
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm
    from dcrt.format.tensor import QUANTIZED, TensorRecord

    rec = _sealed(TensorRecord("w", 1, (16,), QUANTIZED, codebook=np.arange(4, dtype=np.float32),
                               indices=EncodedStream([], bytes(16))))
    with pytest.raises(FormatError, match="no coder stage"):
        open_dcm(_file({"w": rec})).tensors["w"].decode()


def test_small_file_claiming_gigabytes_refused():
    """Sparse all-empty columns cost a few bits each but a rows x cols dense index: bounded at open."""
    from dcrt import codecs
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm
    from dcrt.format.tensor import SPARSE, TensorRecord

    cols = 1 << 14
    rec = _sealed(TensorRecord("w", 1, (1 << 16, cols), SPARSE, codebook=np.ones(1, np.float32),
                               indices=codecs.encode(np.zeros(0, np.int64), 2, "huffman"),
                               relative_index=codecs.encode(np.zeros(0, np.int64), 4, "huffman"),
                               column_counts=codecs.encode(np.zeros(cols, np.int64), 2, "huffman+lzw")))
    data = _file({"w": rec})
    assert len(data) < 4096                       # 2**30 weights (4 GiB as float32) in a few KiB
    with pytest.raises(FormatError, match="claim more elements"):
        open_dcm(data)
    with pytest.raises(FormatError, match="elements"):
        open_dcm(_file({"w": _sealed(TensorRecord("w", 1, (1 << 40, 1 << 40, 1 << 40), SPARSE))}))


def test_shape_product_overflowing_int64_refused():
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm
    from dcrt.format.tensor import RAW, TensorRecord

    rec = _sealed(TensorRecord("w", 1, (1 << 32, 1 << 32, 0 + (1 << 32)), RAW, raw=b""))
    with pytest.raises(FormatError, match="'w'"):
        open_dcm(_file({"w": rec}))


def _nested_graph_file(depth: int, fan_out: int) -> bytes:
    """A model whose graph has a node whose attribute holds ``fan_out`` references to the same subgraph,
    which has the same, ``depth`` times: a DAG that a tree walk visits fan_out**depth times."""
    import flatbuffers

    from dcrt.format import FILE_IDENTIFIER
    from dcrt.format.fb import Attribute, Graph, Model, Node

    b = flatbuffers.Builder(1024)

    def vector(offsets):
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    Graph.Start(b)
    g = Graph.End(b)
    for level in range(depth):
        graphs = vector([g] * fan_out)
        name, op = b.CreateString("then_branch"), b.CreateString("If")
        Attribute.Start(b)
        Attribute.AddName(b, name)
        Attribute.AddType(b, 10)
        Attribute.AddGraphs(b, graphs)
        attr = Attribute.End(b)
        attrs = vector([attr])
        Node.Start(b)
        Node.AddOpType(b, op)
        Node.AddAttributes(b, attrs)
        nodes = vector([Node.End(b)])
        Graph.Start(b)
        Graph.AddNodes(b, nodes)
        g = Graph.End(b)
    Model.Start(b)
    Model.AddFormatMajor(b, 1)
    Model.AddGraph(b, g)
    b.FinishSizePrefixed(Model.End(b), FILE_IDENTIFIER)
    return bytes(b.Output())


def test_shared_subgraphs_do_not_explode():
    """40 levels of two references to one subgraph: 2**40 visits for a naive walk; refused at once."""
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm

    data = _nested_graph_file(40, 2)
    assert len(data) < 8192
    start = time.monotonic()
    with pytest.raises(FormatError, match="refer to each other"):
        open_dcm(data)
    assert time.monotonic() - start < 5


def test_deep_nesting_refused():
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm

    with pytest.raises(FormatError, match="nested"):
        open_dcm(_nested_graph_file(5000, 1))


def test_stored_plan_json_bomb_refused():
    """The plan is parsed as JSON after the graph checksum: a hostile valid checksum must not help."""
    from dcrt.errors import FormatError
    from dcrt.format import open_dcm

    with pytest.raises(FormatError, match="plan"):
        open_dcm(_file({}, metadata={"dcrt.plan": "[" * 100000}))
    with pytest.raises(FormatError, match="plan"):
        open_dcm(_file({}, metadata={"dcrt.plan": "{not json"}))


def test_verify_names_the_damaged_tensor(dcm_path, tmp_path, capsys):
    """`dcrt verify`: a file with one damaged tensor lists exactly that tensor, and exits 1."""
    from dcrt.cli import main
    from dcrt.format import open_dcm

    path = dcm_path("lenet_300_100", coder="lzw")
    data = bytearray(path.read_bytes())
    with open_dcm(bytes(data)) as dcm:
        t = dcm.tensors["fc2.weight"]
        payload = t.record.indices.payload
        at = bytes(data).find(bytes(payload[:64]))
    assert at > 0
    data[at + 20] ^= 0x40
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(data))
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED fc2.weight" in out and out.count("DAMAGED") == 1


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "--worker":
    sys.exit(worker(pathlib.Path(sys.argv[2]), int(sys.argv[3]),
                    int(sys.argv[4]) if len(sys.argv) > 4 else None))
