"""``dcrt.convert``: a source model to a ``.dcm`` file through the Deep Compression pipeline.

frontend -> graph clean-up (BatchNorm folding) -> operator check -> plan -> prune -> cluster ->
entropy-code -> atomic write -> report.
"""
from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from dcrt.errors import ConfigError, ConversionError, DcrtError, UnsupportedOperatorError
from dcrt.format.tensor import TensorRecord
from dcrt.format.writer import output_problem, write_dcm
from dcrt.files import read_bytes
from dcrt.graph import Model, all_initializers

from . import passes
from .compress import compress_tensor
from .plan import LayerPlan, load_config, make_plan, plan_to_json

Progress = Callable[[int, int, str], None]


@dataclass
class ConversionResult:
    """What ``convert`` produced: the per-tensor records, the decoded weights, the sizes."""

    output: str
    file_bytes: int
    source: Dict[str, Any]
    records: Dict[str, TensorRecord]
    plans: Dict[str, LayerPlan]
    weights: Dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # what the file decodes to
    model: Optional[Model] = field(repr=False, default=None)


def source_files(path: str, weights: Optional[str] = None) -> List[str]:
    """The file(s) a source model consists of (model, external data, Caffe weights)."""
    files = [path] + ([weights] if weights else [])
    if path.lower().endswith(".onnx"):
        from .onnx_frontend import external_files, onnx
        files += external_files(onnx.load(path, load_external_data=False), os.path.dirname(os.path.abspath(path)))
    return files


def load_model(path: str, weights: Optional[str] = None) -> Tuple[Model, str]:
    """Read any supported source model into the IR, by file extension; returns (model, format).

    The graph is checked (``passes.check_graph``); anything a damaged or hostile file makes a
    frontend raise is a ConversionError, never a bare KeyError or IndexError.
    """
    try:
        model, fmt = _read_model(path, weights)
    except DcrtError:
        raise
    except Exception as e:  # a case no frontend check foresaw: still a message, not a traceback
        raise ConversionError(f"{path} cannot be converted ({type(e).__name__}: {e}): the file is damaged, or "
                              "dcrt does not expect something in it; if the framework that wrote it loads it, "
                              "please report this") from e
    passes.check_graph(model.graph, path)
    return model, fmt


def _read_model(path: str, weights: Optional[str]) -> Tuple[Model, str]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        from .onnx_frontend import from_onnx
        return from_onnx(path), "onnx"
    if ext in (".h5", ".hdf5", ".keras"):
        from .keras_frontend import from_keras
        return from_keras(path), "keras"
    if ext == ".prototxt":
        if not weights:
            raise ConversionError(f"{path}: a Caffe model needs its weights too: --weights model.caffemodel")
        from .caffe_frontend import from_caffe
        return from_caffe(path, weights), "caffe"
    if ext == ".caffemodel":
        raise ConversionError(f"{path}: give the network definition first: "
                              f"dcrt convert deploy.prototxt --weights {os.path.basename(path)} -o model.dcm")
    raise ConversionError(f"{path}: unknown model format {ext!r}; dcrt converts .onnx, .h5/.keras "
                          "and .prototxt (+ --weights .caffemodel) files")


def source_info(files: List[str], weight_bytes: int, fmt: str) -> Dict[str, Any]:
    """Sizes of the original model file(s): what `dcrt size` compares against."""
    data = b"".join(read_bytes(f) for f in files if os.path.exists(f))
    return {"format": fmt, "file_name": os.path.basename(files[0]), "file_bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, 9, mtime=0)), "weight_bytes": weight_bytes}


def check_operators(model: Model) -> None:
    """Refuse a model whose operators the runtime cannot run, listing all of them at once."""
    from dcrt.runtime.ops import unsupported
    missing = unsupported(model.graph)
    if missing:
        raise UnsupportedOperatorError(
            f"the model uses operator(s) dcrt's runtime does not implement: {', '.join(missing)}", missing)


def check_output(output: str, sources: List[str], force: bool) -> None:
    """Refuse, before any work, an output that cannot be written or must not be: one of the
    ``sources``, a folder or device, an existing file without ``force``."""
    problem = output_problem(output)
    if problem:
        raise ConversionError(f"cannot write the .dcm: {problem}")
    if os.path.exists(output):
        for path in sources:
            if os.path.exists(path) and os.path.samefile(path, output):
                raise ConversionError(f"the output {output} is the source file {path}; give another output path")
        if not force:
            raise ConversionError(f"{output} exists; pass --force (force=True) to overwrite it")


def convert(source: str, output: str, *, weights: Optional[str] = None, bits: Optional[int] = None,
            sparsity: Optional[float] = None, threshold: Optional[float] = None, prune: bool = True,
            coder: Optional[str] = None, config: Optional[str | Dict[str, Any]] = None, force: bool = False,
            calib: Optional[Any] = None, saliency: str = "magnitude",
            progress: Optional[Progress] = None) -> ConversionResult:
    """Convert ``source`` (``.onnx``, ``.h5``/``.keras``, or ``.prototxt`` with ``weights``) into ``output``.

    ``bits``, ``sparsity``, ``threshold``, ``coder`` override the paper's per-category defaults for
    every layer; ``config`` (a YAML/JSON path or dict) sets them per op type or per layer;
    ``prune=False`` keeps every non-zero weight. ``calib`` (a data path or input arrays) refines
    each layer's centroids by least squares on its inputs (``calibrate.py``); with it,
    ``saliency="activation"`` prunes by ``|w| * ||x||`` instead of magnitude. Returns a
    :class:`ConversionResult`.
    """
    if saliency != "magnitude" and calib is None:
        raise ConfigError(f"saliency={saliency!r} ranks weights by their inputs: it needs calibration data "
                          "(--calib data.npz)")
    check_output(output, [source] + ([weights] if weights else []), force)
    model, fmt = load_model(source, weights)
    # gzip -9 of a large original takes seconds; zlib releases the GIL, so it overlaps the compression.
    pool = ThreadPoolExecutor(max_workers=1)
    weight_bytes = sum(v.nbytes for v in all_initializers(model.graph).values())
    info_job = pool.submit(source_info, source_files(source, weights), weight_bytes, fmt)
    passes.simplify(model.graph)
    check_operators(model)
    if isinstance(config, str):
        config = load_config(config)
    flags = {"bits": bits, "sparsity": sparsity, "threshold": threshold, "coder": coder}
    if not prune:
        flags["prune"] = False
    all_plans = make_plan(model.graph, flags, config)
    plans = {name: p for name, p in all_plans.items() if not p.skip}
    sources, encode = model.graph.initializers, plans
    if calib is not None:       # data-aware centroids: values already pruned and clustered, stored exactly
        from .calibrate import calibrated_weights
        sources, encode = calibrated_weights(model, plans, calib, saliency=saliency)
    records: Dict[str, TensorRecord] = {}
    decoded: Dict[str, np.ndarray] = {}
    for i, name in enumerate(sorted(plans)):
        if progress:
            progress(i, len(plans), name)
        records[name], decoded[name] = compress_tensor(name, sources[name], encode[name])
    if progress:
        progress(len(plans), len(plans), "")
    info = info_job.result()
    pool.shutdown()
    size = write_dcm(output, model, records, info, plan_to_json(all_plans))
    for name, value in model.graph.initializers.items():
        decoded.setdefault(name, value)
    return ConversionResult(output, size, info, records, plans, decoded, model)
