"""Control flow: ``If`` and ``Loop``, whose subgraphs read values of the enclosing graph.

The executor compiles each subgraph attribute into a ``runtime.executor.Subgraph`` and appends the
outer values the subgraphs read (their names in ``attrs["_captures"]``) to the node's inputs, so an
operator here receives: its declared inputs, then the captured values.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dcrt.errors import LimitError

from . import MAX_LOOP_ITERATIONS, bounded, register

Attrs = Dict[str, Any]


def _split(attrs: Attrs, inputs: Tuple[Any, ...]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Separate the declared inputs from the captured outer-scope values."""
    names = attrs.get("_captures", ())
    declared = inputs[:len(inputs) - len(names)] if names else inputs
    return declared, dict(zip(names, inputs[len(declared):]))


@register("If")
def if_(attrs: Attrs, *inputs: Any) -> Tuple[np.ndarray, ...]:
    """Run ``then_branch`` or ``else_branch`` depending on the boolean ``cond``."""
    (cond, *_), outer = _split(attrs, inputs)
    branch = attrs["then_branch"] if bool(np.asarray(cond).reshape(-1)[0]) else attrs["else_branch"]
    return tuple(branch.run(outer))


@register("Loop")
def loop(attrs: Attrs, *inputs: Any) -> Tuple[np.ndarray, ...]:
    """Run ``body`` while the trip count and the condition allow.

    The body maps ``(iteration, cond, *carried)`` to ``(cond, *carried, *scanned)``; the outputs are
    the final carried values, then each scanned output stacked over the iterations.
    """
    declared, outer = _split(attrs, inputs)
    trip, cond, *carried = declared
    body = attrs["body"]
    names = [v.name for v in body.graph.inputs]
    limit = None if trip is None else int(np.asarray(trip).reshape(-1)[0])
    keep_going = True if cond is None else bool(np.asarray(cond).reshape(-1)[0])
    scanned: List[List[np.ndarray]] = []
    scanned_bytes = 0
    i = 0
    while keep_going and (limit is None or i < limit):
        if i == MAX_LOOP_ITERATIONS:
            raise LimitError(f"the loop is still running after {i} iterations, the runtime's limit "
                             f"(trip count {limit}): the model is malformed, or set "
                             f"DCRT_MAX_LOOP_ITERATIONS if it really loops that long")
        feeds = {names[0]: np.asarray(i, dtype=np.int64)}
        if len(names) > 1 and names[1]:
            feeds[names[1]] = np.asarray(keep_going)
        feeds.update(zip(names[2:], carried))
        results = body.run(outer, feeds)
        keep_going = bool(np.asarray(results[0]).reshape(-1)[0])
        carried = results[1:1 + len(carried)]
        extra = results[1 + len(carried):]
        if not scanned:
            scanned = [[] for _ in extra]
        for bucket, value in zip(scanned, extra):
            bucket.append(value)
        scanned_bytes += sum(np.asarray(v).nbytes for v in extra)
        bounded([scanned_bytes], 1)    # the scan outputs are stacked into single arrays at the end
        i += 1
    stacked: List[Optional[np.ndarray]] = [np.stack(b) if b else None for b in scanned]
    n_scan = len(body.graph.outputs) - 1 - len(carried)
    if not scanned and n_scan > 0:  # zero iterations: empty scan outputs, as the body declares them
        stacked = [np.zeros((0,) + _declared_shape(v), v.dtype) for v in body.graph.outputs[1 + len(carried):]]
    return tuple(carried) + tuple(stacked)


def _declared_shape(v: Any) -> Tuple[int, ...]:
    """A value's declared shape when every dimension is a number, else ``()`` (unknown)."""
    shape = v.shape or ()
    return tuple(shape) if all(isinstance(d, int) for d in shape) else ()
