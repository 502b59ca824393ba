"""Sensitivity sweep: compress one layer at a time over a grid of sparsities and bit widths.

Seed 001 found by hand that pruning LeNet-5's conv layers hurt while its FC layers could lose 90 %;
seed 003 showed that one layer alone compresses 250x while the whole net does not. The sweep
measures this per layer: every other layer stays exact, the layer under test is pruned and
clustered exactly as ``dcrt convert`` would (``compress_tensor``, so the coded size is the real
one), and the model's outputs on the data are compared with the original's.

The result is a table (CSV and JSON, one row per layer and setting) and, with matplotlib, plots:
fidelity against sparsity per layer (pruning only), against bits per layer (clustering only), and
each layer's weight histogram with its centroids marked. :mod:`.budget` reads the same table to
choose a plan for a size or accuracy budget.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dcrt.errors import ConfigError
from dcrt.files import json_safe
from dcrt.graph import Model

from .accuracy import Feeds, Runner, judged_output, model_metrics, output_metrics, weight_psnr
from .calibrate import quantize
from .compress import LOSSLESS_BITS, compress_tensor
from .plan import LayerPlan

Progress = Callable[[int, int, str], None]

DEFAULT_SPARSITIES: Tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
# 8-bit codebooks are close to lossless (>40 dB weight PSNR), so the (0.0, 8) point is the baseline
# of each layer; 32 (no clustering) can be asked for but keeps a large layer raw *and unpruned* when
# its kept weights take more than 2^16 values (compress_tensor has no pruned-raw form).
DEFAULT_BITS: Tuple[int, ...] = (2, 3, 4, 5, 6, 8)
#: Columns of the CSV table, in order.
COLUMNS = ("layer", "op_type", "category", "sparsity", "bits", "weights", "original_bytes", "coded_bytes",
           "ratio", "top1_agreement", "top5_agreement", "cosine", "psnr_db", "weight_psnr_db",
           "compressed_top1_accuracy")


@dataclass
class SweepPoint:
    """One layer compressed with one setting, all others exact."""

    layer: str
    op_type: str
    category: str
    sparsity: float
    bits: int
    weights: int
    original_bytes: int
    coded_bytes: int
    top1_agreement: float
    cosine: float
    psnr_db: float
    weight_psnr_db: float
    top5_agreement: float = 1.0
    compressed_top1_accuracy: Optional[float] = None

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.coded_bytes if self.coded_bytes else float("inf")

    def __post_init__(self) -> None:
        # a hand-edited sweep.json ("coded_bytes": "12") fails here, not deep inside the budget walk
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "str":
                ok = isinstance(v, str)
            else:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) or (v is None and "Optional" in f.type)
            if not ok:
                raise TypeError(f"{f.name} must be {f.type}, not {v!r}")


@dataclass
class Sweep:
    """All points of a sweep plus what they were measured against."""

    points: List[SweepPoint]
    samples: int
    sparsities: Tuple[float, ...]
    bits: Tuple[int, ...]
    plans: Dict[str, LayerPlan] = field(default_factory=dict)    # the base plan of each layer
    reference_top1_accuracy: Optional[float] = None

    def layers(self) -> List[str]:
        """Layer names in the order they were swept."""
        seen: List[str] = []
        for p in self.points:
            if p.layer not in seen:
                seen.append(p.layer)
        return seen

    def of(self, layer: str) -> List[SweepPoint]:
        return [p for p in self.points if p.layer == layer]

    def to_rows(self) -> List[Dict[str, Any]]:
        return [{c: (getattr(p, c)) for c in COLUMNS} for p in self.points]

    def to_json(self) -> Dict[str, Any]:
        return {"samples": self.samples, "sparsities": list(self.sparsities), "bits": list(self.bits),
                "reference_top1_accuracy": self.reference_top1_accuracy,
                "plans": {n: asdict(p) for n, p in self.plans.items()},
                "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Sweep":
        """Read back :meth:`to_json` (``dcrt plan --sweep report/sweep.json`` reuses a sweep)."""
        try:
            return cls([SweepPoint(**{k: _unsafe(v) for k, v in p.items()}) for p in data["points"]],
                       int(data["samples"]),
                       tuple(data["sparsities"]), tuple(data["bits"]),
                       {n: LayerPlan(**p) for n, p in (data.get("plans") or {}).items()},
                       data.get("reference_top1_accuracy"))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a sweep table written by dcrt sweep ({e})") from None


def sweep(model: Model, plans: Mapping[str, LayerPlan], feeds: Feeds, *,
          sparsities: Sequence[float] = DEFAULT_SPARSITIES, bits: Sequence[int] = DEFAULT_BITS,
          layers: Optional[Sequence[str]] = None, labels: Optional[np.ndarray] = None,
          runner: Optional[Runner] = None, references: Optional[List[np.ndarray]] = None,
          progress: Optional[Progress] = None) -> Sweep:
    """Compress each planned weight alone at every ``(sparsity, bits)`` and measure the model.

    ``model`` is the simplified graph (as ``dcrt convert`` stores it), ``plans`` the base plan of
    each weight (its coder and ``prune`` setting are kept; ``skip`` layers are left out),
    ``feeds`` the data, ``layers`` glob patterns restricting the sweep. Fidelity is against the
    original model's outputs on the same data (``accuracy.model_metrics``: agreement on the judged
    output, the lowest cosine of all); ``references``: those outputs when the caller has them
    (``runner.run(feeds)``: the budget's judge computed them already).
    """
    if not sparsities or not bits:
        raise ConfigError("the sweep needs at least one sparsity and one bit width")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), not {s}")
    for b in bits:
        if not (1 <= b <= 16 or b == LOSSLESS_BITS):
            raise ConfigError(f"bits must be 1..16 or 32, not {b}")
    names = [n for n in _graph_order(model, plans) if not plans[n].skip
             and (not layers or any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(plans[n].node, pat)
                                    for pat in layers))]
    if not names:
        raise ConfigError("no compressible layer matches" + (f" {', '.join(layers)}" if layers else ""))
    runner = runner or Runner(model, variable=names)
    references = runner.run(feeds) if references is None else references
    reference = references[judged_output(references)]
    result = Sweep([], len(reference), tuple(sparsities), tuple(bits), {n: plans[n] for n in names})
    if labels is not None:
        result.reference_top1_accuracy = output_metrics(reference, reference, labels).get("reference_top1_accuracy")
    grid = len(sparsities) * len(bits)
    for done, name in enumerate(names):
        if progress:                    # one step per layer: each is a whole grid of settings
            progress(done, len(names), f"{name} ({grid} settings)")
        w = np.asarray(model.graph.initializers[name], np.float32)
        base = plans[name]
        for s in sparsities:
            for b in bits:
                plan = replace(base, sparsity=float(s), bits=int(b), threshold=None, prune=s > 0 or base.prune)
                rec, approx = compress_tensor(name, w, plan)
                m = model_metrics(references, runner.run(feeds, {name: approx}), labels)
                result.points.append(SweepPoint(
                    name, base.op_type, base.category, float(s), int(b), int(w.size), int(w.nbytes),
                    int(rec.stats.coded_bytes) if rec.stats is not None else int(w.nbytes),
                    m.get("top1_agreement", 1.0), m["cosine"], m["psnr_db"], weight_psnr(w, approx),
                    m.get("top5_agreement", 1.0), m.get("compressed_top1_accuracy")))
    if progress:
        progress(len(names), len(names), "")
    return result


def _graph_order(model: Model, plans: Mapping[str, LayerPlan]) -> List[str]:
    order: List[str] = []
    for node in model.graph.nodes:
        for i in node.inputs:
            if i in plans and i not in order:
                order.append(i)
    return order + sorted(set(plans) - set(order))


# -- writing the report ----------------------------------------------------------------------------


def _unsafe(v: Any) -> Any:
    """A number as :func:`dcrt.files.json_safe` wrote it, back (``"inf"``: an exact output's PSNR)."""
    return float(v) if v in ("inf", "-inf", "nan") else v


def _number(v: Any) -> Any:
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.6g}"
    return "" if v is None else v


def write_tables(result: Sweep, folder: str) -> List[str]:
    """``sweep.csv`` and ``sweep.json`` in ``folder``; returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    csv_path, json_path = os.path.join(folder, "sweep.csv"), os.path.join(folder, "sweep.json")
    with open(csv_path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for row in result.to_rows():
            out.writerow([_number(row[c]) for c in COLUMNS])
    with open(json_path, "w") as f:
        json.dump(json_safe(result.to_json()), f, indent=1, default=lambda v: None)
    return [csv_path, json_path]


def _slice(points: List[SweepPoint], key: str, fixed: str, value) -> List[SweepPoint]:
    return sorted((p for p in points if getattr(p, fixed) == value), key=lambda p: getattr(p, key))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_plots(result: Sweep, folder: str, model: Optional[Model] = None, max_histograms: int = 16) -> List[str]:
    """PNG plots in ``folder``; returns their paths, or an empty list without matplotlib.

    ``sparsity.png``: top-1 agreement and cosine against sparsity, per layer, without clustering
    (the largest bit width swept); ``bits.png``: the same against bits, without pruning (the
    smallest sparsity swept); ``hist_<layer>.png``: the kept weights of each layer under its base
    plan, with the k-means centroids marked (needs ``model``).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(folder, exist_ok=True)
    written = []
    top_bits, low_sparsity = max(result.bits), min(result.sparsities)
    for key, fixed, value, fname, xlabel in (
            ("sparsity", "bits", top_bits, "sparsity.png", "sparsity (fraction pruned)"),
            ("bits", "sparsity", low_sparsity, "bits.png", "codebook bits per weight")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for layer in result.layers():
            pts = _slice(result.of(layer), key, fixed, value)
            if not pts:
                continue
            xs = [getattr(p, key) for p in pts]
            axes[0].plot(xs, [100 * p.top1_agreement for p in pts], marker="o", label=layer)
            axes[1].plot(xs, [p.cosine for p in pts], marker="o", label=layer)
        what = f"bits={value}" if fixed == "bits" else f"sparsity={value:g}"
        if fixed == "bits" and value >= LOSSLESS_BITS:
            what = "no clustering"
        elif fixed == "sparsity" and value == 0:
            what = "no pruning"
        axes[0].set_ylabel("top-1 agreement with original (%)")
        axes[1].set_ylabel("output cosine similarity")
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        if key == "bits":
            ticks = sorted(result.bits)
            for ax in axes:
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks)
                ax.set_xticklabels([str(t) for t in ticks])
        axes[1].legend(fontsize=7, loc="best")
        fig.suptitle(f"one layer compressed at a time ({what}; {result.samples} samples)")
        fig.tight_layout()
        path = os.path.join(folder, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if model is not None:
        for layer in result.layers()[:max_histograms]:
            plan = result.plans.get(layer)
            if plan is None:
                continue
            w = np.asarray(model.graph.initializers[layer], np.float32)
            _, keep, clusters, _ = quantize(w, plan)
            fig, ax = plt.subplots(figsize=(7, 3.6))
            kept = w[keep] if keep is not None else w.ravel()
            ax.hist(w.ravel(), bins=200, color="0.8", label="all weights")
            ax.hist(kept, bins=200, color="tab:blue", alpha=0.7, label=f"kept ({100 * (1 - plan.sparsity):.0f} %)")
            if clusters is not None:
                ax.vlines(clusters[1], 0, 1, transform=ax.get_xaxis_transform(), color="tab:red", lw=0.6,
                          alpha=0.8, label=f"{len(clusters[1])} centroids")
            ax.set_title(f"{layer}: sparsity {plan.sparsity:g}, {plan.bits} bits")
            ax.set_xlabel("weight value")
            ax.set_ylabel("count")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(folder, f"hist_{_safe(layer)}.png")
            if path in written:     # "blk/fc.w" and "blk:fc.w" are both hist_blk_fc.w
                path = path[:-4] + f"_{len(written)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
