"""dcrt.runtime: the device-side session, graph executor, operators and kernels (numpy only)."""
from .session import ModelMetadata, NodeArg, NodeTime, Session

__all__ = ["Session", "NodeArg", "NodeTime", "ModelMetadata"]
