"""The compression plan: which tensors are compressed, and with what sparsity, bits and coder.

Each weight gets a *category* from the operator that uses it; the category gives the paper's
defaults (Han et al. 2016: 8-bit codebooks for conv, 5-bit for fully-connected, FC pruned harder).
The paper fixes relative indices at 8 bits for conv and 5 for FC; here each layer takes the width
of 2..8 bits that codes it smallest, unless the plan sets ``relative_index_bits``. Options then override in this order, later
winning: category defaults < command-line flags < config ``defaults`` < config ``op_types`` <
config ``layers`` (glob patterns on the tensor name or the name of the node that uses it).

A config file (YAML or JSON)::

    defaults: {coder: huffman}
    op_types: {Conv: {bits: 6, sparsity: 0.3}}
    layers:
      "fc6*": {sparsity: 0.95}
      "conv1.weight": {prune: false}
      "fc8.weight": {skip: true}      # keep raw
"""
from __future__ import annotations

import fnmatch
import json
import os
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dcrt.codecs import CHAINS
from dcrt.errors import ConfigError
from dcrt.graph import Graph

MIN_ELEMENTS = 64   # smaller tensors (and biases) stay raw: a codebook would cost more than it saves


@dataclass(frozen=True)
class LayerPlan:
    """How one weight tensor is compressed."""

    category: str = "other"      # conv, fc, rnn, embedding, other
    op_type: str = ""
    node: str = ""
    bits: int = 8                 # codebook index bits (K = 2**bits centroids); >= 32: no clustering
    sparsity: float = 0.0         # fraction of weights pruned by magnitude
    threshold: Optional[float] = None  # prune |w| <= threshold instead of a sparsity
    prune: bool = True
    coder: str = "huffman"
    relative_index_bits: Optional[int] = None  # None: the smallest of 2..8 bits for this layer
    skip: bool = False            # store raw


CATEGORY_DEFAULTS = {
    "conv": dict(bits=8, sparsity=0.5),
    "fc": dict(bits=5, sparsity=0.9),
    "rnn": dict(bits=8, sparsity=0.6),
    "embedding": dict(bits=8, sparsity=0.5),
}

# (op_type, input slot) -> category of the weight in that slot
WEIGHT_SLOTS = {
    ("Conv", 1): "conv", ("ConvTranspose", 1): "conv",
    ("Gemm", 1): "fc", ("MatMul", 1): "fc", ("MatMul", 0): "fc",
    ("LSTM", 1): "rnn", ("LSTM", 2): "rnn", ("GRU", 1): "rnn", ("GRU", 2): "rnn",
    ("RNN", 1): "rnn", ("RNN", 2): "rnn", ("Gather", 0): "embedding",
}

KEYS = {"bits": int, "sparsity": float, "threshold": float, "prune": bool, "coder": str,
        "relative_index_bits": int, "skip": bool}


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML or JSON plan file; ConfigError when it is malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None

    def unique(pairs: List[Tuple[Any, Any]], lines: Optional[List[int]] = None) -> Dict[Any, Any]:
        seen = {}
        for i, (key, _) in enumerate(pairs):
            if key in seen:     # json and yaml keep the last silently: half of such a plan would be lost
                where = f" (lines {seen[key]} and {lines[i]})" if lines else ""
                raise ConfigError(f"config {path}: {key!r} is given twice in one mapping{where}: merge the two")
            seen[key] = lines[i] if lines else i
        return dict(pairs)

    try:
        if path.endswith(".json"):
            data = json.loads(text, object_pairs_hook=unique)
        else:
            try:
                import yaml
            except ImportError:
                raise ConfigError("YAML configs need pyyaml (pip install pyyaml), or write the config as .json") from None

            class Loader(yaml.SafeLoader):
                def construct_mapping(self, node, deep=False):
                    keys = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]   # `<<` may repeat
                    unique([(self.construct_object(k, deep=True), None) for k in keys],
                           [k.start_mark.line + 1 for k in keys])
                    return super().construct_mapping(node, deep=deep)
            data = yaml.load(text, Loader=Loader)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
    if data is None:
        data = {}
    check_config(data, path)
    return data


def check_config(data: Any, where: str = "config") -> None:
    """Validate a plan dictionary; ConfigError names the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with defaults / op_types / layers")
    unknown = set(data) - {"defaults", "op_types", "layers"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; use defaults, op_types, layers")
    _check_options(data.get("defaults") or {}, f"{where}: defaults")
    for section in ("op_types", "layers"):
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}: {section} must map names to option mappings")
        for key, opts in entries.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: {section} key {key!r} must be a string (an operator type, or a "
                                  "layer name or glob; quote it in YAML)")
            _check_options(opts, f"{where}: {section}.{key}")


def _check_options(opts: Any, where: str) -> None:
    if not isinstance(opts, dict):
        raise ConfigError(f"{where} must be a mapping of options ({', '.join(KEYS)})")
    for key, value in opts.items():
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown option {key!r}; options are {', '.join(KEYS)}")
        kind = KEYS[key]
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {key} must be a number, not {value!r}")
        if kind is int and not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}")
        if kind is str and not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, not {value!r}")
    check_values(opts, where)


def check_values(opts: Dict[str, Any], where: str) -> None:
    """Range checks shared by the config file and the command-line flags."""
    bits = opts.get("bits")
    if bits is not None and not (1 <= bits <= 16 or bits == 32):
        raise ConfigError(f"{where}: bits must be 1..16 (codebook of 2^bits centroids) or 32 (no clustering), not {bits}")
    sp = opts.get("sparsity")
    if sp is not None and not 0.0 <= sp < 1.0:
        raise ConfigError(f"{where}: sparsity must be in [0, 1), not {sp}")
    th = opts.get("threshold")
    if th is not None and not th >= 0:      # NaN too
        raise ConfigError(f"{where}: threshold must be a number >= 0, not {th}")
    rib = opts.get("relative_index_bits")
    if rib is not None and not 1 <= rib <= 16:
        raise ConfigError(f"{where}: relative_index_bits must be 1..16, not {rib}")
    coder = opts.get("coder")
    if coder is not None and coder not in CHAINS + ("auto",):
        raise ConfigError(f"{where}: coder must be one of {', '.join(CHAINS + ('auto',))}, not {coder!r}")


def weight_uses(graph: Graph) -> Dict[str, List[Tuple[str, str, int]]]:
    """For each initializer, the (op_type, node name, input slot) of every node that reads it."""
    uses: Dict[str, List[Tuple[str, str, int]]] = {}
    for node in graph.nodes:
        for slot, name in enumerate(node.inputs):
            if name in graph.initializers:
                uses.setdefault(name, []).append((node.op_type, node.name, slot))
    return uses


def make_plan(graph: Graph, flags: Optional[Dict[str, Any]] = None,
              config: Optional[Dict[str, Any]] = None) -> Dict[str, LayerPlan]:
    """The plan of every compressible initializer (those with ``skip`` are stored raw, as are the rest)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    check_values(flags, "options")
    if config is not None:      # a dict from the Python API is checked as a file's is (load_config)
        check_config(config)
    config = config or {}
    layers, op_types = config.get("layers") or {}, config.get("op_types") or {}
    matched, seen_ops = set(), set()
    plans: Dict[str, LayerPlan] = {}
    for name, uses in weight_uses(graph).items():
        value = graph.initializers[name]
        cats = {WEIGHT_SLOTS.get((op, slot)) for op, _, slot in uses}
        category = cats.pop() if len(cats) == 1 else None
        if (category is None or value.dtype != np.float32 or value.size < MIN_ELEMENTS
                or value.ndim < 2):
            continue
        op_type, node = uses[0][0], uses[0][1]
        opts: Dict[str, Any] = dict(CATEGORY_DEFAULTS[category])
        opts.update(flags)
        opts.update(config.get("defaults") or {})
        opts.update(op_types.get(op_type, {}))
        seen_ops.add(op_type)
        for pattern, layer_opts in layers.items():
            if fnmatch.fnmatchcase(name, pattern) or (node and fnmatch.fnmatchcase(node, pattern)):
                opts.update(layer_opts)
                matched.add(pattern)
        plans[name] = replace(LayerPlan(category=category, op_type=op_type, node=node), **opts)
    # a typo in a config would otherwise change nothing, silently
    for pattern in layers:
        if pattern not in matched:
            warnings.warn(f"config: layers entry {pattern!r} matches no weight dcrt compresses (weights of "
                          "Conv/Gemm/MatMul/LSTM/GRU/RNN/Gather of 64+ elements; biases stay raw)", stacklevel=2)
    for op in op_types:
        if op not in seen_ops:
            warnings.warn(f"config: op_types entry {op!r} is no operator with weights in this model "
                          f"({', '.join(sorted(seen_ops)) or 'none'})", stacklevel=2)
    return plans


def plan_to_json(plans: Dict[str, LayerPlan]) -> Dict[str, Any]:
    """The plan as the ``layers`` section of a config file (stored in the .dcm, reusable as --config)."""
    default = LayerPlan()
    return {"layers": {name: {k: v for k, v in asdict(p).items()
                              if k not in ("category", "op_type", "node") and v is not None
                              and (k in ("bits", "sparsity") or v != getattr(default, k))}
                       for name, p in sorted(plans.items())}}
