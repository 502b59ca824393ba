"""Element types, numbered as ONNX's TensorProto.DataType (without importing onnx)."""
from __future__ import annotations

import numpy as np

from ..errors import FormatError

ONNX_TO_NUMPY = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}
NUMPY_TO_ONNX = {np.dtype(v): k for k, v in ONNX_TO_NUMPY.items()}


def to_numpy(code: int) -> np.dtype:
    """numpy dtype of an ONNX data type code; FormatError for codes dcrt does not store."""
    try:
        return np.dtype(ONNX_TO_NUMPY[int(code)])
    except KeyError:
        raise FormatError(f"unsupported tensor data type code {code}") from None


def to_onnx(dtype) -> int:
    """ONNX data type code of a numpy dtype."""
    try:
        return NUMPY_TO_ONNX[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"dcrt cannot store tensors of dtype {np.dtype(dtype)}") from None
