"""Data-aware quantization: refine each layer's centroids so its *outputs*, not its weights, stay close.

With the pruning mask and the cluster assignment fixed, a layer's output is linear in its centroids:
``W = sum_k c_k M_k`` (``M_k`` marks the weights of cluster ``k``), so ``y = X W^T = sum_k c_k X M_k^T``.
Least squares over calibration inputs gives the ``K`` centroids that best reproduce the original
layer's output. This is the "trained quantization" step of Deep Compression (fine-tuning the shared
centroids) done in closed form, one layer at a time, without a training framework.

By default the layers are refined in graph order, each on the inputs it receives from the already
compressed layers before it, against the output the original layer computes from the original
inputs: a layer then also absorbs part of the error its predecessors made (``sequential=True``).

Gemm, MatMul (2-D weight in slot 1) and Conv (any groups, via im2col on a random subset of output
positions) are refined; other weights (RNN gates, embeddings, ConvTranspose) keep plain k-means.
Optionally the pruning mask itself is data-aware (``saliency="activation"``): weights are ranked by
``|w| * ||x_f||``, the magnitude times the norm of the input feature it multiplies, so weights that
multiply large activations survive and weights on inputs that are always zero go first.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dcrt.errors import ConfigError
from dcrt.graph import Graph, Model, Node

from .accuracy import Feeds, Runner, batches, feeds_of, sample_count
from .compress import LOSSLESS_BITS, prune_mask, share_weights
from .plan import LayerPlan

Progress = Callable[[int, int, str], None]

#: Rows (samples x output positions) of a layer's input used for its least squares.
MAX_ROWS = 4096
#: Bytes of layer inputs held at once while running the calibration data (sets the batch size).
MEMORY = 256 << 20
#: Calibration samples run through the model (the first ones of the data set).
MAX_SAMPLES = 1024
#: Ridge strength relative to the mean diagonal of the normal equations: keeps clusters the data
#: barely excites at their k-means value instead of letting them drift.
RIDGE = 1e-4
#: Output values (rows x output channels) the least squares needs per centroid it fits: with fewer,
#: the centroids fit the few calibration samples and fail on others (an MLP's 10-output layer of 24
#: centroids on 1-3 samples: held-out cosine 0.42 with k-means, -0.08 to 0.09 refined), so k-means stays.
MIN_EQUATIONS_PER_CENTROID = 16
#: Elements gathered at once while forming the normal equations (bounds the memory used).
CHUNK_ELEMENTS = 1 << 22


# -- how a layer uses its weight -------------------------------------------------------------------


@dataclass(frozen=True)
class LayerView:
    """A weight as a matrix ``Wm [outputs, features]`` of its layer: ``y = X @ Wm.T`` (per group)."""

    node: Node
    kind: str            # "gemm", "matmul", "conv"
    transposed: bool     # Wm is the weight transposed (Gemm transB=0, MatMul)
    groups: int = 1

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight (or any array of its shape, e.g. cluster labels) as ``Wm``."""
        if self.kind == "conv":
            return w.reshape(w.shape[0], -1)
        return w.T if self.transposed else w

    def weight(self, m: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Inverse of :meth:`matrix`."""
        if self.kind == "conv":
            return m.reshape(shape)
        return np.ascontiguousarray(m.T if self.transposed else m)


def layer_view(graph: Graph, name: str) -> Optional[LayerView]:
    """How the single node reading weight ``name`` uses it, or None when it cannot be refined."""
    users = [(node, slot) for node in graph.nodes for slot, i in enumerate(node.inputs) if i == name]
    if len(users) != 1:
        return None
    node, slot = users[0]
    w = graph.initializers[name]
    if node.domain or slot != 1 or not node.inputs[0] or node.inputs[0] in graph.initializers:
        return None
    if node.op_type == "Gemm" and w.ndim == 2:
        return LayerView(node, "gemm", transposed=not node.attrs.get("transB", 0))
    if node.op_type == "MatMul" and w.ndim == 2:
        return LayerView(node, "matmul", transposed=True)
    if node.op_type == "Conv" and w.ndim >= 3:
        return LayerView(node, "conv", transposed=False, groups=int(node.attrs.get("group", 1)))
    return None


def _conv_geometry(attrs: Mapping, xshape: Sequence[int], kernel: Sequence[int]):
    from dcrt.runtime.ops.nn import resolve_pads
    dims = len(kernel)
    strides = [int(s) for s in attrs.get("strides") or [1] * dims]
    dilations = [int(d) for d in attrs.get("dilations") or [1] * dims]
    pads = resolve_pads(attrs, xshape[2:], kernel, strides, dilations)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    out = [(n + pads[i] + pads[i + dims] - e) // s + 1
           for i, (n, e, s) in enumerate(zip(xshape[2:], extent, strides))]
    return strides, dilations, pads, extent, out


def row_count(view: LayerView, xshape: Sequence[int], wshape: Sequence[int]) -> int:
    """How many input rows (samples x output positions) the layer sees for an input of ``xshape``."""
    if view.kind == "conv":
        *_, out = _conv_geometry(view.node.attrs, xshape, wshape[2:])
        return int(xshape[0]) * int(np.prod(out))
    if view.kind == "gemm":
        return int(xshape[1] if view.node.attrs.get("transA", 0) else xshape[0])
    return int(np.prod(xshape[:-1]))


def layer_rows(view: LayerView, x: np.ndarray, wshape: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """The layer's input rows ``rows`` as ``[groups, len(rows), features]`` (im2col for Conv)."""
    if view.kind == "gemm":
        a = x.T if view.node.attrs.get("transA", 0) else x
        return a[rows][None]
    if view.kind == "matmul":
        return x.reshape(-1, x.shape[-1])[rows][None]
    kernel = [int(k) for k in wshape[2:]]
    strides, dilations, pads, extent, out = _conv_geometry(view.node.attrs, x.shape, kernel)
    dims = len(kernel)
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])
    win = sliding_window_view(x, extent, axis=tuple(range(2, 2 + dims)))   # [N, C, *pos, *extent]
    at = np.unravel_index(rows, [x.shape[0]] + out)
    patches = win[(at[0], slice(None)) + tuple(i * s for i, s in zip(at[1:], strides))]  # [P, C, *extent]
    patches = patches[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilations)]
    cin = x.shape[1] // view.groups
    return np.stack([patches[:, g * cin:(g + 1) * cin].reshape(len(rows), -1) for g in range(view.groups)])


# -- least squares on the centroids ----------------------------------------------------------------


def _as_groups(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[None] if x.ndim == 2 else x


def _by_products(xg, tg, w_g, lab_g, k, gram, rhs) -> None:
    """Normal equations through ``z[row, output, cluster]`` (cheap when ``K`` is small).

    ``z`` sums the inputs that meet the weights of each cluster; ``G += z^T z``: ``rows * outputs * K^2``.
    """
    n = xg.shape[0]
    per_group = lab_g.shape[0]
    kept_per_row = max(1, int(np.count_nonzero(lab_g >= 0)) // max(1, per_group))
    step = max(1, CHUNK_ELEMENTS // (n * max(k, kept_per_row)))
    for r0 in range(0, per_group, step):
        lab = lab_g[r0:r0 + step]
        r = lab.shape[0]
        rows, cols = np.nonzero(lab >= 0)
        if rows.size == 0:
            continue
        keys = rows * k + lab[rows, cols]
        order = np.argsort(keys, kind="stable")
        keys, cols = keys[order], cols[order]
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        z = np.zeros((n, r * k))
        z[:, keys[starts]] = np.add.reduceat(xg[:, cols], starts, axis=1)
        z = z.reshape(n * r, k)
        target = (tg @ w_g[r0:r0 + r].T).reshape(-1)
        gram += z.T @ z
        rhs += z.T @ target


def _by_covariance(xg, tg, w_g, lab_g, k, gram, rhs) -> None:
    """Normal equations through the input covariance ``C = X^T X`` (cheap when ``K`` is large).

    For output ``o`` with kept features ``S`` and labels ``l``: ``G[l_i, l_j] += C[S_i, S_j]`` and
    ``b[l_i] += (X^T X_t w_o)[S_i]``: ``sum_o |S_o|^2`` scattered adds instead of ``K^2`` per row.
    """
    cov = xg.T @ xg
    cross = w_g @ (tg.T @ xg)               # row o: (X^T X_t w_o)^T
    for o in range(lab_g.shape[0]):
        s = np.flatnonzero(lab_g[o] >= 0)
        if s.size == 0:
            continue
        lab = lab_g[o, s]
        keys = (lab[:, None] * k + lab[None, :]).ravel()
        gram += np.bincount(keys, weights=cov[np.ix_(s, s)].ravel(), minlength=k * k).reshape(k, k)
        rhs += np.bincount(lab, weights=cross[o, s], minlength=k)


def normal_equations(x: np.ndarray, weight: np.ndarray, labels: np.ndarray, k: int,
                     x_target: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(G, b)`` of the least squares ``min_c || sum_k c_k X M_k^T - X_t W^T ||^2``.

    ``x``: the layer's inputs ``[rows, features]`` (or ``[groups, rows, features]``; output row
    ``o`` of ``weight`` then belongs to group ``o // (outputs / groups)``); ``weight``: the original
    ``[outputs, features]`` matrix; ``labels``: the cluster of every weight, -1 where pruned;
    ``x_target``: the inputs the original layer sees (default ``x``). Of two equivalent ways to
    form the equations, the one estimated cheaper for this shape is used.
    """
    xs = _as_groups(x)
    xt = xs if x_target is None else _as_groups(x_target)
    groups, n, features = xs.shape
    outputs = weight.shape[0]
    per_group = outputs // groups
    gram = np.zeros((k, k))
    rhs = np.zeros(k)
    kept = np.count_nonzero(labels >= 0, axis=1).astype(np.float64)
    # rough costs in ns: BLAS ~0.1 per multiply-add, a scattered add ~8
    cost_products = 0.1 * n * outputs * k * k + 2.0 * n * kept.sum()
    cost_covariance = 0.2 * groups * n * features * features + 8.0 * float(np.sum(kept ** 2)) \
        + 20000.0 * outputs
    method = _by_products if cost_products <= cost_covariance else _by_covariance
    for g in range(groups):
        method(xs[g], xt[g], np.asarray(weight[g * per_group:(g + 1) * per_group], np.float64),
               labels[g * per_group:(g + 1) * per_group], k, gram, rhs)
    return gram, rhs


def refine_centroids(x: np.ndarray, weight: np.ndarray, labels: np.ndarray, codebook: np.ndarray, *,
                     x_target: Optional[np.ndarray] = None, ridge: float = RIDGE) -> np.ndarray:
    """Centroids minimising the layer's output error for a fixed cluster assignment.

    ``x`` ``[rows, features]`` (or ``[groups, rows, features]``) are the layer's inputs, ``weight``
    ``[outputs, features]`` its original weights (``y = x @ weight.T``), ``labels`` the cluster of
    each weight (-1 where pruned), ``codebook`` the k-means centroids. The target is the original
    output ``x_target @ weight.T`` (``x_target`` defaults to ``x``). A ridge term pulls each centroid
    towards its k-means value, in proportion to how little the data constrains it. Returns float32
    centroids in the order of ``codebook`` (not necessarily sorted any more).
    """
    c0 = np.asarray(codebook, np.float64)
    k = c0.size
    gram, rhs = normal_equations(x, weight, labels, k, x_target)
    scale = float(np.trace(gram)) / max(k, 1)
    if scale <= 0.0:
        return c0.astype(np.float32)
    lam = ridge * scale
    try:
        c = np.linalg.solve(gram + lam * np.eye(k), rhs + lam * c0)
    except np.linalg.LinAlgError:
        c = np.linalg.lstsq(gram + lam * np.eye(k), rhs + lam * c0, rcond=None)[0]
    refined = c.astype(np.float32)
    # a centroid landing exactly on 0 would read as "pruned" in the file: keep k-means' value there
    refined = np.where((refined == 0) | ~np.isfinite(refined), c0.astype(np.float32), refined)
    return refined


def output_error(x: np.ndarray, weight: np.ndarray, approx: np.ndarray,
                 x_target: Optional[np.ndarray] = None) -> float:
    """Relative error ``||x approx^T - x_t weight^T|| / ||x_t weight^T||`` over all groups."""
    xs = _as_groups(x)
    xt = xs if x_target is None else _as_groups(x_target)
    groups = xs.shape[0]
    per = weight.shape[0] // groups
    num = den = 0.0
    for g in range(groups):
        ref = xt[g] @ np.asarray(weight[g * per:(g + 1) * per], np.float64).T
        got = xs[g] @ np.asarray(approx[g * per:(g + 1) * per], np.float64).T
        num += float(np.sum((got - ref) ** 2))
        den += float(np.sum(ref ** 2))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


# -- the calibration pass --------------------------------------------------------------------------


def centroid_count(w: np.ndarray, keep: np.ndarray, plan: LayerPlan) -> int:
    """Centroids ``compress_tensor`` gives a layer: 2^bits, one less when a zero is implied by pruning."""
    pruned = int(np.count_nonzero(keep)) < w.size
    return max(1, (1 << min(plan.bits, 16)) - (1 if pruned else 0))


def saliency_mask(w: np.ndarray, score: np.ndarray, plan: LayerPlan) -> np.ndarray:
    """Keep-mask pruning the plan's fraction of weights with the lowest ``score`` (not magnitude)."""
    if not plan.prune or plan.threshold is not None:
        return prune_mask(w, plan)
    # prune_mask ranks by |value| and always drops exact zeros; hand it the score, zero where w is
    ranked = np.where(w != 0, np.maximum(score, np.finfo(np.float32).tiny), 0.0).astype(np.float32)
    return prune_mask(ranked, plan)


def quantize(w: np.ndarray, plan: LayerPlan, keep: Optional[np.ndarray] = None
             ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], bool]:
    """Prune + k-means as ``compress_tensor`` does: ``(approx, keep, labels or None, exact)``.

    ``labels`` has the shape of ``w`` with -1 at pruned positions; ``exact`` is True when the kept
    values are stored as they are (lossless plan, or few enough distinct values).
    """
    w = np.asarray(w, np.float32)
    keep = prune_mask(w, plan) if keep is None else keep
    lossless = plan.bits >= LOSSLESS_BITS
    k = centroid_count(w, keep, plan)
    exact = lossless or np.unique(w[keep]).size <= k
    shared = share_weights(w[keep], k, lossless)
    if shared is None:
        return w, keep, None, True
    codebook, kept_labels = shared
    approx = np.zeros_like(w)
    approx[keep] = codebook[kept_labels]
    labels = np.full(w.shape, -1, np.int64)
    labels[keep] = kept_labels
    return approx, keep, (labels, codebook), exact


@dataclass
class LayerCalibration:
    """What calibration did to one weight (errors are relative, on the calibration rows)."""

    name: str
    refined: bool
    reason: str = ""                    # why not refined
    error_kmeans: float = float("nan")  # ||y_compressed - y_original|| / ||y_original|| with k-means
    error_refined: float = float("nan")  # ... with the refined centroids
    rows: int = 0


@dataclass
class Calibration:
    """The result of :func:`calibrate`: weights to encode, plans that encode them, per-layer facts.

    ``weights[name]`` already holds the pruned and quantized values, so ``compress_tensor(name,
    weights[name], plans[name])`` stores them exactly (the plan keeps bits and coder, with nothing
    left to prune but the zeros).
    """

    weights: Dict[str, np.ndarray]
    plans: Dict[str, LayerPlan]
    layers: Dict[str, LayerCalibration] = field(default_factory=dict)


def _upstream_weights(graph: Graph, value: str) -> set:
    """The initializers that ``value`` depends on (so a layer fed straight by the input needs no rerun)."""
    producers = graph.producers()
    seen, todo, found = set(), [value], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in graph.initializers:
            found.add(v)
        elif v in producers:
            todo.extend(i for i in producers[v].inputs if i)
    return found


def _order(graph: Graph, names: Sequence[str]) -> List[str]:
    wanted, seen = set(names), []
    for node in graph.nodes:
        for i in node.inputs:
            if i in wanted and i not in seen:
                seen.append(i)
    return seen + sorted(wanted - set(seen))


def calibrate(model: Model, plans: Mapping[str, LayerPlan], data: Union[str, Feeds], *,
              sequential: bool = True, saliency: str = "magnitude", max_samples: int = MAX_SAMPLES,
              max_rows: int = MAX_ROWS, ridge: float = RIDGE, seed: int = 0,
              progress: Optional[Progress] = None) -> Calibration:
    """Prune, cluster and refine every planned weight of ``model`` with calibration ``data``.

    ``model`` is the graph as it will be stored (``passes.simplify`` already applied), ``plans``
    the plan of each weight to compress (``skip`` ones excluded), ``data`` a path (see
    ``accuracy.load_data``) or input arrays. ``saliency``: ``"magnitude"`` (the paper) or
    ``"activation"`` (``|w| * ||x||``). Returns a :class:`Calibration`.
    """
    if saliency not in ("magnitude", "activation"):
        raise ConfigError(f"saliency must be 'magnitude' or 'activation', not {saliency!r}")
    graph = model.graph
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    feeds = feeds_of(data, inputs, max_samples)
    if sample_count(feeds) == 0:
        raise ConfigError("the calibration data holds no samples")
    names = _order(graph, [n for n, p in plans.items() if not p.skip])
    views = {n: layer_view(graph, n) for n in names}
    acts = sorted({v.node.inputs[0] for v in views.values() if v is not None})
    runner = Runner(model, variable=names, extra_outputs=acts)
    upstream = {n: _upstream_weights(graph, v.node.inputs[0]) for n, v in views.items() if v is not None}
    # one batch of every layer input must fit in memory: size the batches from one sample
    probe = runner.run({k: v[:1] for k, v in feeds.items()}, None, acts) if acts else []
    runner.batch_size = int(max(1, min(runner.batch_size, MEMORY // max(1, sum(a.nbytes for a in probe)))))
    count = sample_count(feeds)
    parts = list(batches(feeds, runner.batch_size))

    def sampled(index: int, x: np.ndarray, b: int) -> np.ndarray:
        """The rows of layer ``names[index]`` kept from its input ``x`` on batch ``b`` (the same
        rows whatever the weights upstream, so original and compressed inputs line up)."""
        name = names[index]
        view, wshape = views[name], np.shape(graph.initializers[name])
        total = row_count(view, x.shape, wshape)
        want = -(-max_rows * sample_count(parts[b]) // count)          # this batch's share, rounded up
        rng = np.random.default_rng([seed, index, b])
        rows = np.sort(rng.choice(total, size=min(total, want), replace=False))
        return layer_rows(view, x, wshape, rows).astype(np.float64)

    # the original model's layer inputs: one pass over the data for all layers, kept as sampled rows
    collected: Dict[str, List[np.ndarray]] = {n: [] for n, v in views.items() if v is not None}
    for b, part in enumerate(parts):
        values = dict(zip(acts, runner.run(part, None, acts)))
        for i, name in enumerate(names):
            if name in collected:
                collected[name].append(sampled(i, values[views[name].node.inputs[0]], b))
        del values
    originals = {n: np.concatenate(rows, axis=1) for n, rows in collected.items()}
    del collected
    result = Calibration({}, {})
    current: Dict[str, np.ndarray] = {}        # compressed values of the layers done so far
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        plan, w = plans[name], np.asarray(graph.initializers[name], np.float32)
        view = views[name]
        result.weights[name], result.plans[name] = w, plan      # default: compress as without data
        if view is None:
            current[name] = quantize(w, plan)[0]
            result.layers[name] = LayerCalibration(name, False, "operator not refined (k-means only)")
            continue
        xo = originals[name]
        xc = xo
        if sequential and any(n in current for n in upstream[name]):
            act = view.node.inputs[0]
            xc = np.concatenate([sampled(i, runner.run(part, current, [act])[0], b)
                                 for b, part in enumerate(parts)], axis=1)
        keep = None
        if saliency == "activation":
            norms = np.sqrt(np.sum(xo ** 2, axis=1))                    # [groups, features]
            wm = view.matrix(w)
            per = wm.shape[0] // view.groups
            score = np.abs(wm) * np.repeat(norms, per, axis=0)
            keep = saliency_mask(w, view.weight(score, w.shape), plan)
        approx, keep, clusters, exact = quantize(w, plan, keep)
        if clusters is None or exact:
            current[name] = approx
            if saliency == "activation":          # the data chose the mask: store it as chosen
                result.weights[name], result.plans[name] = approx, replace(plan, sparsity=0.0, threshold=None)
            result.layers[name] = LayerCalibration(name, False, "stored exactly (lossless or few values)")
            continue
        labels, codebook = clusters
        wm, lm = view.matrix(w), view.matrix(labels)
        if xo.shape[1] * wm.shape[0] < MIN_EQUATIONS_PER_CENTROID * codebook.size:
            current[name] = approx
            result.layers[name] = LayerCalibration(
                name, False, f"k-means: {xo.shape[1]} calibration rows x {wm.shape[0]} outputs are too few "
                f"for {codebook.size} centroids (give more samples)", rows=xo.shape[1])
            continue
        refined = refine_centroids(xc, wm, lm, codebook, x_target=xo, ridge=ridge)
        better = np.zeros_like(w)
        better[keep] = refined[labels[keep]]
        err_k = output_error(xc, wm, view.matrix(approx), xo)
        err_r = output_error(xc, wm, view.matrix(better), xo)
        if not err_r <= err_k:          # never worse than k-means on the data it was fitted to
            better, err_r = approx, err_k
        current[name] = better
        result.weights[name] = better
        result.plans[name] = replace(plan, sparsity=0.0, threshold=None, prune=True)
        result.layers[name] = LayerCalibration(name, True, "", err_k, err_r, xo.shape[1])
    if progress:
        progress(len(names), len(names), "")
    return result


def calibrated_weights(model: Model, plans: Mapping[str, LayerPlan], data: Union[str, Feeds],
                       **options) -> Tuple[Dict[str, np.ndarray], Dict[str, LayerPlan]]:
    """``(weights, plans)`` for ``convert``: encode ``weights[name]`` with ``plans[name]``."""
    cal = calibrate(model, plans, data, **options)
    return cal.weights, cal.plans
