"""The in-memory graph every frontend produces and the runtime executes.

One intermediate representation with ONNX operator semantics (names, attributes, NCHW layout,
broadcasting) and the opset recorded. It is plain Python so the runtime needs nothing but numpy to
hold it; the ``.dcm`` reader and writer (``dcrt.format``) translate it to and from FlatBuffers.

Attribute values are Python values: ``int``, ``float``, ``str``, ``bytes``, ``list[int]``,
``list[float]``, ``list[str]``, ``numpy.ndarray`` (a TENSOR attribute) or ``Graph`` (a subgraph,
e.g. the branches of ``If``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

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


@dataclass
class Model:
    """A graph plus what is needed to interpret it: opsets and free-form metadata."""

    graph: Graph
    opsets: Dict[str, int] = field(default_factory=lambda: {"": 17})
    metadata: Dict[str, str] = field(default_factory=dict)
    producer: str = ""
