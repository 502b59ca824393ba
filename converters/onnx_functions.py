"""ONNX operators defined as functions, expanded at conversion.

ONNX defines some operators by a *function body* of other operators (Attention, RotaryEmbedding,
AffineGrid, the window operators, ...). A node whose operator the runtime has no kernel for, but whose
schema has such a body at the model's opset, is replaced by that body here, so the ``.dcm`` holds only
operators the runtime implements. The body comes from onnx's own schema (for context-dependent
functions, built for the node's attributes and input types); its values and nodes get names no name
of the model starts with, attribute references take the node's attributes (or the schema's
defaults), and bodies that use function operators again are expanded in turn, level by level, with
the value types of each level inferred for the next (a context-dependent body needs them).
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Tuple

import onnx
from onnx import defs

#: How deep bodies that use function operators may nest (ONNX's own bodies go one or two deep).
MAX_DEPTH = 8
_MERGE_DOMAINS = {"ai.onnx": ""}


def expand_functions(model: onnx.ModelProto, implemented: Callable[[str, str], bool]) -> onnx.ModelProto:
    """``model`` with every node ``implemented(domain, op_type)`` rejects and the schema defines as a
    function replaced by its body (subgraphs included); the model itself when there is none."""
    opsets = {_MERGE_DOMAINS.get(o.domain, o.domain): int(o.version) for o in model.opset_import}

    def runs(node: onnx.NodeProto) -> bool:
        return implemented(_MERGE_DOMAINS.get(node.domain, node.domain), node.op_type)

    def wanted(node: onnx.NodeProto) -> bool:
        return not runs(node) and _schema(node, opsets) is not None

    if not any(wanted(n) for n in _all_nodes(model.graph)):
        return model
    expanded = onnx.ModelProto()
    expanded.CopyFrom(model)
    types = _value_types(expanded)
    taken = _all_names(expanded.graph)     # a body's names must not meet the model's: prefixes are checked
    counter = itertools.count()
    used: Dict[str, int] = {}

    def prefix(op_type: str) -> str:
        while True:
            candidate = f"__{op_type}{next(counter)}__"
            if not any(name.startswith(candidate) for name in taken):
                return candidate

    def flatten(node: onnx.NodeProto) -> Optional[List[onnx.NodeProto]]:
        """The function node as implemented operators only, its body expanded level by level (each
        level's value types inferred for the next, which a context-dependent body needs), or None if it
        cannot be: then it stays, and conversion names it as the operator the runtime lacks."""
        nodes = [node]
        for _ in range(MAX_DEPTH):
            if not any(wanted(n) for n in nodes):
                break
            known = _mini_types(nodes, types, expanded.opset_import, used)
            level: List[onnx.NodeProto] = []
            for n in nodes:
                if not wanted(n):
                    level.append(n)
                    continue
                found = _body(n, opsets, known)
                if found is None:
                    return None
                body, n = found
                for domain in body.opset_import:
                    key = _MERGE_DOMAINS.get(domain.domain, domain.domain)
                    used[key] = max(used.get(key, 0), int(domain.version))
                level.extend(_inline(n, body, prefix(n.op_type)))
            nodes = level
        for n in nodes:         # a branch inside a body may hold function operators too
            for attr in n.attribute:
                for sub in _graphs(attr):
                    expand(sub)
        inner = (m for n in nodes for attr in n.attribute for sub in _graphs(attr) for m in _all_nodes(sub))
        return nodes if all(runs(n) for n in nodes) and all(runs(m) for m in inner) else None

    def expand(graph: onnx.GraphProto) -> None:
        out: List[onnx.NodeProto] = []
        for node in graph.node:
            for attr in node.attribute:
                for sub in _graphs(attr):
                    expand(sub)
            out.extend((flatten(node) or [node]) if wanted(node) else [node])
        del graph.node[:]
        graph.node.extend(out)

    expand(expanded.graph)
    for domain, version in used.items():   # a domain the model did not import: the body's version
        if domain not in opsets:
            expanded.opset_import.add(domain=domain, version=version)
    return expanded


def _graphs(attr: onnx.AttributeProto) -> List[onnx.GraphProto]:
    return [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in _graphs(attr):
                yield from _all_nodes(sub)


def _schema(node: onnx.NodeProto, opsets: Dict[str, int]) -> Optional[defs.OpSchema]:
    """The node's schema at the model's opset, when it defines a function body there."""
    domain = _MERGE_DOMAINS.get(node.domain, node.domain)
    if domain not in opsets:
        return None
    try:
        schema = defs.get_schema(node.op_type, max_inclusive_version=opsets[domain], domain=domain)
    except defs.SchemaError:
        return None
    return schema if (schema.has_function or schema.has_context_dependent_function) else None


def _body(node: onnx.NodeProto, opsets: Dict[str, int],
          types: Dict[str, onnx.TypeProto]) -> Optional[Tuple[onnx.FunctionProto, onnx.NodeProto]]:
    """The function body for this node and a copy of the node with the schema's defaults for the
    attributes it leaves out (what the body's references read), or None when onnx cannot build the
    body (a context-dependent body whose input types are unknown, say)."""
    schema = _schema(node, opsets)
    opset = opsets[_MERGE_DOMAINS.get(node.domain, node.domain)]
    completed = onnx.NodeProto()
    completed.CopyFrom(node)
    given = {a.name for a in node.attribute}
    for name, attr in schema.attributes.items():
        if name not in given and attr.default_value.name:
            completed.attribute.append(attr.default_value)
    node = completed
    try:
        if schema.has_function:
            version = max(v for v in schema.function_opset_versions if v <= opset)
            data = schema.get_function_with_opset_version(version)
        else:
            version = max(v for v in schema.context_dependent_function_opset_versions if v <= opset)
            inputs = [types.get(name, onnx.TypeProto()).SerializeToString() for name in node.input]
            data = schema.get_context_dependent_function_with_opset_version(version, node.SerializeToString(),
                                                                            inputs)
    except Exception:       # no body at this opset, or onnx could not build it: the node stays
        return None
    body = onnx.FunctionProto()
    body.ParseFromString(data)
    return (body, node) if body.node else None


def _inline(node: onnx.NodeProto, body: onnx.FunctionProto, prefix: str) -> List[onnx.NodeProto]:
    """The body's nodes with the node's inputs, outputs and attributes put in, other values renamed."""
    names = {"": ""}
    names.update(zip(body.input, list(node.input) + [""] * (len(body.input) - len(node.input))))
    names.update((o, node.output[i] if i < len(node.output) and node.output[i] else prefix + o)
                 for i, o in enumerate(body.output))
    attrs = {a.name: a for a in node.attribute}

    index = itertools.count()

    def rename(name: str) -> str:
        return names.get(name, prefix + name)

    def put(b: onnx.NodeProto) -> onnx.NodeProto:
        n = onnx.NodeProto()
        n.CopyFrom(b)
        n.name = f"{prefix}{next(index)}_{b.name or b.op_type}"     # unique: onnxruntime checks
        n.input[:] = [rename(x) for x in b.input]
        n.output[:] = [rename(x) for x in b.output]
        del n.attribute[:]
        for a in b.attribute:
            if a.ref_attr_name:     # an attribute of the function: the node's value, absent if it has none
                if a.ref_attr_name in attrs:
                    ref = n.attribute.add()
                    ref.CopyFrom(attrs[a.ref_attr_name])
                    ref.name = a.name
                continue
            copy = n.attribute.add()
            copy.CopyFrom(a)
            # a branch or loop body reads the function's values by name: renamed alike, its own too
            for sub in _graphs(copy):
                for v in list(sub.input) + list(sub.output) + list(sub.value_info):
                    v.name = rename(v.name)
                for t in sub.initializer:
                    t.name = rename(t.name)
                nodes = [put(x) for x in sub.node]
                del sub.node[:]
                sub.node.extend(nodes)
        return n

    return [put(b) for b in body.node]


def _all_names(graph: onnx.GraphProto) -> set:
    """Every value and node name of the graph and its subgraphs."""
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for attr in node.attribute:
            for sub in _graphs(attr):
                names |= _all_names(sub)
    return names


def _mini_types(nodes: List[onnx.NodeProto], types: Dict[str, onnx.TypeProto], opset_import,
                used: Dict[str, int]) -> Dict[str, onnx.TypeProto]:
    """``types`` with those onnx infers for the values of ``nodes`` (a partly expanded function node),
    run as a model of their own whose inputs are what they read from outside."""
    made = {o for n in nodes for o in n.output}
    outside = [x for n in nodes for x in n.input if x and x not in made]
    graph = onnx.helper.make_graph(
        nodes, "body", [onnx.helper.make_value_info(x, types.get(x, onnx.TypeProto())) for x in dict.fromkeys(outside)],
        [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in made if o])
    opsets = {o.domain: o.version for o in opset_import}
    opsets.update((d, v) for d, v in used.items() if d not in opsets)
    mini = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    return {**types, **_value_types(mini)}


def _value_types(model: onnx.ModelProto) -> Dict[str, onnx.TypeProto]:
    """Types of the model's values (declared, and inferred by onnx where it can)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:       # a model onnx cannot infer: the declared types only
        inferred = model
    types: Dict[str, onnx.TypeProto] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for v in list(graph.input) + list(graph.value_info) + list(graph.output):
            if v.type.WhichOneof("value") is not None:
                types.setdefault(v.name, v.type)
        for t in graph.initializer:
            types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
        for node in graph.node:
            for attr in node.attribute:
                for sub in _graphs(attr):
                    collect(sub)

    collect(inferred.graph)
    return types
