"""The graph builder the Keras and Caffe frontends emit their IR nodes and initializers into."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from dcrt.graph import Node


class GraphBuilder:
    """Collects nodes and initializers, giving every value and every node a unique name."""

    def __init__(self) -> None:
        self.nodes: List[Node] = []
        self.inits: Dict[str, np.ndarray] = {}
        self.used: set = set()        # value names (initializers included)
        self.node_names: set = set()

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... if taken: a new value name."""
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        """A new initializer holding ``value`` as ``dtype``; returns its name."""
        name = self.fresh(base)
        self.inits[name] = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        return name

    def node_name(self, base: str) -> str:
        """``base``, or ``base_1``, ... if a node has it already: a new node name."""
        name, i = base, 1
        while name in self.node_names:
            name, i = f"{base}_{i}", i + 1
        self.node_names.add(name)
        return name

    def append(self, op: str, inputs: Sequence[str], outputs: List[str], node_name: str, attrs: Dict[str, Any]) -> None:
        """Add a node; attributes set to None are left out (the operator's default applies)."""
        self.nodes.append(Node(op, list(inputs), outputs, {k: v for k, v in attrs.items() if v is not None},
                               node_name))
