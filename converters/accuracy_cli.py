"""``dcrt eval``, ``dcrt sweep`` and ``dcrt plan``: the accuracy side of the command line.

Registered by ``dcrt.cli`` through ``EXTENSIONS``: :func:`add_commands` adds the subcommands, each
sets ``func(args) -> int``. Every error a user can cause is a ``dcrt.errors`` exception, which the
CLI prints as one message.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from dcrt.cli import positive_int
from dcrt.errors import ConfigError
from dcrt.files import json_safe
from dcrt.format.writer import atomic_write, output_problem
from dcrt.report import human


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _percent(text: str) -> float:
    """An argparse type: a percentage in [0, 100]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0.0 <= value <= 100.0:       # also refuses nan
        raise argparse.ArgumentTypeError(f"a percentage is in [0, 100], not {text}")
    return value


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _db(v: float) -> str:
    return "inf" if math.isinf(v) and v > 0 else f"{v:.1f}"


def _progress(quiet: bool):
    if quiet:
        return None
    from dcrt.cli import _progress_bar
    return _progress_bar()


# -- dcrt eval -------------------------------------------------------------------------------------


def print_eval(report: Dict[str, Any], out=None) -> None:
    """The human-readable form of :func:`accuracy.evaluate`'s report (to ``out``, default stdout)."""
    out = out or sys.stdout
    ref = f" vs {report['reference']}" if report.get("reference") else ""
    print(f"{report['model']}{ref} on {report['data']} ({report['samples']} samples)", file=out)
    for name, m in report["outputs"].items():
        parts = []
        if "top1_agreement" in m:
            parts.append(f"top-1 agreement {_pct(m['top1_agreement'])}, top-5 agreement {_pct(m['top5_agreement'])}")
        if "cosine" in m:
            parts.append(f"cosine {m['cosine']:.5f}, PSNR {_db(m['psnr_db'])} dB")
        print(f"  output {name}: " + "; ".join(parts), file=out)
        if "compressed_top1_accuracy" in m:
            line = f"    accuracy: compressed {_pct(m['compressed_top1_accuracy'])} top-1, " \
                   f"{_pct(m['compressed_top5_accuracy'])} top-5"
            if "reference_top1_accuracy" in m:
                drop = 100 * (m["reference_top1_accuracy"] - m["compressed_top1_accuracy"])
                line += f"; original {_pct(m['reference_top1_accuracy'])} top-1, " \
                        f"{_pct(m['reference_top5_accuracy'])} top-5 (top-1 drop {drop:+.2f} points)"
            print(line, file=out)
    layers = report.get("layers")
    if layers:
        print("\nper-layer weights, decoded vs original (seed 003, table 4):", file=out)
        head = (f"  {'layer':<30} {'op':<8} {'codebook':>8} {'sparsity':>8} {'bits/w':>7} {'ratio':>7} "
                f"{'PSNR dB':>8} {'cosine':>8}")
        print(head, file=out)
        for r in layers:
            print(f"  {r['layer'][:30]:<30} {r['op'][:8]:<8} {r['codebook']:>8} {100 * r['sparsity']:7.1f}% "
                  f"{r['bits_per_weight']:7.2f} {r['ratio']:6.1f}x {_db(r['psnr_db']):>8} {r['cosine']:8.5f}", file=out)


def below_minimum(agreement: float, minimum_pct: float) -> bool:
    """Whether an agreement (a fraction) is below ``--min-agreement`` (a percentage): 29 of 100 samples
    meet 29 %, though ``100 * 0.29`` is 28.999..."""
    return round(100 * agreement, 9) < minimum_pct


def _cmd_eval(a) -> int:
    from .accuracy import evaluate
    report = evaluate(a.model, a.reference, a.data, a.labels, batch_size=a.batch_size, max_samples=a.max_samples)
    if a.json:
        print(json.dumps(json_safe(report), indent=2, default=str))
    else:
        print_eval(report)
    if a.min_agreement is not None:
        if not a.reference:
            raise ConfigError("--min-agreement needs --reference (agreement is measured against it)")
        got = next((m["top1_agreement"] for m in report["outputs"].values() if "top1_agreement" in m), None)
        if got is None:
            raise ConfigError("--min-agreement: no output of the model has classes to agree on (each gives "
                              "one value per sample); compare cosine and PSNR instead")
        if below_minimum(got, a.min_agreement):
            print(f"dcrt: top-1 agreement {100 * got:.2f} % is below --min-agreement {a.min_agreement} %",
                  file=sys.stderr)
            return 1
    return 0


# -- dcrt sweep ------------------------------------------------------------------------------------


def _load(source: str, weights: Optional[str], config: Optional[str], flags: Dict[str, Any]):
    from . import passes
    from .convert import check_operators, load_model
    from .plan import load_config, make_plan
    model, _ = load_model(source, weights)
    passes.simplify(model.graph)
    check_operators(model)
    plans = make_plan(model.graph, flags, load_config(config) if config else None)
    return model, plans


def _cmd_sweep(a) -> int:
    from .accuracy import load_data
    from .sweep import sweep, write_plots, write_tables
    if os.path.exists(a.output) and not os.path.isdir(a.output):
        raise ConfigError(f"-o {a.output} is a file; dcrt sweep writes a report folder: give a folder path")
    existing = a.output if os.path.isdir(a.output) else os.path.dirname(os.path.abspath(a.output))
    while not os.path.isdir(existing):      # the nearest folder that exists: it is written into
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):     # found before the sweep, which can take minutes
        raise ConfigError(f"cannot write the report into {a.output}: {existing} is not writable")
    model, plans = _load(a.model, a.weights, a.config, {"coder": a.coder})
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    feeds, labels = load_data(a.data, inputs, a.max_samples)
    if a.labels:
        from .accuracy import load_labels
        labels = load_labels(a.labels)[:a.max_samples]
    result = sweep(model, plans, feeds, sparsities=a.sparsities, bits=a.bits, layers=a.layers or None,
                   labels=labels, progress=_progress(a.quiet))
    written = write_tables(result, a.output)
    plots = [] if a.no_plots else write_plots(result, a.output, model)
    if not a.quiet:
        _print_sweep_summary(result)
    for path in written + plots:
        print(f"wrote {path}")
    if not a.no_plots and not plots:
        print("plots skipped: matplotlib is not installed (pip install 'dcrt[plot]')")
    return 0


def _print_sweep_summary(result) -> None:
    """Per layer: the most aggressive setting that still agrees on >= 99 % of the samples."""
    print(f"\nper layer, compressed alone ({result.samples} samples): the smallest setting with "
          f">= 99 % top-1 agreement")
    print(f"  {'layer':<30} {'sparsity':>8} {'bits':>5} {'coded':>10} {'ratio':>7} {'agree':>8} {'cosine':>8}")
    for layer in result.layers():
        ok = [p for p in result.of(layer) if p.top1_agreement >= 0.99]
        if not ok:
            print(f"  {layer[:30]:<30} {'none':>8}")
            continue
        p = min(ok, key=lambda p: p.coded_bytes)
        print(f"  {layer[:30]:<30} {p.sparsity:8.2f} {p.bits:5d} {human(p.coded_bytes):>10} {p.ratio:6.1f}x "
              f"{100 * p.top1_agreement:7.2f}% {p.cosine:8.5f}")


# -- dcrt plan (budgets) ---------------------------------------------------------------------------


def run_budget(source: str, data: Optional[str], *, target_size: Optional[str], max_drop: Optional[float],
               config: Optional[str] = None, flags: Optional[Dict[str, Any]] = None, weights: Optional[str] = None,
               sweep_path: Optional[str] = None, sparsities: Optional[Sequence[float]] = None,
               bits: Optional[Sequence[int]] = None, max_samples: int = 512, save: Optional[str] = None,
               quiet: bool = False):
    """Choose a plan for a budget, print its summary, write it to ``save``; returns the BudgetResult.

    Shared by ``dcrt plan`` and ``dcrt convert --target-size/--max-drop``.
    """
    from .budget import plan_for_budget
    from .sweep import DEFAULT_BITS, DEFAULT_SPARSITIES, Sweep
    if not data:
        raise ConfigError("a budget needs calibration data to measure the drop on: --calib/--data data.npz")
    if save:        # checked before the sweep, which can take minutes
        problem = output_problem(save)
        if problem:
            raise ConfigError(f"cannot write the plan: {problem}")
    reuse = None
    if sweep_path:
        try:
            with open(sweep_path) as f:
                reuse = Sweep.from_json(json.load(f))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the sweep {sweep_path}: {e}") from None
    result = plan_for_budget(source, data, target_size=target_size, max_drop=max_drop, config=config,
                             flags=flags, weights=weights, sweep_result=reuse,
                             sparsities=sparsities or DEFAULT_SPARSITIES, bits=bits or DEFAULT_BITS,
                             max_samples=max_samples, progress=_progress(quiet))
    if save:
        write_plan(save, result.config)
    if not quiet:
        print(result.summary())
        if save:
            print(f"plan written to {save} (edit it, then: dcrt convert {os.path.basename(source)} "
                  f"-o model.dcm --config {save})")
    return result


def _cmd_plan(a) -> int:
    if not a.output.endswith(".json"):
        raise ConfigError(f"the plan is written as JSON: give -o {os.path.splitext(a.output)[0]}.json")
    if os.path.exists(a.output) and not a.force:     # checked before the sweep, which can take minutes
        raise ConfigError(f"{a.output} exists; pass --force to replace it")
    run_budget(a.model, a.data, target_size=a.target_size, max_drop=a.max_drop, config=a.config,
               flags={"coder": a.coder}, weights=a.weights, sweep_path=a.sweep, sparsities=a.sparsities,
               bits=a.bits, max_samples=a.max_samples, save=a.output, quiet=a.quiet)
    return 0


def convert_budget_config(a) -> Optional[Dict[str, Any]]:
    """For ``dcrt convert``: the budget's plan when ``--target-size``/``--max-drop`` are given, else None.

    The caller writes it next to the output, as ``<output>.plan.json`` (:func:`plan_path`), once the
    conversion has succeeded; an existing one is replaced only with ``--force``.
    """
    if getattr(a, "target_size", None) is None and getattr(a, "max_drop", None) is None:
        return None
    if getattr(a, "no_prune", False) or getattr(a, "threshold", None) is not None:
        # the sweep prunes by magnitude, at the sparsities it measures: a plan measured so, then
        # written with another pruning, would miss the size or the drop it promised
        raise ConfigError("--target-size/--max-drop choose each layer's sparsity: leave out --no-prune and "
                          "--threshold (or plan with dcrt plan, edit the plan, then convert --config)")
    save = plan_path(a.output)
    problem = output_problem(save)
    if problem:
        raise ConfigError(f"cannot write the plan beside the output: {problem}")
    if os.path.exists(save) and not getattr(a, "force", False):
        raise ConfigError(f"{save} exists (the plan of an earlier conversion?): use --force to replace it")
    flags = {"bits": a.bits, "sparsity": a.sparsity, "coder": a.coder}
    result = run_budget(a.model, getattr(a, "calib", None), target_size=a.target_size, max_drop=a.max_drop,
                        config=a.config, flags=flags, weights=a.weights, quiet=a.quiet)
    return result.config


def plan_path(output: str) -> str:
    """Where ``dcrt convert --target-size/--max-drop`` writes the plan it chose."""
    return output + ".plan.json"


def write_plan(path: str, config: Dict[str, Any]) -> None:
    """The plan as JSON, written atomically (reusable with ``--config``)."""
    atomic_write(path, (json.dumps(config, indent=2) + "\n").encode())


# -- registration ----------------------------------------------------------------------------------


def add_commands(sub) -> None:
    """Add ``eval``, ``sweep`` and ``plan`` to the ``dcrt`` subparsers."""
    from .sweep import DEFAULT_BITS, DEFAULT_SPARSITIES

    e = sub.add_parser("eval", help="fidelity of a .dcm against its original model on data (agreement, accuracy, PSNR)")
    e.add_argument("model", help="the .dcm to evaluate")
    e.add_argument("--reference", help="the original model (.onnx), run by onnxruntime")
    e.add_argument("--data", required=True, help="inputs: .npz (arrays by input name, or one array), .npy, "
                                                 "or a folder of .npy files")
    e.add_argument("--labels", help="class labels (.npy) for top-1/top-5 accuracy (or a 'labels' array in the .npz)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--batch-size", type=positive_int, default=256)
    e.add_argument("--max-samples", type=positive_int, help="use the first N samples only")
    e.add_argument("--min-agreement", type=_percent, metavar="PCT",
                   help="exit with status 1 when top-1 agreement is below PCT percent (for CI)")
    e.set_defaults(func=_cmd_eval)

    s = sub.add_parser("sweep", help="compress one layer at a time over sparsities and bits; tables and plots")
    s.add_argument("model", help="source model (.onnx, .h5/.keras, .prototxt with --weights)")
    s.add_argument("--data", required=True, help="inputs to measure fidelity on (.npz / .npy / folder)")
    s.add_argument("-o", "--output", required=True, help="report folder (sweep.csv, sweep.json, *.png)")
    s.add_argument("--labels", help="class labels (.npy): adds accuracy to the table")
    s.add_argument("--weights", help="weights file (Caffe .caffemodel)")
    s.add_argument("--config", help="base plan (YAML/JSON): its coder and skipped layers are kept")
    s.add_argument("--coder", help="coder used to measure coded sizes (default: the plan's, huffman)")
    s.add_argument("--sparsities", type=_floats, default=list(DEFAULT_SPARSITIES),
                   help=f"comma-separated (default {','.join(map(str, DEFAULT_SPARSITIES))})")
    s.add_argument("--bits", type=_ints, default=list(DEFAULT_BITS),
                   help=f"comma-separated (default {','.join(map(str, DEFAULT_BITS))})")
    s.add_argument("--layers", nargs="*", metavar="GLOB", help="only these layers (glob on tensor or node name)")
    s.add_argument("--max-samples", type=positive_int, default=512, help="samples used (default 512)")
    s.add_argument("--no-plots", action="store_true", help="tables only")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("plan", help="choose per-layer sparsity and bits for a size or accuracy budget")
    p.add_argument("model", help="source model (.onnx, .h5/.keras, .prototxt with --weights)")
    p.add_argument("--data", "--calib", dest="data", required=True, help="calibration inputs (.npz / .npy / folder)")
    p.add_argument("-o", "--output", required=True, help="the plan to write (.json, reusable with convert --config)")
    p.add_argument("--target-size", help="largest .dcm file, e.g. 2MB, 500KB, 1.5MiB")
    p.add_argument("--max-drop", type=float, metavar="PCT", help="largest loss of top-1 agreement, in percent")
    p.add_argument("--sweep", help="reuse a sweep.json written by dcrt sweep (same model and plan)")
    p.add_argument("--weights", help="weights file (Caffe .caffemodel)")
    p.add_argument("--config", help="base plan (YAML/JSON): coder, skipped layers")
    p.add_argument("--coder", help="coder (default huffman)")
    p.add_argument("--sparsities", type=_floats,
                   help="sweep grid (default %s)" % ",".join(map(str, DEFAULT_SPARSITIES)))
    p.add_argument("--bits", type=_ints, help="sweep grid (default %s)" % ",".join(map(str, DEFAULT_BITS)))
    p.add_argument("--max-samples", type=positive_int, default=512)
    p.add_argument("--force", action="store_true", help="replace the plan file if it exists")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_plan)
