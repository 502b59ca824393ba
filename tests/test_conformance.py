"""ONNX backend node tests (shipped with the ``onnx`` package) run on dcrt's runtime.

Every node test whose operators the runtime implements is *selected*; a selected test must pass
(outputs within rtol 1e-4 / atol 1e-5 (float16: 2e-3 / 1e-3, about 2 ulp), integers and booleans
exact, same dtype and shape) unless it
is listed in ``EXPECTED_FAILURES`` with the reason. The runtime is driven through a real
``onnx.backend.base.Backend`` (``DcrtBackend``): ONNX -> dcrt IR (``dcrt.converters.onnx_frontend``)
-> ``runtime.executor.Executor``.

The test data comes from ``onnx/backend/test/data/node`` when the installed onnx wheel ships it;
wheels that leave the data out still ship the generators (``onnx.backend.test.case.node``), which
build the same models and reference outputs in memory.
"""
from __future__ import annotations

import functools
import glob
import os
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402
from onnx.backend.base import Backend, BackendRep  # noqa: E402

from dcrt.converters.onnx_frontend import from_onnx, runtime_implements  # noqa: E402
from dcrt.converters.onnx_functions import expand_functions  # noqa: E402
from dcrt.runtime.executor import Executor  # noqa: E402
from dcrt.runtime.ops import DEFAULT_DOMAINS, OPS  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5

_NO_BFLOAT16 = "bfloat16 has no numpy dtype; the runtime computes in numpy dtypes only"
_NO_FLOAT8 = "float8/float4 (incl. saturation rules) have no numpy dtype"
_NO_INT4 = "4-bit/2-bit integer element types have no numpy dtype"
_TRAINING = "Dropout in training mode is random; dcrt runs inference only"
_SEQUENCE = "sequence/optional values: the runtime handles tensors only"

#: Selected tests that are known not to pass, each with the reason.
EXPECTED_FAILURES: Dict[str, str] = {
    "test_attention_3d_causal_bf16": _NO_BFLOAT16,
    "test_attention_3d_causal_bf16_expanded": _NO_BFLOAT16,
    "test_attention_4d_attn_mask_causal_bf16": _NO_BFLOAT16,
    "test_attention_4d_attn_mask_causal_bf16_expanded": _NO_BFLOAT16,
    "test_attention_4d_causal_bf16": _NO_BFLOAT16,
    "test_attention_4d_causal_bf16_expanded": _NO_BFLOAT16,
    "test_attention_4d_causal_padded_kv_bf16": _NO_BFLOAT16,
    "test_attention_4d_causal_padded_kv_bf16_expanded": _NO_BFLOAT16,
    "test_attention_4d_padded_kv_bf16": _NO_BFLOAT16,
    "test_attention_4d_padded_kv_bf16_expanded": _NO_BFLOAT16,
    "test_averagepool_2d_ceil_last_window_starts_on_pad": "expected values in the test are rounded to 4 decimals",
    "test_cast_FLOAT16_to_FLOAT4E2M1": _NO_FLOAT8,
    "test_cast_FLOAT16_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_cast_FLOAT16_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_cast_FLOAT16_to_FLOAT8E5M2": _NO_FLOAT8,
    "test_cast_FLOAT16_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_cast_FLOAT16_to_INT2": _NO_INT4,
    "test_cast_FLOAT16_to_INT4": _NO_INT4,
    "test_cast_FLOAT16_to_UINT2": _NO_INT4,
    "test_cast_FLOAT16_to_UINT4": _NO_INT4,
    "test_cast_FLOAT_to_BFLOAT16": _NO_BFLOAT16,
    "test_cast_FLOAT_to_FLOAT4E2M1": _NO_FLOAT8,
    "test_cast_FLOAT_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_cast_FLOAT_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_cast_FLOAT_to_FLOAT8E5M2": _NO_FLOAT8,
    "test_cast_FLOAT_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_cast_FLOAT_to_INT2": _NO_INT4,
    "test_cast_FLOAT_to_INT4": _NO_INT4,
    "test_cast_FLOAT_to_UINT2": _NO_INT4,
    "test_cast_FLOAT_to_UINT4": _NO_INT4,
    "test_cast_e8m0_FLOAT16_to_FLOAT8E8M0": _NO_FLOAT8,
    "test_cast_e8m0_FLOAT_to_FLOAT8E8M0": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT16_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT_to_FLOAT8E5M2": _NO_FLOAT8,
    "test_cast_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT4E2M1_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E4M3FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E4M3FN_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E5M2": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E5M2FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_FLOAT8E5M2_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT16_to_INT2_expanded": _NO_INT4,
    "test_castlike_FLOAT16_to_INT4_expanded": _NO_INT4,
    "test_castlike_FLOAT16_to_UINT2_expanded": _NO_INT4,
    "test_castlike_FLOAT16_to_UINT4_expanded": _NO_INT4,
    "test_castlike_FLOAT_to_BFLOAT16": _NO_BFLOAT16,
    "test_castlike_FLOAT_to_BFLOAT16_expanded": _NO_BFLOAT16,
    "test_castlike_FLOAT_to_FLOAT4E2M1_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E4M3FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E4M3FN_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E5M2": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E5M2FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT_to_FLOAT8E5M2_expanded": _NO_FLOAT8,
    "test_castlike_FLOAT_to_INT2_expanded": _NO_INT4,
    "test_castlike_FLOAT_to_INT4_expanded": _NO_INT4,
    "test_castlike_FLOAT_to_UINT2_expanded": _NO_INT4,
    "test_castlike_FLOAT_to_UINT4_expanded": _NO_INT4,
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E4M3FN_expanded": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT16_to_FLOAT8E5M2_expanded": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN_expanded": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2FNUZ_expanded": _NO_FLOAT8,
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2_expanded": _NO_FLOAT8,
    "test_einsum_batch_matmul_bfloat16": _NO_BFLOAT16,
    "test_einsum_sum_bfloat16": _NO_BFLOAT16,
    "test_identity_opt": _SEQUENCE,
    "test_identity_sequence": _SEQUENCE,
    "test_quantizelinear_e4m3fn": _NO_FLOAT8,
    "test_quantizelinear_e5m2": _NO_FLOAT8,
    "test_quantizelinear_float4e2m1": _NO_FLOAT8,
    "test_quantizelinear_int2": _NO_INT4,
    "test_quantizelinear_int4": _NO_INT4,
    "test_quantizelinear_uint2": _NO_INT4,
    "test_quantizelinear_uint4": _NO_INT4,
    "test_range_bfloat16_type_positive_delta_expanded": _NO_BFLOAT16,
    "test_training_dropout": _TRAINING,
    "test_training_dropout_default": _TRAINING,
    "test_training_dropout_default_mask": _TRAINING,
    "test_training_dropout_mask": _TRAINING,
}


# -- the backend -----------------------------------------------------------------------------------


class DcrtBackendRep(BackendRep):
    """A prepared model: the converted graph and its executor."""

    def __init__(self, model: "onnx.ModelProto"):
        ir = from_onnx(model)
        self.executor = Executor(ir.graph, ir.opsets)
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [v.name for v in model.graph.input if v.name not in inits]
        self.output_names = [v.name for v in model.graph.output]

    def run(self, inputs: Any, **kwargs: Any) -> Tuple[np.ndarray, ...]:
        """Inputs as a list (graph input order) or a dict; outputs in graph output order."""
        feeds = dict(inputs) if isinstance(inputs, dict) else dict(zip(self.input_names, inputs))
        result = self.executor.run(feeds)
        return tuple(result[name] for name in self.output_names)


class DcrtBackend(Backend):
    """``onnx.backend.base.Backend`` over dcrt's numpy runtime (CPU only)."""

    @classmethod
    def is_compatible(cls, model: "onnx.ModelProto", device: str = "CPU", **kwargs: Any) -> bool:
        return not unsupported_ops(model)

    @classmethod
    def prepare(cls, model: "onnx.ModelProto", device: str = "CPU", **kwargs: Any) -> DcrtBackendRep:
        super().prepare(model, device, **kwargs)
        return DcrtBackendRep(model)

    @classmethod
    def run_model(cls, model: "onnx.ModelProto", inputs: Any, device: str = "CPU",
                  **kwargs: Any) -> Tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper().startswith("CPU")


# -- the node tests --------------------------------------------------------------------------------


def model_ops(model: "onnx.ModelProto") -> Set[Tuple[str, str]]:
    """``(domain, op_type)`` of every node, subgraphs included."""
    found: Set[Tuple[str, str]] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            found.add((node.domain, node.op_type))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def unsupported_ops(model: "onnx.ModelProto") -> List[str]:
    """The model's operators the runtime lacks, once operators ONNX defines as functions are expanded
    into their bodies, as conversion does (``converters/onnx_functions.py``)."""
    expanded = expand_functions(model, runtime_implements)
    return sorted(f"{d}.{op}" if d not in DEFAULT_DOMAINS else op
                  for d, op in model_ops(expanded) if d not in DEFAULT_DOMAINS or op not in OPS)


class NodeCase:
    """One node test: its model and (inputs, expected outputs)."""

    def __init__(self, name: str, model: "onnx.ModelProto", inputs: Sequence[Any], outputs: Sequence[Any]):
        self.name, self.model, self.inputs, self.outputs = name, model, list(inputs), list(outputs)


def _data_dir() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")


def _from_disk(folder: str) -> List[NodeCase]:
    cases = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "model.onnx"))):
        model = onnx.load(path)
        data = os.path.join(os.path.dirname(path), "test_data_set_0")

        def read(prefix: str) -> List[Any]:
            files = sorted(glob.glob(os.path.join(data, f"{prefix}_*.pb")),
                           key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
            arrays = []
            for f in files:
                tensor = onnx.TensorProto()
                with open(f, "rb") as fh:
                    tensor.ParseFromString(fh.read())
                arrays.append(numpy_helper.to_array(tensor))
            return arrays

        cases.append(NodeCase(os.path.basename(os.path.dirname(path)), model, read("input"), read("output")))
    return cases


def _plain(value: Any) -> Any:
    """Generated data holds some tensors as TensorProto (types numpy lacks) or numpy scalars."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def _generated() -> List[NodeCase]:
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        collected = node_cases.collect_testcases(None)
    cases = []
    for case in collected:
        if case.model is None or not case.data_sets:
            continue
        inputs, outputs = case.data_sets[0]
        cases.append(NodeCase(case.name, case.model, [_plain(v) for v in inputs],
                              [_plain(v) for v in outputs]))
    return cases


@functools.lru_cache(maxsize=1)
def all_cases() -> Dict[str, NodeCase]:
    """Every ONNX node test, by name."""
    folder = _data_dir()
    cases = _from_disk(folder) if glob.glob(os.path.join(folder, "*", "model.onnx")) else _generated()
    return {c.name: c for c in cases}


def selected_names() -> List[str]:
    """The node tests whose operators are all implemented."""
    return sorted(n for n, c in all_cases().items() if not unsupported_ops(c.model))


def _compare(name: str, expected: Any, actual: Any) -> None:
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, expected {expected.shape}"
    if expected.dtype == np.float16:  # 1 ulp of float16 is ~1e-3 relative
        np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=1e-3, err_msg=name)
    elif expected.dtype.kind in "fc":
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=name)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=name)


def run_case(case: NodeCase) -> None:
    """Run one node test through the backend; AssertionError (or any error) when it fails."""
    for value in case.inputs:
        if not isinstance(value, np.ndarray):
            raise TypeError(f"input of type {type(value).__name__} (sequences/optionals unsupported)")
    rep = DcrtBackend.prepare(case.model, "CPU")
    with np.errstate(all="ignore"):
        results = rep.run(case.inputs)
    assert len(results) >= len(case.outputs)
    for name, expected, actual in zip(rep.output_names, case.outputs, results):
        _compare(name, expected, actual)


def outcome(name: str) -> Optional[str]:
    """``None`` when the test passes, else a one-line description of the failure."""
    try:
        run_case(all_cases()[name])
    except Exception as exc:  # noqa: BLE001 - report any failure
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


# -- pytest ----------------------------------------------------------------------------------------


def test_backend_adapter_is_a_backend() -> None:
    assert issubclass(DcrtBackend, Backend)
    assert DcrtBackend.supports_device("CPU") and not DcrtBackend.supports_device("CUDA")


def test_expected_failures_are_selected_tests() -> None:
    """Stale entries are removed, so the list keeps saying what does not work."""
    selected = set(selected_names())
    assert not set(EXPECTED_FAILURES) - selected, sorted(set(EXPECTED_FAILURES) - selected)


@pytest.mark.parametrize("name", selected_names())
def test_node(name: str) -> None:
    if name in EXPECTED_FAILURES:
        pytest.xfail(EXPECTED_FAILURES[name])
    run_case(all_cases()[name])


def summary() -> Tuple[int, int, int, Counter, Counter, Dict[str, str]]:
    """(passed, selected, total, per-op selected, per-op passed, failures) for the report script."""
    cases = all_cases()
    names = selected_names()
    per_op, per_op_pass = Counter(), Counter()
    failures: Dict[str, str] = {}
    passed = 0
    for name in names:
        ops = {op for _, op in model_ops(cases[name].model)}
        problem = outcome(name)
        for op in ops:
            per_op[op] += 1
            per_op_pass[op] += problem is None
        if problem is None:
            passed += 1
        else:
            failures[name] = problem
    return passed, len(names), len(cases), per_op, per_op_pass, failures
