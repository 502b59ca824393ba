"""dcrt.runtime: the device-side session, graph executor, operators and kernels (numpy only)."""
from .session import NodeArg, Session

__all__ = ["Session", "NodeArg"]
