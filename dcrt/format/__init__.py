"""The ``.dcm`` file format: FlatBuffers code generated from ``schema/dcm.fbs`` and a thin reader/writer.

``open_dcm(path)`` memory-maps a file and gives the graph with lazily decoded tensors; the writer
(``dcrt.format.writer``) is used by the converters.
"""
FILE_IDENTIFIER = b"DCM1"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0

from .reader import DcmFile, StoredTensor, open_dcm  # noqa: E402

__all__ = ["open_dcm", "DcmFile", "StoredTensor", "FILE_IDENTIFIER", "FORMAT_MAJOR", "FORMAT_MINOR"]
