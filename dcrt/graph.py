"""The in-memory graph every frontend produces and the runtime executes.

One intermediate representation with ONNX operator semantics (names, attributes, NCHW layout,
broadcasting) and the opset recorded. It is plain Python so the runtime needs nothing but numpy to
hold it; the ``.dcm`` reader and writer (``dcrt.format``) translate it to and from FlatBuffers.

Attribute values are Python values: ``int``, ``float``, ``str``, ``bytes``, ``list[int]``,
``list[float]``, ``list[str]``, ``numpy.ndarray`` (a TENSOR attribute) or ``Graph`` (a subgraph,
e.g. the branches of ``If``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

Dim = Union[int, str, None]  # a fixed size, a symbolic name (dynamic), or unknown


@dataclass
class ValueInfo:
    """A graph input or output: its name, element type and (possibly dynamic) shape."""

    name: str
    dtype: np.dtype
    shape: Optional[List[Dim]] = None  # None: rank unknown

    def __post_init__(self) -> None:
        self.dtype = np.dtype(self.dtype)


@dataclass
class Node:
    """One operator application, with ONNX semantics (``op_type`` is the ONNX operator name)."""

    op_type: str
    inputs: List[str]
    outputs: List[str]
    attrs: Dict[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""


@dataclass
class Graph:
    """A computation graph. ``initializers`` maps a name to its value.

    In the converter the values are ``numpy.ndarray``; a graph read from a ``.dcm`` holds lazy tensor
    handles (``dcrt.format.reader.StoredTensor``) instead, decoded only when the runtime needs them.
    An empty string in ``Node.inputs`` means an omitted optional input, as in ONNX.
    """

    nodes: List[Node]
    inputs: List[ValueInfo]
    outputs: List[ValueInfo]
    initializers: Dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def consumers(self) -> Dict[str, List[Node]]:
        """Map from a value name to the nodes that read it (subgraph reads not included)."""
        users: Dict[str, List[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        return users

    def producers(self) -> Dict[str, Node]:
        """Map from a value name to the node that writes it."""
        return {out: node for node in self.nodes for out in node.outputs if out}


def subgraphs(node: Node) -> List[Tuple[str, Graph]]:
    """The ``(attribute name, subgraph)`` pairs held by ``node``."""
    found = []
    for key, value in node.attrs.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Graph):
                found.append((key, item))
    return found


def all_nodes(graph: Graph) -> Iterator[Node]:
    """The nodes of ``graph`` and of its subgraphs, nested ones too."""
    for node in graph.nodes:
        yield node
        for _, sub in subgraphs(node):
            yield from all_nodes(sub)


def all_initializers(graph: Graph) -> Dict[str, Any]:
    """The initializers of ``graph`` and of its subgraphs (an If branch's weights), by name; one of a
    subgraph whose name an other already has is listed as ``"name (in <subgraph>)"``."""
    found = dict(graph.initializers)
    for node in all_nodes(graph):
        for _, sub in subgraphs(node):
            for name, value in sub.initializers.items():
                key = name
                while key in found and found[key] is not value:
                    key = f"{key} (in {sub.name or node.name or node.op_type})"
                found[key] = value
    return found


def free_names(graph: Graph) -> Set[str]:
    """Names ``graph`` (and its nested subgraphs) reads without defining them: its outer-scope reads."""
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    defined |= {out for node in graph.nodes for out in node.outputs if out}
    used: Set[str] = set()
    for node in graph.nodes:
        used.update(name for name in node.inputs if name)
        for _, sub in subgraphs(node):
            used |= free_names(sub)
    used.update(v.name for v in graph.outputs)
    return used - defined


def reads(node: Node) -> List[str]:
    """Every name ``node`` reads: its inputs, then (sorted) what its subgraphs read from outside."""
    return [n for n in node.inputs if n] + sorted({n for _, sub in subgraphs(node) for n in free_names(sub)})


def topological_order(deps: Sequence[Set[int]]) -> Tuple[List[int], List[int]]:
    """Kahn's sort of nodes given the indices each depends on: ``(order, stuck)``.

    ``stuck`` lists the nodes that can never run (on a cycle, or after one), empty for a DAG.
    Iterative, so a cyclic graph cannot hang or recurse it; ready nodes are taken first come first
    served, so a graph already in order keeps it.
    """
    users: Dict[int, List[int]] = {}
    for i, needed in enumerate(deps):
        for j in needed:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order: List[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in users.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    return order, [i for i, w in enumerate(waiting) if w > 0]


@dataclass
class Model:
    """A graph plus what is needed to interpret it: opsets and free-form metadata."""

    graph: Graph
    opsets: Dict[str, int] = field(default_factory=lambda: {"": 17})
    metadata: Dict[str, str] = field(default_factory=dict)
    producer: str = ""
