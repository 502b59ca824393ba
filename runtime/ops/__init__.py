"""The operator table: one small function per ONNX operator, registered under its ONNX name.

An operator function has the signature ``fn(attrs, *inputs)``:

* ``attrs`` is the node's attribute dict (plain Python values, ``np.ndarray`` for TENSOR attributes)
  plus keys the executor adds, all starting with ``_``: ``_opset`` (the model's default-domain
  opset, for operators whose semantics changed between versions) and ``_nout`` (how many outputs
  the node declares). For control-flow operators the subgraph attributes hold compiled
  ``executor.Subgraph`` objects and ``_captures`` names the outer values appended to the inputs
  (see ``control.py``).
* ``inputs`` are the node's inputs in ONNX order: ``np.ndarray``, or ``None`` for an omitted optional
  input. Inputs listed in the operator's ``weights`` positions may instead be *indexed weights*
  (codebook + indices); such an operator touches them only through ``runtime/kernels.py``.

It returns one ``np.ndarray`` or a tuple of them (one per ONNX output; trailing optional outputs may
be left out or be ``None``).

Adding an operator touches one module of this package and its test.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, FrozenSet, Iterable, List

import numpy as np

from dcrt.errors import LimitError

OpFn = Callable[..., Any]

#: The largest array an operator creates, in bytes (``DCRT_MAX_TENSOR_BYTES``, default 1 GiB). A
#: broken or hostile model (a Conv padded by 2**24, a Tile by 10**9, a broadcast of two long vectors)
#: gets a LimitError naming the node before anything is allocated, not an exhausted device.
MAX_TENSOR_BYTES = int(os.environ.get("DCRT_MAX_TENSOR_BYTES", str(1 << 30)))
#: The most iterations one ``Loop`` runs (``DCRT_MAX_LOOP_ITERATIONS``, default 2**20): a loop whose
#: condition never turns false, or whose trip count is 2**62, is a LimitError, not a hung app.
MAX_LOOP_ITERATIONS = int(os.environ.get("DCRT_MAX_LOOP_ITERATIONS", str(1 << 20)))

#: ONNX operator name -> implementation.
OPS: Dict[str, OpFn] = {}
#: ONNX operator name -> input positions that may hold an indexed (compressed) weight.
WEIGHT_INPUTS: Dict[str, FrozenSet[int]] = {}

#: Domains whose operators this table implements (the ONNX default domain).
DEFAULT_DOMAINS = ("", "ai.onnx")


def bounded(shape: Iterable[Any], itemsize: int = 4) -> List[int]:
    """``shape`` as ints, once an array of that shape and item size is known to fit the limit."""
    dims = [int(d) for d in shape]
    size = math.prod(max(d, 0) for d in dims) * itemsize
    if size > MAX_TENSOR_BYTES:
        raise LimitError(f"it would create an array of shape {dims} ({size / 2**30:.3g} GiB), over the "
                         f"runtime's limit of {MAX_TENSOR_BYTES / 2**30:.3g} GiB per array: the model "
                         f"or its inputs are malformed, or set DCRT_MAX_TENSOR_BYTES if the device has "
                         f"the memory")
    return dims


def bounded_broadcast(*arrays: Any) -> None:
    """Check the broadcast of ``arrays`` fits the limit (the precise shape only when it may not)."""
    shaped = [a for a in arrays if hasattr(a, "shape")]
    if all(a.shape == shaped[0].shape for a in shaped):
        return
    if math.prod(a.size for a in shaped) * 8 > MAX_TENSOR_BYTES:
        bounded(np.broadcast_shapes(*(a.shape for a in shaped)), max(a.itemsize for a in shaped))


def register(*names: str, weights: tuple = ()) -> Callable[[OpFn], OpFn]:
    """Register the decorated function under each ONNX operator name in ``names``.

    ``weights`` lists the input positions that may be indexed weights (the function must then use
    only ``kernels`` on them).
    """

    def decorate(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
            if weights:
                WEIGHT_INPUTS[name] = frozenset(weights)
        return fn

    return decorate


def op_key(op_type: str, domain: str = "") -> str:
    """The name an operator is reported under: ``Conv`` or ``com.microsoft.FusedConv``."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}.{op_type}"


def supported(graph: Any) -> List[str]:
    """Return the sorted operator types of ``graph`` (subgraphs included) the runtime lacks.

    An empty list means the whole graph can run. Operators outside the default ONNX domain are
    reported as ``domain.OpType``.
    """
    missing: set = set()

    def walk(g: Any) -> None:
        for node in g.nodes:
            if node.domain not in DEFAULT_DOMAINS or node.op_type not in OPS:
                missing.add(op_key(node.op_type, node.domain))
            for value in node.attrs.values():
                for sub in value if isinstance(value, list) else [value]:
                    if hasattr(sub, "nodes") and hasattr(sub, "initializers"):
                        walk(sub)

    walk(graph)
    return sorted(missing)


#: A clearer name for the same question.
unsupported = supported

# Importing the modules fills the table.
from . import control, elementwise, nn, quant, rnn, tensor, vision  # noqa: E402,F401
