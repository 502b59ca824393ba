"""The ``dcrt`` command line: convert, inspect, size, verify, run, profile."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings
from typing import List, Optional

from . import __version__
from .errors import DcrtError, InputError
from .report import human


# Modules that add subcommands: each has ``add_commands(subparsers)``; a command sets ``func(args) -> int``.
EXTENSIONS = ("dcrt.converters.accuracy_cli",)


def _progress_bar(stream=None):
    """A per-layer progress bar on stderr (one line per layer when not a terminal)."""
    stream = stream or sys.stderr
    start = time.perf_counter()
    tty = stream.isatty()

    def show(done: int, total: int, name: str) -> None:
        width = 24
        filled = width * done // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {done}/{total} {name}"
        if done == total:
            line = f"[{bar}] {total}/{total} layers in {time.perf_counter() - start:.1f} s"
        if tty:
            stream.write("\r" + line[:100].ljust(100) + ("\n" if done == total else ""))
        else:
            stream.write(line + "\n")
        stream.flush()
    return show


def _cmd_convert(a) -> int:
    from .converters.accuracy_cli import convert_budget_config, plan_path, write_plan
    from .converters.convert import check_output, convert
    from .report import inspect, size
    check_output(a.output, [a.model] + ([a.weights] if a.weights else []), a.force)
    budget = convert_budget_config(a)       # --target-size / --max-drop: a plan from a sweep
    convert(a.model, a.output, weights=a.weights, bits=a.bits, sparsity=a.sparsity, threshold=a.threshold,
            prune=not a.no_prune, coder=a.coder, config=budget or a.config, force=a.force, calib=a.calib,
            saliency=a.saliency, progress=None if a.quiet else _progress_bar())
    if budget:      # only once the conversion has succeeded: a failed one leaves no file behind
        write_plan(plan_path(a.output), budget)
        if not a.quiet:
            print(f"plan written to {plan_path(a.output)}")
    if not a.quiet:
        info = inspect(a.output)
        _print_layers(info, only_coded=True)
        _print_size(size(a.output))
    return 0


def _print_layers(info, only_coded: bool = False) -> None:
    rows = [r for r in info["layers"] if not only_coded or r["encoding"] != "raw"]
    head = f"{'layer':<28} {'op':<13} {'shape':<18} {'sparsity':>8} {'codebook':>8} {'bits/w':>7} " \
           f"{'coder':<12} {'original':>10} {'coded':>10} {'ratio':>7} {'in memory':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) or "scalar"
        print(f"{r['layer'][:28]:<28} {r['op'][:13]:<13} {shape[:18]:<18} {100 * r['sparsity']:7.1f}% "
              f"{r['codebook'] or '-':>8} {r['bits_per_weight']:7.2f} {r['coder'][:12]:<12} "
              f"{human(r['original_bytes']):>10} {human(r['coded_bytes']):>10} {r['ratio']:6.1f}x "
              f"{human(r['memory_bytes']['index']):>10}")
    t = info["total"]
    raw = [r for r in info["layers"] if only_coded and r["encoding"] == "raw"]
    if raw:     # biases, and weights no coding made smaller: counted in the total below
        label = f"(+{len(raw)} tensor{'s' * (len(raw) > 1)} stored uncompressed; dcrt inspect lists every tensor)"
        print(f"{label:<100} "
              f"{human(sum(r['original_bytes'] for r in raw)):>10} {human(sum(r['coded_bytes'] for r in raw)):>10}")
    print("-" * len(head))
    print(f"{'total (all ' + str(t['layers']) + ' tensors)':<28} {'':<13} {t['weights']:<18,} "
          f"{100 * t['sparsity']:7.1f}% {'':>8} {t['bits_per_weight']:7.2f} {'':<12} "
          f"{human(t['original_bytes']):>10} {human(t['coded_bytes']):>10} {t['ratio']:6.1f}x "
          f"{human(t['memory_bytes']['index']):>10}")


def _print_size(r) -> None:
    o, m = r["original"], r["memory_bytes"]
    print()
    print(f"{'':<34} {'.dcm':>10} {'original':>10} {'ratio':>7}")
    rows = [("download (gzip -9)", r["download_bytes"], o.get("gzip_bytes")),
            ("extracted (installed file)", r["extracted_bytes"], o.get("file_bytes")),
            ("memory, index mode (default)", m["index"], o.get("weight_bytes")),
            *([("  on x86 with AVX-512 (+ slices)", m["index"] + m["slices"], o.get("weight_bytes"))]
              if m.get("slices") else []),
            ("memory, dense mode (float32)", m["dense"], o.get("weight_bytes")),
            ("memory, stream mode (peak)", m["stream"], o.get("weight_bytes"))]
    for label, ours, theirs in rows:
        ratio = f"{theirs / ours:6.1f}x" if theirs and ours else ""
        print(f"{label:<34} {human(ours):>10} {human(theirs) if theirs else '-':>10} {ratio:>7}")
    if o.get("file_name"):
        print(f"(original: {o['file_name']}; memory rows compare with its weights as stored)")
    if m.get("slices"):
        print(f"(+ slices: {human(m['slices'])} of recurrent weights in 32-row slices, built at a batch-1 run "
              "where AVX-512 runs them)")


def _cmd_inspect(a) -> int:
    from .report import inspect
    if a.plan:      # the plan alone: no layer table or memory to work out
        from .format import open_dcm
        with open_dcm(a.model) as dcm:
            plan = dcm.plan
        if plan is None:
            raise InputError(f"{a.model} holds no compression plan (written by another tool?)")
        print(json.dumps(plan, indent=2, sort_keys=True))
        return 0
    info = inspect(a.model)
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['file']}: {info['producer']}, format {info['format_version']}, {info['nodes']} nodes, "
          f"opsets {info['opsets']}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            print(f"  {kind[:-1]} {v['name']}: {v['dtype']} {v['shape']}")
    _print_layers(info)
    return 0


def _cmd_size(a) -> int:
    from .report import size
    r = size(a.model, a.original)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(a.model)
        _print_size(r)
    return 0


def _cmd_verify(a) -> int:
    from .format import open_dcm
    with open_dcm(a.model) as dcm:
        problems = dcm.verify()
        for name, problem in problems.items():
            print(f"DAMAGED {name}: {problem}")
        if problems:
            return 1
        print(f"{a.model}: graph and {len(dcm.tensors)} tensors verified, all decode")
    return 0


def _loaded_feeds(sess, specs: List[str]) -> dict:
    """``--input [NAME=]FILE.npy`` options as a feed (:func:`_input_paths`)."""
    from .files import load_npy
    return {name: load_npy(path) for name, path in _input_paths(sess, specs).items()}


def _input_paths(sess, specs: List[str]) -> dict:
    """``--input [NAME=]FILE.npy`` options as ``{input name: path}``. ``NAME=`` counts only when NAME
    is one of the model's inputs (a file name may hold ``=``); unnamed files go to the inputs not
    named, in order."""
    names = [i.name for i in sess.get_inputs()]
    named, unnamed = {}, []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name in names:
            if name in named:
                raise InputError(f"input {name!r} is given twice (--input {name}=...)")
            named[name] = path
        elif sep and name and not os.path.exists(spec):
            # NAME=PATH with a NAME the model does not have, and no file of that whole name either
            raise InputError(f"--input {spec}: {name!r} is not an input of the model (its inputs: "
                             f"{', '.join(names) or 'none'}), and no file {spec!r} exists")
        else:
            unnamed.append(spec)
    rest = [n for n in names if n not in named]
    if len(unnamed) > len(rest):
        raise InputError(f"{len(unnamed)} unnamed --input file(s) but the model has {len(rest)} input(s) left "
                         f"to fill ({', '.join(rest) or 'none'}); name them: --input NAME=FILE.npy")
    named.update(zip(rest, unnamed))
    return named


def _cmd_run(a) -> int:
    import numpy as np

    from .files import load_npy, save_outputs
    from .runtime.session import Session
    sess = Session(a.model, mode=a.mode)
    paths = _input_paths(sess, a.input)
    if a.output and os.path.exists(a.output) and any(os.path.exists(p) and os.path.samefile(p, a.output)
                                                     for p in paths.values()):
        raise InputError(f"--output {a.output} is one of the --input files; give another path")
    outputs = sess.run(None, {name: load_npy(path) for name, path in paths.items()})
    if a.output:
        print(f"wrote {save_outputs(a.output, {o.name: v for o, v in zip(sess.get_outputs(), outputs)})}")
    for o, v in zip(sess.get_outputs(), outputs):
        print(f"{o.name}: {v.dtype} {list(v.shape)}")
        if not a.output:
            print(np.array2string(v, threshold=50, precision=5))
    return 0


def _sample_feeds(sess, given: dict) -> dict:
    """``given`` and a made-up feed for each other input: random floats (seed 0), zeros for integers
    and booleans (a valid index for any table), free dimensions set to 1; announced on stderr."""
    import numpy as np
    rng = np.random.default_rng(0)
    feeds = dict(given)
    for arg in sess.get_inputs():
        if arg.name in given:
            continue
        if arg.shape is None:
            raise InputError(f"input {arg.name!r} has no declared shape: give it with --input {arg.name}=FILE.npy")
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]
        kind = np.dtype(arg.dtype).kind
        feeds[arg.name] = (rng.standard_normal(shape).astype(arg.dtype) if kind in "fc"
                           else np.zeros(shape, arg.dtype))
        print(f"input {arg.name}: {'random' if kind in 'fc' else 'zero'} {np.dtype(arg.dtype).name} {shape}"
              + (" (free dimensions set to 1)" if shape != list(arg.shape) else ""), file=sys.stderr)
    return feeds


def _cmd_profile(a) -> int:
    import numpy as np

    from .runtime.numba_kernels import kernels, threads
    from .runtime.session import Session
    sess = Session(a.model, mode=a.mode)
    feeds = _sample_feeds(sess, _loaded_feeds(sess, a.input))
    rows = sess.profile(feeds, runs=a.runs)
    runs = []
    for _ in range(a.runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        runs.append(time.perf_counter() - start)
    run_s = float(np.median(runs))
    engine = f"numba, {threads()} thread(s)" if kernels() is not None else "numpy kernels (no numba)"
    total = sum(r.seconds for r in rows) or 1.0
    by_op: dict = {}
    for r in rows:
        by_op[r.op_type] = by_op.get(r.op_type, 0.0) + r.seconds
    if a.json:
        print(json.dumps({"model": a.model, "mode": a.mode, "runs": a.runs, "engine": engine, "run_ms": run_s * 1e3,
                          "nodes": [{"name": r.name, "op_type": r.op_type, "weight": r.weight, "ms": r.seconds * 1e3}
                                    for r in rows],
                          "by_op_ms": {k: v * 1e3 for k, v in by_op.items()}}, indent=1))
        return 0
    print(f"{a.model}: {a.mode} mode, {engine}; median of {a.runs} runs per node")
    width = max([4] + [len(r.name) for r in rows])
    op_width = max([2] + [len(r.op_type) for r in rows])
    held_width = max([6] + [len(r.weight) for r in rows])
    print(f"{'node':{width}}  {'op':{op_width}}  {'weight':{held_width}}  {'ms':>9}  {'%':>5}")
    for r in rows:
        print(f"{r.name:{width}}  {r.op_type:{op_width}}  {r.weight:{held_width}}  {r.seconds * 1e3:9.3f}  "
              f"{100 * r.seconds / total:5.1f}")
    print(f"nodes {total * 1e3:.3f} ms (sum of their medians); whole run {run_s * 1e3:.3f} ms "
          f"(median of {a.runs} more runs, untimed nodes)")
    print("by op type: " + ", ".join(f"{op} {100 * t / total:.1f} %"
                                     for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])))
    return 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcrt", description="Deep Compression converter and runtime for edge devices")
    p.add_argument("--version", action="version", version=f"dcrt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="compress an ONNX, Keras or Caffe model into a .dcm file")
    c.add_argument("model", help="source model: .onnx, .h5 / .keras, or .prototxt (with --weights)")
    c.add_argument("-o", "--output", required=True, help="the .dcm file to write")
    c.add_argument("--weights", help="weights file (Caffe .caffemodel)")
    c.add_argument("--bits", type=int, help="codebook index bits for every layer (default: 8 conv, 5 fc); 32 = no clustering")
    c.add_argument("--sparsity", type=float, help="fraction of weights to prune in every layer (default: 0.5 conv, 0.9 fc)")
    c.add_argument("--threshold", type=float, help="prune weights with |w| <= threshold instead")
    c.add_argument("--no-prune", action="store_true", help="keep every non-zero weight")
    c.add_argument("--coder", help="none, huffman (default), lzw, huffman+lzw, lzw+huffman or auto (smallest per stream)")
    c.add_argument("--config", help="per-layer plan (YAML or JSON): defaults / op_types / layers")
    c.add_argument("--calib", help="calibration inputs (.npz / .npy / folder of .npy): refine centroids on them")
    c.add_argument("--saliency", choices=("magnitude", "activation"), default="magnitude",
                   help="with --calib: prune by |w| (the paper) or by |w| * ||x|| on the calibration inputs")
    c.add_argument("--target-size", help="choose per-layer sparsity and bits to fit this size (e.g. 2MB); needs --calib")
    c.add_argument("--max-drop", type=float, metavar="PCT",
                   help="choose per-layer sparsity and bits losing at most PCT %% top-1 agreement on --calib")
    c.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="per-layer table of a .dcm (no decoding)")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.add_argument("--plan", action="store_true",
                   help="print the stored compression plan as JSON, to edit and give to convert --config")
    i.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("size", help="download / installed / memory size against the original model")
    s.add_argument("model")
    s.add_argument("original", nargs="?", help="the original model file (default: sizes stored at conversion)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_size)

    v = sub.add_parser("verify", help="check every checksum and decode every tensor")
    v.add_argument("model")
    v.set_defaults(func=_cmd_verify)

    r = sub.add_parser("run", help="run a .dcm on inputs saved with numpy.save")
    r.add_argument("model")
    r.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE.npy")
    r.add_argument("--output", help="save the output (.npy, or .npz for several outputs)")
    r.add_argument("--mode", default="index", choices=("index", "dense", "stream"))
    r.set_defaults(func=_cmd_run)

    f = sub.add_parser("profile", help="time each node of a .dcm (random inputs unless given)")
    f.add_argument("model")
    f.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE.npy")
    f.add_argument("--runs", type=positive_int, default=20, help="timed runs (medians are printed; default 20)")
    f.add_argument("--mode", default="index", choices=("index", "dense", "stream"))
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_cmd_profile)
    for module in EXTENSIONS:
        try:
            add = importlib.import_module(module).add_commands
        except ImportError:
            continue            # a host-side command whose extra is not installed
        add(sub)
    return p


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"dcrt: warning: {message}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``dcrt`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _warn
    try:
        return args.func(args)
    except DcrtError as e:
        print(f"dcrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:     # the reader went away (``dcrt inspect x.dcm | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        print(f"dcrt: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
