"""Budgets: choose per-layer sparsity and bits for a target file size or a maximum accuracy drop.

Users want the smallest model that still works, not a compression ratio. From a sensitivity sweep
(:mod:`.sweep`: each layer compressed alone over a grid of settings, with its coded size and the
model's fidelity), a greedy search walks from the gentlest setting of every layer towards smaller
ones, each step taking the move that costs the least fidelity per byte saved. That gives a path of
plans from large-and-exact to small-and-lossy:

- ``target_bytes``: the first plan on the path whose ``.dcm`` fits (the estimate is checked by
  converting for real, and the walk continues if the file came out larger);
- ``max_drop``: the last plan whose *measured* top-1 agreement with the original model, with all
  layers compressed together, stays within ``max_drop`` percent (binary search on the path: the
  per-layer sweep adds up errors that in reality interact, seed 003's lesson);
- both: the first plan that fits, if its drop is within the limit; otherwise a ConfigError saying
  what each budget alone would give.

The chosen plan is returned as a config (``plan_to_json`` format) the user can edit and re-run with
``dcrt convert --config``.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dcrt.errors import ConfigError
from dcrt.graph import Model
from dcrt.report import human

from .accuracy import Feeds, Runner, feeds_of, judged_output, model_metrics
from .calibrate import quantize
from .plan import LayerPlan, make_plan, plan_to_json
from .sweep import DEFAULT_BITS, DEFAULT_SPARSITIES, Sweep, SweepPoint, sweep

Progress = Callable[[int, int, str], None]
#: Conversions tried to bring the real file under the target when the estimate was optimistic.
MAX_SIZE_CHECKS = 6

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}


def parse_size(text: str) -> int:
    """``"2MB"``, ``"500 KB"``, ``"1.5MiB"``, ``"120000"`` to bytes (KB/MB are powers of 1000, as ``dcrt size``)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read the size {text!r}: write e.g. 2MB, 500KB, 1.5MiB or a byte count")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"the target size must be positive, not {text!r}")
    return size


def damage(p: SweepPoint) -> float:
    """How much one layer's setting hurts: lost top-1 agreement plus lost output cosine.

    Agreement is what the budget is about; cosine keeps the ranking informative where agreement is
    still 100 % (a small data set) and breaks ties between settings.
    """
    return (1.0 - p.top1_agreement) + (1.0 - p.cosine)


def frontier(points: Sequence[SweepPoint]) -> List[SweepPoint]:
    """The settings of one layer not beaten by another that is both smaller and less damaging."""
    best: List[SweepPoint] = []
    for p in sorted(points, key=lambda p: (damage(p), p.coded_bytes)):
        if not best or p.coded_bytes < best[-1].coded_bytes:
            best.append(p)
    return best   # damage rising, bytes falling


def hull(points: Sequence[SweepPoint]) -> List[SweepPoint]:
    """The lower convex hull of a layer's frontier in the (bytes saved, damage) plane.

    Along it the damage per byte saved only grows, so taking hull moves in order of that slope over
    all layers is the greedy optimum of the (fractional) knapsack; settings inside the hull are
    never worth it at their own price.
    """
    front = frontier(points)
    out: List[SweepPoint] = []
    for p in front:       # bytes falling, damage rising
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b is above the chord a -> p: drop it
            if (damage(b) - damage(a)) * (a.coded_bytes - p.coded_bytes) >= \
                    (damage(p) - damage(a)) * (a.coded_bytes - b.coded_bytes):
                out.pop()
            else:
                break
        out.append(p)
    return out


def greedy_path(result: Sweep) -> List[Dict[str, SweepPoint]]:
    """Plans from the gentlest setting of every layer to the smallest, one greedy move at a time.

    Each move advances one layer to the next setting of its hull (:func:`hull`): the move with the
    least damage added per byte saved over all layers.
    """
    hulls = {layer: hull(result.of(layer)) for layer in result.layers()}
    at = {layer: 0 for layer, h in hulls.items() if h}
    path = [{layer: hulls[layer][0] for layer in at}]
    while True:
        best: Optional[Tuple[float, int, str]] = None
        for layer, i in at.items():
            if i + 1 >= len(hulls[layer]):
                continue
            cur, nxt = hulls[layer][i], hulls[layer][i + 1]
            saved = cur.coded_bytes - nxt.coded_bytes
            key = ((damage(nxt) - damage(cur)) / saved, -saved, layer)
            if best is None or key < best:
                best = key
        if best is None:
            return path
        at[best[2]] += 1
        path.append({layer: hulls[layer][i] for layer, i in at.items()})


def fit_between(result: Sweep, bigger: Mapping[str, SweepPoint], budget: int) -> Optional[Dict[str, SweepPoint]]:
    """The least damaging plan that differs from ``bigger`` in one layer and fits ``budget`` bytes.

    Hull moves can jump far past a size target; one layer set to any of its frontier settings
    often lands closer.
    """
    total = state_bytes(bigger)
    best = None
    for layer, cur in bigger.items():
        for q in frontier(result.of(layer)):
            if total - cur.coded_bytes + q.coded_bytes <= budget:
                cost = damage(q) - damage(cur)
                if best is None or cost < best[0]:
                    best = (cost, layer, q)
    if best is None:
        return None
    state = dict(bigger)
    state[best[1]] = best[2]
    return state


def state_bytes(state: Mapping[str, SweepPoint]) -> int:
    return sum(p.coded_bytes for p in state.values())


def state_plans(state: Mapping[str, SweepPoint], plans: Mapping[str, LayerPlan]) -> Dict[str, LayerPlan]:
    """The full plan with each swept layer set to its chosen sparsity and bits."""
    out = dict(plans)
    for layer, p in state.items():
        out[layer] = replace(plans[layer], sparsity=p.sparsity, bits=p.bits, threshold=None,
                             prune=p.sparsity > 0 or plans[layer].prune)
    return out


@dataclass
class BudgetResult:
    """The plan chosen for a budget and what it measured."""

    plans: Dict[str, LayerPlan]
    config: Dict[str, Any]               # plan_to_json(plans): reusable as --config
    estimated_bytes: int                 # predicted .dcm size
    file_bytes: Optional[int]            # real .dcm size, when a conversion checked it
    top1_agreement: float                # all layers compressed together, on the data
    cosine: float
    samples: int
    step: int                            # position on the greedy path
    path_length: int
    sweep: Optional[Sweep] = field(default=None, repr=False)

    @property
    def drop(self) -> float:
        """Top-1 agreement lost, in percent."""
        return 100.0 * (1.0 - self.top1_agreement)

    def summary(self) -> str:
        size = human(self.file_bytes) if self.file_bytes is not None else "~" + human(self.estimated_bytes)
        lines = [f"chosen plan: {size} .dcm, top-1 agreement {100 * self.top1_agreement:.2f} % "
                 f"(drop {self.drop:.2f} %), output cosine {self.cosine:.4f} on {self.samples} samples "
                 f"(step {self.step} of {self.path_length - 1})"]
        for name, p in self.plans.items():
            if not p.skip:
                lines.append(f"  {name:<32} sparsity {p.sparsity:4.2f}  bits {p.bits}")
        return "\n".join(lines)


class _Judge:
    """Measures whole plans on the data: all layers compressed at once, against the original."""

    def __init__(self, model: Model, names: Sequence[str], feeds: Feeds, runner: Optional[Runner] = None):
        self.model = model
        self.feeds = feeds
        self.runner = runner or Runner(model, variable=names)
        self.references = self.runner.run(feeds)
        self.reference = self.references[judged_output(self.references)]
        self._approx: Dict[Tuple[str, float, int], np.ndarray] = {}
        self._seen: Dict[tuple, Dict[str, float]] = {}

    def approx(self, name: str, plan: LayerPlan) -> np.ndarray:
        key = (name, plan.sparsity, plan.bits)
        if key not in self._approx:
            self._approx[key] = quantize(self.model.graph.initializers[name], plan)[0]
        return self._approx[key]

    def measure(self, plans: Mapping[str, LayerPlan], state: Mapping[str, SweepPoint]) -> Dict[str, float]:
        key = tuple(sorted((n, p.sparsity, p.bits) for n, p in state.items()))
        if key not in self._seen:
            weights = {n: self.approx(n, plans[n]) for n in state}
            m = model_metrics(self.references, self.runner.run(self.feeds, weights))
            self._seen[key] = {"top1_agreement": m.get("top1_agreement", 1.0), "cosine": m["cosine"]}
        return self._seen[key]


def _file_size(source: str, config: Dict[str, Any], weights: Optional[str]) -> Tuple[int, int]:
    """``(file bytes, sum of coded layer bytes)`` of a real conversion with ``config``."""
    from .convert import convert
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "budget.dcm")
        result = convert(source, out, weights=weights, config=config, force=True)
        return result.file_bytes, sum(r.stats.coded_bytes for r in result.records.values())


def plan_for_budget(source: str, data: Any, *, target_size: Optional[Any] = None,
                    max_drop: Optional[float] = None, config: Optional[Any] = None,
                    flags: Optional[Dict[str, Any]] = None, weights: Optional[str] = None,
                    sweep_result: Optional[Sweep] = None,
                    sparsities: Sequence[float] = DEFAULT_SPARSITIES, bits: Sequence[int] = DEFAULT_BITS,
                    max_samples: int = 512, check_size: bool = True,
                    progress: Optional[Progress] = None) -> BudgetResult:
    """Choose per-layer sparsity and bits for ``source`` to meet ``target_size`` and/or ``max_drop``.

    ``data``: calibration inputs (path or arrays) on which the drop in top-1 agreement is measured;
    ``target_size``: bytes or a string like ``"2MB"`` (the ``.dcm`` file); ``max_drop``: percent of
    top-1 agreement; ``config``/``flags``: the base plan (coder, skipped layers, ...) as for
    ``convert``; ``sweep_result``: a sweep to reuse instead of running one.
    """
    from . import passes
    from .convert import load_model
    from .plan import load_config
    if target_size is None and max_drop is None:
        raise ConfigError("give a budget: a target size (e.g. 2MB) and/or a maximum drop (e.g. 0.5 percent)")
    target = parse_size(target_size) if isinstance(target_size, str) else target_size
    if max_drop is not None and (not isinstance(max_drop, (int, float)) or not 0.0 <= max_drop <= 100.0):
        raise ConfigError(f"the maximum drop is a percentage in [0, 100], not {max_drop}")
    model, _ = load_model(source, weights)
    passes.simplify(model.graph)
    if isinstance(config, str):
        config = load_config(config)
    base = make_plan(model.graph, flags, config)
    swept = {n: p for n, p in base.items() if not p.skip}
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    feeds = feeds_of(data, inputs, max_samples)
    runner = Runner(model, variable=list(swept))
    judge = _Judge(model, list(swept), feeds, runner)
    if max_drop is not None and not (judge.reference.ndim > 1 and judge.reference.shape[1] > 1):
        raise ConfigError("--max-drop is a loss of top-1 agreement, but no output of the model has classes "
                          "(each gives one value per sample): give a --target-size instead")
    if sweep_result is None:
        sweep_result = sweep(model, swept, feeds, sparsities=sparsities, bits=bits, runner=runner,
                             references=judge.references, progress=progress)
    missing = set(swept) - set(sweep_result.layers())
    if missing:
        raise ConfigError(f"the sweep has no rows for {', '.join(sorted(missing))}: "
                          "sweep the same model with the same plan")
    extra = set(sweep_result.layers()) - set(swept)
    if extra:       # layers the plan skips (or another model's): the walk must not touch them
        sweep_result = Sweep([p for p in sweep_result.points if p.layer in swept], sweep_result.samples,
                             sweep_result.sparsities, sweep_result.bits,
                             {n: p for n, p in sweep_result.plans.items() if n in swept},
                             sweep_result.reference_top1_accuracy)
    path = greedy_path(sweep_result)
    all_plans = [state_plans(s, base) for s in path]

    def drop_at(i: int) -> float:
        return 100.0 * (1.0 - judge.measure(all_plans[i], path[i])["top1_agreement"])

    # fixed bytes of the file: graph, raw tensors, plan, headers (measured once, from the start plan)
    overhead = 0
    if check_size:
        file_bytes, coded = _file_size(source, plan_to_json(all_plans[0]), weights)
        overhead = file_bytes - coded
    fits = None
    if target is not None:
        fits = next((i for i, s in enumerate(path) if state_bytes(s) + overhead <= target), None)
        if fits is None:
            raise ConfigError(f"cannot reach {human(target)}: the smallest plan swept gives "
                              f"~{human(state_bytes(path[-1]) + overhead)}; sweep smaller settings "
                              "(more sparsity, fewer bits)")
        # hull steps can jump far below the target: a plan one layer away from a larger plan on
        # the path may fit with less damage; take the least damaging of those
        best = path[fits]
        for bigger in path[:fits]:
            closer = fit_between(sweep_result, bigger, target - overhead)
            if closer is not None and sum(map(damage, closer.values())) < sum(map(damage, best.values())):
                best = closer
        if best is not path[fits]:
            path.insert(fits, best)
            all_plans.insert(fits, state_plans(best, base))
    within = None
    if max_drop is not None:
        if drop_at(0) > max_drop:
            raise ConfigError(f"even the gentlest plan loses {drop_at(0):.2f} % top-1 agreement "
                              f"(> {max_drop} %); allow more drop or sweep gentler settings")
        lo, hi = 0, len(path) - 1           # lo: known within the drop
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if drop_at(mid) <= max_drop:
                lo = mid
            else:
                hi = mid - 1
        within = lo
    if fits is not None and within is not None and fits > within:
        raise ConfigError(
            f"cannot meet both budgets: fitting {human(target)} loses {drop_at(fits):.2f} % top-1 agreement; "
            f"within {max_drop} % the smallest plan is ~{human(state_bytes(path[within]) + overhead)}")
    index = fits if fits is not None else within
    file_bytes = None
    if check_size and target is not None:
        for _ in range(MAX_SIZE_CHECKS):
            file_bytes, coded = _file_size(source, plan_to_json(all_plans[index]), weights)
            if file_bytes <= target:
                break
            excess = file_bytes - target
            later = next((i for i in range(index + 1, len(path))
                          if state_bytes(path[i]) <= state_bytes(path[index]) - excess), None)
            if later is None or (within is not None and later > within):
                raise ConfigError(f"the plan closest to {human(target)} still writes {file_bytes:,} bytes "
                                  f"(over {target:,}); sweep smaller settings (more sparsity, fewer bits)")
            index = later
    chosen = judge.measure(all_plans[index], path[index])
    return BudgetResult(all_plans[index], plan_to_json(all_plans[index]), state_bytes(path[index]) + overhead,
                        file_bytes, chosen["top1_agreement"], chosen["cosine"], len(judge.reference), index,
                        len(path), sweep_result)
