"""Graph clean-up before compression: fold BatchNorm into the layer before it, drop Dropout/Identity;
and the structural checks every source model passes first (``check_graph``, ``check_shape``).

Folding matters for compression, not only speed: the BN scale is multiplied into the weights before
they are clustered, so the codebook describes the weights actually used at inference.
"""
from __future__ import annotations

import math
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set

import numpy as np

from dcrt.errors import ConversionError
from dcrt.graph import Graph, Node, reads, subgraphs, topological_order


def simplify(graph: Graph) -> Graph:
    """Apply every pass in order; returns the same (mutated) graph."""
    fold_batchnorm(graph)
    drop_identities(graph)
    return graph


def _rename_input(graph: Graph, old: str, new: str) -> None:
    for node in graph.nodes:
        node.inputs = [new if i == old else i for i in node.inputs]
        for _, sub in subgraphs(node):  # subgraphs may read outer-scope names, unless they define their own
            if old not in _defined(sub):
                _rename_input(sub, old, new)


def _defined(graph: Graph) -> Set[str]:
    """The names ``graph`` itself gives values to: its inputs, initializers and node outputs."""
    return {v.name for v in graph.inputs} | set(graph.initializers) | {o for n in graph.nodes for o in n.outputs}


def _all_names(graph: Graph) -> Set[str]:
    """Every value name of ``graph`` and its subgraphs (read, defined or output)."""
    names = _defined(graph) | {v.name for v in graph.outputs}
    for node in graph.nodes:
        names.update(node.inputs)
        for _, sub in subgraphs(node):
            names |= _all_names(sub)
    return names


def _shadowed(graph: Graph, old: str, new: str) -> bool:
    """Whether renaming reads of ``old`` to ``new`` would reach a subgraph that reads ``old`` from
    outside but has a value named ``new`` of its own (which the renamed reads would then take)."""
    for node in graph.nodes:
        for _, sub in subgraphs(node):
            if old not in _defined(sub) and (any(old in n.inputs for n in sub.nodes) and new in _defined(sub)
                                              or _shadowed(sub, old, new)):
                return True
    return False


def _used_in_subgraph(graph: Graph, name: str) -> bool:
    return any(any(name in n.inputs for n in sub.nodes) or _used_in_subgraph(sub, name)
               for node in graph.nodes for _, sub in subgraphs(node))


def _free_name(taken, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... if it is taken."""
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def drop_identities(graph: Graph) -> None:
    """Remove Identity and inference-time Dropout nodes whose output is not a graph output."""
    outputs = {o.name for o in graph.outputs}
    kept: List[Node] = []
    for node in graph.nodes:
        removable = (node.op_type in ("Identity", "Dropout") and not node.domain
                     and node.inputs and node.inputs[0]
                     and node.outputs[0] not in outputs
                     and all(not o for o in node.outputs[1:]))
        if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2]:
            removable = False  # training_mode given as an input: leave it to the runtime
        if removable and _shadowed(graph, node.outputs[0], node.inputs[0]):
            removable = False
        if removable:
            _rename_input(graph, node.outputs[0], node.inputs[0])
        else:
            kept.append(node)
    graph.nodes = kept


def fold_batchnorm(graph: Graph) -> None:
    """Fold ``BatchNormalization`` into a preceding Conv / ConvTranspose (group 1) / Gemm.

    Only when the layer's weights are initializers read by that layer alone (no other node, subgraph
    or graph output), the BatchNormalization's parameters are per channel ``[C]`` (not opset 7's
    ``spatial=0``), and the layer's output feeds the BatchNormalization alone.
    """
    inits = graph.initializers
    consumers = graph.consumers()
    producers = graph.producers()
    outputs = {o.name for o in graph.outputs}
    weight_users: Dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            weight_users[name] = weight_users.get(name, 0) + 1
    removed = set()

    def read_once(name: str) -> bool:
        return weight_users.get(name, 0) == 1 and name not in outputs and not _used_in_subgraph(graph, name)
    for bn in graph.nodes:
        if bn.op_type != "BatchNormalization" or bn.domain or len([o for o in bn.outputs if o]) != 1:
            continue
        if bn.attrs.get("training_mode", 0) or not all(i in inits for i in bn.inputs[1:5]):
            continue
        layer = producers.get(bn.inputs[0])
        if layer is None or layer.op_type not in ("Conv", "ConvTranspose", "Gemm") or layer.domain:
            continue
        x = bn.inputs[0]
        if len(consumers.get(x, [])) != 1 or x in outputs or _used_in_subgraph(graph, x):
            continue
        weights = layer.inputs[1] if len(layer.inputs) > 1 else ""
        bias = layer.inputs[2] if len(layer.inputs) > 2 else ""
        if weights not in inits or not read_once(weights) or (bias and (bias not in inits or not read_once(bias))):
            continue
        scale, beta, mean, var = (inits[n].astype(np.float64) for n in bn.inputs[1:5])
        channels = inits[weights].shape[1 if layer.op_type == "ConvTranspose" else 0]
        if layer.op_type == "Gemm":
            channels = inits[weights].shape[0 if layer.attrs.get("transB", 0) else -1]
        if any(p.shape != (channels,) for p in (scale, beta, mean, var)):
            continue
        eps = float(bn.attrs.get("epsilon", 1e-5))
        factor = scale / np.sqrt(var + eps)
        w = inits[weights].astype(np.float64)
        if layer.op_type == "Conv":
            w = w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
            b = inits[bias].astype(np.float64) if bias else np.zeros(w.shape[0])
        elif layer.op_type == "ConvTranspose":
            if layer.attrs.get("group", 1) != 1:
                continue
            w = w * factor.reshape((1, -1) + (1,) * (w.ndim - 2))
            b = inits[bias].astype(np.float64) if bias else np.zeros(w.shape[1])
        else:  # Gemm: y = alpha * A @ B' + beta * C, BN per output column
            if layer.attrs.get("transA", 0) or w.ndim != 2:
                continue
            alpha, beta_c = float(layer.attrs.get("alpha", 1.0)), float(layer.attrs.get("beta", 1.0))
            trans_b = layer.attrs.get("transB", 0)
            w = alpha * (w * factor[:, None] if trans_b else w * factor[None, :])
            c = inits[bias].astype(np.float64) if bias else np.zeros(1)
            if c.ndim > 1 and c.shape[0] != 1:
                continue
            b = beta_c * np.broadcast_to(c.reshape(-1), factor.shape)
            layer.attrs["alpha"], layer.attrs["beta"] = 1.0, 1.0
        b = (b - mean) * factor + beta
        dtype = inits[weights].dtype
        inits[weights] = w.astype(dtype)
        # a new name: no value of the graph or its subgraphs (an input, a node's output) may have it
        bias_name = bias or _free_name(set(inits) | _all_names(graph), weights[:-len("weight")] + "bias"
                                       if weights.endswith(".weight") else f"{weights}.bias")
        inits[bias_name] = b.astype(dtype)
        layer.inputs = [layer.inputs[0], weights, bias_name]
        layer.outputs = [bn.outputs[0]]
        removed.add(id(bn))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    used = {i for n in graph.nodes for i in n.inputs} | outputs
    for n in list(inits):
        if n not in used and not _used_in_subgraph(graph, n):
            del inits[n]


# ---------------------------------------------------------------------------------------------------
# checks: a hostile or damaged source file must fail here with a clear message, not in the runtime
# ---------------------------------------------------------------------------------------------------

#: Values a model input or output may hold (per call): 2**31 float32 values are 8 GB, beyond any
#: device dcrt targets; a larger fixed shape is a damaged file, refused before anything is allocated.
MAX_VALUES = 2 ** 31


def check_shape(shape: Optional[Sequence[Any]], what: str) -> None:
    """Refuse a negative or absurdly large fixed dimension in ``shape`` (symbolic / None dims pass)."""
    dims = [d for d in (shape or []) if isinstance(d, (int, np.integer)) and not isinstance(d, bool)]
    if any(d < 0 for d in dims):
        raise ConversionError(f"{what} has shape {list(shape)}: a negative dimension; sizes are >= 0 "
                              "(a free size is a named or unknown dimension): the file is damaged")
    if math.prod(int(d) for d in dims) > MAX_VALUES:
        raise ConversionError(f"{what} has shape {list(shape)}, over 2**31 values: more than dcrt handles "
                              "and more than any edge device holds; the shape is damaged")


def _label(node: Node) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"{node.op_type} node writing {node.outputs!r}"


def check_graph(graph: Graph, where: str, outer: Optional[FrozenSet[str]] = None) -> None:
    """Refuse a graph the runtime could not run: a value written twice, a read of a value nothing
    defines (a dangling name), a cycle, no outputs, or absurd input / output shapes.

    Nodes need not be in topological order (the runtime sorts them). The order check is Kahn's,
    iterative, so a cyclic graph cannot hang it; only subgraphs recurse, as deep as protobuf parses.
    """
    fix = "the model is damaged or incomplete: export it again"
    own = {v.name for v in graph.inputs} | set(graph.initializers)
    given = own | (outer or set())
    producer: Dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for out in filter(None, node.outputs):
            if out in producer:
                raise ConversionError(f"{where}: value {out!r} is written by two nodes, "
                                      f"{_label(graph.nodes[producer[out]])} and {_label(node)}; {fix}")
            if out in own:
                raise ConversionError(f"{where}: {_label(node)} writes {out!r}, which is also a graph input or "
                                      f"initializer; {fix}")
            producer[out] = i
    deps: List[Set[int]] = []
    for node in graph.nodes:
        names = reads(node)
        for name in names:
            if name not in producer and name not in given:
                raise ConversionError(f"{where}: {_label(node)} reads {name!r}, which no node, graph input or "
                                      f"initializer defines (a dangling name, e.g. a missing initializer); {fix}")
        deps.append({producer[n] for n in names if n in producer})
    visible = frozenset(given | set(producer))
    for node in graph.nodes:
        for _, sub in subgraphs(node):
            check_graph(sub, f"{where}: a subgraph of {_label(node)}", visible)
    stuck = [_label(graph.nodes[i]) for i in topological_order(deps)[1]]
    if stuck:
        raise ConversionError(f"{where}: the graph has a cycle (a value depends on itself) through "
                              f"{', '.join(stuck[:5])}{' ...' if len(stuck) > 5 else ''}; {fix}")
    if outer is not None:
        return  # a subgraph's own inputs and outputs are the enclosing node's business
    if not graph.outputs:
        raise ConversionError(f"{where}: the graph declares no outputs, so there is nothing to compute; {fix}")
    for v in graph.outputs:
        if v.name not in producer and v.name not in given:
            raise ConversionError(f"{where}: graph output {v.name!r} is not written by any node, nor a graph "
                                  f"input or initializer; {fix}")
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for v in values:
            check_shape(v.shape, f"{where}: {kind} {v.name!r}")
