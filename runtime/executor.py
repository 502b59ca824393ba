"""The graph executor: runs a ``dcrt.graph.Graph`` node by node with the operator table.

Everything that does not depend on the inputs is done once, at construction: the support check (all
missing operators reported at once), the topological order, and for every value the step after which
nothing reads it any more, so that ``run`` frees each intermediate array as early as possible and
the peak memory is that of the live values, not of the whole graph.

Passes merge steps: a Conv into the residual Add that alone reads its output (``_residuals``), an
activation into the node that produces its input (``_fuse``), and a chain of dense layers, each
reading only the last one's output, into one step (``_chain``), which saves the Python between the
layers.

``run`` keeps all of its state in local variables, so one ``Executor`` serves many threads at once.
Given ``times``, it runs a copy of the plan whose steps add their seconds to it (``Session.profile``):
the usual path pays nothing for profiling. That plan keeps the dense layers apart, one node a step.
Initializers are never assumed to be ``np.ndarray``: the ``weights`` callable given to ``run``
returns whatever the model holds (an array or an indexed weight), handed unchanged to the operator
inputs that accept weights, and expanded with ``kernels.dense`` for any other input.
"""
from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from dcrt.errors import DcrtError, FormatError, InputError, LimitError, UnsupportedOperatorError
from dcrt.graph import Graph, Node, free_names, reads, subgraphs, topological_order

from . import kernels
from .ops import OPS, WEIGHT_INPUTS, nn, supported

WeightSource = Callable[[str], Any]
#: How the run in progress (this thread's, this task's) holds a subgraph's own initializer (an If
#: branch's weight, as stored): a session sets it so that it decodes and keeps those as it does the
#: graph's, once and in its mode, instead of each run decoding them anew. By the stored tensor, not
#: its name: two branches may each have their own weight of the same name.
HOLD: ContextVar[Optional[Callable[[Any], Any]]] = ContextVar("dcrt_hold", default=None)


@dataclass(frozen=True)
class _Step:
    """One node, ready to run: its function, prepared attributes and value bookkeeping."""

    node: Node
    fn: Callable[..., Any]
    attrs: Dict[str, Any]
    inputs: Tuple[str, ...]  # declared inputs ("" = omitted), then captured outer-scope names
    raw: FrozenSet[int]  # input positions passed as they are (weights, captures)
    outputs: Tuple[str, ...]
    fused: str = ""  # the op type of an activation merged into this step (see Executor._fuse)
    reads: Tuple[Tuple[str, bool], ...] = field(init=False)  # (name, raw) per input: see _inputs
    fetch: Callable[[Mapping[str, Any]], Tuple[Any, ...]] = field(init=False)  # env -> the inputs
    single: str = field(init=False)  # the output's name when the step has one, else ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", tuple((name, i in self.raw) for i, name in enumerate(self.inputs)))
        object.__setattr__(self, "fetch", _getter(self.inputs))
        object.__setattr__(self, "single", self.outputs[0] if len(self.outputs) == 1 else "")


def _getter(names: Tuple[str, ...]) -> Callable[[Mapping[str, Any]], Tuple[Any, ...]]:
    """``env -> tuple(env[n] for n in names)`` in one C call (``operator.itemgetter``); an omitted
    input ("") reads the None that ``Executor.run`` keeps under that name."""
    if len(names) > 1:
        return itemgetter(*names)
    if names:
        name = names[0]
        return lambda env: (env[name],)
    return lambda env: ()


@dataclass(frozen=True)
class _Plan:
    """The steps needed for a set of requested outputs, and what to free after each of them."""

    steps: Tuple[_Step, ...]
    frees: Tuple[Tuple[str, ...], ...]  # frees[i]: values dead after steps[i]
    outputs: Tuple[str, ...]
    plain: Tuple[Tuple[int, ...], ...]  # plain[i]: positions where steps[i] reads a value no step makes
    # (an initializer, input or outer value) as a plain input: an indexed weight there is expanded
    runs: Tuple[tuple, ...] = field(init=False)    # per step what run reads of it, unpacked in one go

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", tuple((s.fetch, p, s.fn, s.attrs, s.single, dead, s)
                                               for s, dead, p in zip(self.steps, self.frees, self.plain)))


class Subgraph:
    """A compiled subgraph (an ``If`` branch, a ``Loop`` body) that reads values of its enclosing scope.

    ``captures`` names the outer values it reads; the enclosing executor passes them as extra inputs
    of the node, so they stay alive until the node has run, and ``run`` receives their values.
    """

    def __init__(self, graph: Graph, opsets: Mapping[str, int], outer: Iterable[str]):
        self.graph = graph
        self.captures: Tuple[str, ...] = tuple(sorted(free_names(graph)))
        self.executor = Executor(graph, opsets, outer_scope=outer)

    def run(self, captured: Mapping[str, Any], feeds: Optional[Mapping[str, Any]] = None) -> List[np.ndarray]:
        """Run with the captured outer values (plus ``feeds`` for the subgraph's own inputs)."""
        values = dict(captured)
        if feeds:
            values.update(feeds)
        hold, own = HOLD.get(), self.graph.initializers
        result = self.executor.run(values, own.__getitem__ if hold is None else lambda name: hold(own[name]))
        return [result[v.name] for v in self.graph.outputs]


class Executor:
    """Runs one graph. Construction validates and plans; ``run`` may be called from many threads.

    ``opsets`` maps an operator domain to its version (``{"": 13}``); operators read the default
    domain's version from ``attrs["_opset"]``. ``outer_scope`` lists names defined by an enclosing
    graph (for subgraphs only). ``chain``: run chains of dense layers as one step (:meth:`_chain`),
    which reads all of a chain's weights before its first layer; a session in stream mode, which
    decodes each weight when its node runs and drops it after, says no.
    """

    def __init__(self, graph: Graph, opsets: Optional[Mapping[str, int]] = None,
                 outer_scope: Iterable[str] = (), chain: bool = True):
        self.graph = graph
        self.opsets = dict(opsets or {"": 17})
        self.opset = int(self.opsets.get("", self.opsets.get("ai.onnx", 17)))
        missing = supported(graph)
        if missing:
            raise UnsupportedOperatorError(
                f"the model uses {len(missing)} operator(s) dcrt does not implement: "
                f"{', '.join(missing)}. Simplify or re-export the model without them "
                f"(e.g. a lower-level opset), or add them to dcrt/runtime/ops.", missing)
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        outer = set(outer_scope)
        self._steps = self._order(graph, outer)
        self._produced = {name for step in self._steps for name in step.outputs if name}
        self._known = self._produced | set(self.input_names) | set(graph.initializers) | outer
        for name in self.output_names:
            if name not in self._known:
                raise FormatError(f"graph output '{name}' is not produced by any node")
        self._chains = chain
        self._default_plan = self._make_plan(tuple(self.output_names), chain)
        self._profile_plan = self._make_plan(tuple(self.output_names), False)

    # -- construction ----------------------------------------------------------------------------

    def _prepare(self, node: Node, available: Set[str]) -> _Step:
        """Bind a node to its function; compile its subgraphs (which see everything defined so far)."""
        attrs = dict(node.attrs)
        attrs["_opset"] = self.opset
        attrs["_nout"] = len(node.outputs)
        inputs = list(node.inputs)
        raw = set(WEIGHT_INPUTS.get(node.op_type, ()))
        subs = subgraphs(node)
        if subs:
            compiled: Dict[str, Any] = {}
            captures: Set[str] = set()
            for key, sub in subs:
                compiled_sub = Subgraph(sub, self.opsets, available)
                captures.update(compiled_sub.captures)
                value = node.attrs[key]
                if isinstance(value, list):
                    compiled.setdefault(key, []).append(compiled_sub)
                else:
                    compiled[key] = compiled_sub
            attrs.update(compiled)
            attrs["_captures"] = tuple(sorted(captures))
            raw.update(range(len(inputs), len(inputs) + len(captures)))
            inputs.extend(attrs["_captures"])
        return _Step(node, OPS[node.op_type], attrs, tuple(inputs), frozenset(raw),
                     tuple(node.outputs))

    def _order(self, graph: Graph, outer: Set[str]) -> Tuple[_Step, ...]:
        """Topologically sort the nodes (Kahn); a cycle or an undefined input is a FormatError."""
        producer: Dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for out in node.outputs:
                if out:
                    if out in producer:
                        raise FormatError(f"value '{out}' is produced by two nodes")
                    producer[out] = i
        given = {v.name for v in graph.inputs} | set(graph.initializers) | outer
        deps: List[Set[int]] = []
        for node in graph.nodes:
            names = reads(node)
            for name in names:
                if name not in producer and name not in given:
                    raise FormatError(f"node '{node.name or node.op_type}' reads '{name}', which no "
                                      f"node, input or initializer defines")
            deps.append({producer[n] for n in names if n in producer})
        order, stuck = topological_order(deps)
        if stuck:
            names = [graph.nodes[i].name or graph.nodes[i].op_type for i in stuck]
            raise FormatError(f"the graph has a cycle through node(s): {', '.join(names[:5])}")
        available = set(given)
        steps = []
        for i in order:
            steps.append(self._prepare(graph.nodes[i], available))
            available.update(o for o in graph.nodes[i].outputs if o)
        return tuple(steps)

    @staticmethod
    def _residuals(steps: Tuple[_Step, ...], keep: Set[str]) -> Tuple[_Step, ...]:
        """Merge a Conv into the Add that is the only reader of its output, which is not wanted
        (``ops.nn.fuse_residual``): the sum is made in the convolution's bias pass. The merged step
        runs where the Add did (its other input may be made after the Conv); of two Convs feeding
        one Add, the later one merges."""
        readers = _readers(steps)
        made_by = {name: i for i, step in enumerate(steps) for name in step.outputs if name}
        merged: List[Optional[_Step]] = list(steps)
        for j, add in enumerate(steps):
            if add.node.op_type != "Add" or add.node.domain or add.node.attrs or len(add.inputs) != 2:
                continue        # (attributes: Add before opset 7, whose broadcasting differs)
            found = None
            for at, value in enumerate(add.inputs):
                i = made_by.get(value, -1)
                conv = merged[i] if i >= 0 else None
                if (conv is not None and conv.node.op_type == "Conv" and not conv.node.domain and not conv.fused
                        and len(conv.outputs) == 1 and value not in keep and readers[value] == [j]
                        and (found is None or i > found[0])):
                    found = (i, at)
            if found is None:
                continue
            i, at = found
            conv = merged[i]
            fn = nn.fuse_residual(len(conv.inputs), at, add.fn, add.attrs)
            merged[j] = _Step(conv.node, fn, conv.attrs, conv.inputs + (add.inputs[1 - at],), conv.raw, add.outputs,
                              "Add")
            merged[i] = None
        return tuple(step for step in merged if step is not None)

    @staticmethod
    def _fuse(steps: Tuple[_Step, ...], keep: Set[str]) -> Tuple[_Step, ...]:
        """Merge a Relu/Clip into the Conv/Gemm/Add that produces its input when it is that value's
        only reader and the value is not wanted (``ops.nn.fuse_clamp``): one pass, no extra array."""
        steps = Executor._residuals(steps, keep)
        readers = _readers(steps)
        made_by = {name: i for i, step in enumerate(steps) for name in step.outputs if name}
        merged: List[Optional[_Step]] = list(steps)
        for j, act in enumerate(steps):
            if act.node.op_type not in nn.CLAMPS or not act.inputs or not act.inputs[0]:
                continue
            value, extra = act.inputs[0], act.inputs[1:]
            i = made_by.get(value)
            if i is None or value in keep or len(readers[value]) != 1 or merged[i] is None:
                continue
            prod = merged[i]
            if len(prod.outputs) != 1 or any(n and made_by.get(n, -1) >= i for n in extra):
                continue
            fn = nn.fuse_clamp(op_types(prod), prod.fn, len(prod.inputs), act.node.op_type, act.attrs, act.fn)
            if fn is not None:
                merged[i] = _Step(prod.node, fn, prod.attrs, prod.inputs + extra, prod.raw, act.outputs,
                                  f"{prod.fused}+{act.node.op_type}" if prod.fused else act.node.op_type)
                merged[j] = None
        return tuple(step for step in merged if step is not None)

    def _chain(self, steps: Tuple[_Step, ...], keep: Set[str]) -> Tuple[_Step, ...]:
        """Join chains of dense layers into one step (``ops.nn.gemm_chain``): Gemm steps (a Relu fused
        or none) whose weights and biases are initializers, each reading the output of the one before,
        which nothing else reads and is not wanted. The chain runs where its last layer did: what
        runs between its layers reads none of their outputs."""
        constants = self.graph.initializers
        bounds = [nn.chain_link(s.node.op_type, s.fused, len(s.inputs))
                  if all(not n or n in constants for n in s.inputs[1:]) else None for s in steps]
        readers = _readers(steps)
        after: Dict[int, int] = {}      # a layer -> the layer that alone reads its output
        for i, step in enumerate(steps):
            value = step.outputs[0] if bounds[i] is not None else None
            if value and value not in keep and len(readers.get(value, ())) == 1:
                j = readers[value][0]
                if bounds[j] is not None and steps[j].inputs[0] == value:
                    after[i] = j
        chained: Dict[int, _Step] = {}      # the position of a chain's last layer -> the chain
        inside: Set[int] = set()
        for i in sorted(set(after) - set(after.values())):     # the first layer of each chain
            links = [i]
            while links[-1] in after:
                links.append(after[links[-1]])
            chained[links[-1]] = _chained([(steps[k], bounds[k]) for k in links])
            inside.update(links)
        return tuple(chained.get(i, step) for i, step in enumerate(steps) if i not in inside or i in chained)

    def _make_plan(self, outputs: Tuple[str, ...], chain: bool) -> _Plan:
        """Keep the steps the outputs need; free each value right after its last reader. ``chain``:
        chains of dense layers as one step (:meth:`_chain`; never in the plan ``profile`` times)."""
        for name in outputs:
            if name not in self._known:
                raise InputError(f"'{name}' is not a value of this model; known outputs: "
                                 f"{', '.join(self.output_names)}")
        needed = set(outputs)
        kept = []
        steps = self._fuse(self._steps, needed)
        for step in reversed(self._chain(steps, needed) if chain else steps):
            if any(o in needed for o in step.outputs if o):
                kept.append(step)
                needed.update(n for n in step.inputs if n)
        kept.reverse()
        last: Dict[str, int] = {}
        for i, step in enumerate(kept):
            for name in step.outputs:
                if name:
                    last[name] = i  # never read: dead right after it is made
            for name in step.inputs:
                if name:
                    last[name] = i
        keep = set(outputs)
        frees: List[List[str]] = [[] for _ in kept]
        for name, i in last.items():
            if name not in keep:
                frees[i].append(name)
        plain = tuple(tuple(i for i, name in enumerate(step.inputs)
                            if name and name not in self._produced and i not in step.raw) for step in kept)
        return _Plan(tuple(kept), tuple(tuple(f) for f in frees), outputs, plain)

    def steps(self) -> Tuple[_Step, ...]:
        """The steps computing the graph outputs as ``run`` with ``times`` takes them: one a node (an
        activation fused into its producer is one step: ``fused`` names it)."""
        return self._profile_plan.steps

    # -- running -------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, Any], weights: Optional[WeightSource] = None,
            outputs: Optional[Sequence[str]] = None, times: Optional[List[float]] = None) -> Dict[str, np.ndarray]:
        """Compute ``outputs`` (default: the graph outputs) from ``feeds``.

        ``weights(name)`` returns an initializer's value (default: the graph's ``initializers``).
        A graph input that is also an initializer takes the fed value when given. Any value name of
        the graph may be requested as an output. ``times`` (for the graph outputs only): one float
        per step of :meth:`steps`, to which each step adds the seconds its function and the
        fetching of its weights took.
        """
        if weights is None:
            weights = self.graph.initializers.__getitem__
        wanted = None if outputs is None else tuple(outputs)
        plan = self._default_plan
        if wanted not in (None, plan.outputs):
            plan = self._make_plan(wanted, self._chains)
        if times is not None:
            if plan is not self._default_plan or len(times) != len(self._profile_plan.steps):
                raise ValueError(f"times needs one entry per step of the graph outputs' plan "
                                 f"({len(self._profile_plan.steps)})")
            plan, weights = _timed(self._profile_plan, weights, times)
        env: Dict[str, Any] = dict(feeds)
        for name in self.input_names:
            if name not in env and name not in self.graph.initializers:
                raise InputError(f"missing input '{name}'; the model's inputs are "
                                 f"{', '.join(self.input_names)}")
        env[""] = None      # what an omitted input reads
        ndarray = np.ndarray
        for fetch, plain, fn, attrs, single, dead, step in plan.runs:
            # the inputs in one call when they are all in env (the activations and, in index mode, the
            # weights decoded so far) and arrays where they must be: ~0.2 us less a step of three inputs
            try:
                args = fetch(env)
                for i in plain:
                    if type(args[i]) is not ndarray:
                        raise KeyError
            except KeyError:
                args = _inputs(step, env, weights)
            try:
                result = fn(attrs, *args)
            except (LimitError, InputError) as exc:     # the user's input or limit: named, and the node
                raise type(exc)(f"node '{step.node.name or step.outputs[0]}' ({op_types(step)}): {exc}") from None
            except DcrtError:
                raise
            except Exception as exc:  # noqa: BLE001 - add the node to the message, keep the cause
                shapes = ", ".join("None" if a is None else str(getattr(a, "shape", "?")) for a in args)
                raise DcrtError(f"node '{step.node.name or step.outputs[0]}' ({op_types(step)}) "
                                f"failed on inputs of shape [{shapes}]: {type(exc).__name__}: {exc}"
                                ) from exc
            del args
            if single and type(result) is ndarray:
                env[single] = result
            else:
                for name, value in zip(step.outputs, result if isinstance(result, tuple) else (result,)):
                    if name and value is not None:
                        env[name] = value if isinstance(value, np.ndarray) else np.asarray(value)
            for name in dead:
                env.pop(name, None)
        results = {}
        for name in plan.outputs:
            value = env[name] if name in env else weights(name)
            results[name] = value if isinstance(value, ndarray) else kernels.dense(value)
        return results


def op_types(step: _Step) -> str:
    """A step's op type, with the ops merged into it (``Conv+Add+Relu``), as errors and profiles name it."""
    return f"{step.node.op_type}+{step.fused}" if step.fused else step.node.op_type


def _readers(steps: Sequence[_Step]) -> Dict[str, List[int]]:
    """Value name -> the positions of the steps that read it (once per input naming it)."""
    readers: Dict[str, List[int]] = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            if name:
                readers.setdefault(name, []).append(i)
    return readers


def _inputs(step: _Step, env: Mapping[str, Any], weights: WeightSource) -> List[Any]:
    """A step's inputs one by one: those not in ``env`` from ``weights``, and an indexed weight read
    as a plain input expanded (``kernels.dense``)."""
    args = []
    for name, raw in step.reads:
        value = env[name] if name in env else weights(name)
        if not raw and value is not None and not isinstance(value, np.ndarray):
            value = kernels.dense(value)
        args.append(value)
    return args


def _chained(links: Sequence[Tuple[_Step, Tuple[float, ...]]]) -> _Step:
    """One step computing the dense layers ``links`` (steps with their chain bounds) in turn, as a node
    named after them all ("fc1 > fc2 > fc3": what an error names)."""
    first, end = links[0][0], links[-1][0]
    inputs = (first.inputs[0],) + tuple(n for step, _ in links for n in (step.inputs[1:] + ("",))[:2])
    node = Node("Gemm", list(inputs), list(end.outputs),
                name=" > ".join(step.node.name or step.outputs[0] for step, _ in links))
    fn = nn.gemm_chain([(step.attrs, step.fn, clamp) for step, clamp in links])
    return _Step(node, fn, {}, inputs, frozenset(range(1, len(inputs), 2)), end.outputs)


def _timed(plan: _Plan, weights: WeightSource, times: List[float]) -> Tuple[_Plan, WeightSource]:
    """``plan`` with step ``i``'s function adding its seconds to ``times[i]``, and ``weights`` timed
    too: what fetching a step's weights took (stream mode decodes them then) is added to that step.
    The executor's own work around a step (gathering inputs, freeing values) is not counted."""
    fetched = [0.0]

    def fetch(name: str) -> Any:
        start = time.perf_counter()
        try:
            return weights(name)
        finally:
            fetched[0] += time.perf_counter() - start

    def clocked(fn: Callable[..., Any], i: int) -> Callable[..., Any]:
        def run(attrs: Dict[str, Any], *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(attrs, *args)
            finally:
                times[i] += time.perf_counter() - start + fetched[0]
                fetched[0] = 0.0
        return run
    steps = tuple(replace(step, fn=clocked(step.fn, i)) for i, step in enumerate(plan.steps))
    return replace(plan, steps=steps), fetch
