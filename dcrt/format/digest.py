"""CRC-32 of a graph's structure, so that a damaged node or attribute is caught at open.

Tensor payloads have their own checksums (verified lazily, on first use); this digest covers
everything else and includes each initializer's checksum, so one number vouches for the whole graph.
Floats are hashed as float32 and ints as int64: exactly what the file can hold; arrays and dtypes
as little-endian, as the file stores them, so that a big-endian reader computes the same digest.
"""
from __future__ import annotations

import struct
import zlib
from typing import Any, Callable

import numpy as np

from ..graph import Graph


def _little(dtype) -> np.dtype:
    """``dtype`` in little-endian byte order (unchanged for one-byte and non-numeric types)."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("<") if dtype.byteorder in ("=", ">") else dtype


def graph_digest(graph: Graph, tensor_checksum: Callable[[str, Any], int], crc: int = 0) -> int:
    """CRC-32 of ``graph``; ``tensor_checksum(name, value)`` gives an initializer's stored checksum."""

    def put(text: str) -> None:
        nonlocal crc
        crc = zlib.crc32(text.encode() + b"\0", crc)

    def put_value(value) -> None:
        nonlocal crc
        if isinstance(value, Graph):
            put("graph")
            crc = graph_digest(value, tensor_checksum, crc)
        elif isinstance(value, np.ndarray):
            little = _little(value.dtype)
            put(f"tensor {little.str} {value.shape}")
            crc = zlib.crc32(np.ascontiguousarray(value, dtype=little).tobytes(), crc)
        elif isinstance(value, (list, tuple)):
            put(f"list {len(value)}")
            for v in value:
                put_value(v)
        elif isinstance(value, (bool, int, np.integer)):
            crc = zlib.crc32(struct.pack("<q", int(value)), crc)
        elif isinstance(value, (float, np.floating)):
            crc = zlib.crc32(struct.pack("<f", float(value)), crc)
        elif isinstance(value, bytes):
            put(value.decode("utf-8", "surrogateescape"))
        else:
            put(str(value))

    put(graph.name)
    for node in graph.nodes:
        put(f"{node.name}|{node.op_type}|{node.domain}|{','.join(node.inputs)}|{','.join(node.outputs)}")
        for key in sorted(node.attrs):
            put(key)
            put_value(node.attrs[key])
    for vi in list(graph.inputs) + ["|"] + list(graph.outputs):
        put(vi if isinstance(vi, str) else f"{vi.name} {_little(vi.dtype).str} {vi.shape}")
    for name in sorted(graph.initializers):
        put(name)
        crc = zlib.crc32(struct.pack("<I", tensor_checksum(name, graph.initializers[name]) & 0xFFFFFFFF), crc)
    return crc


SOURCE_FIELDS = ("format", "file_name", "file_bytes", "gzip_bytes", "weight_bytes")


def model_digest(graph: Graph, tensor_checksum: Callable[[str, Any], int], opsets: dict, metadata: dict,
                 producer: str, source: dict) -> int:
    """The ``graph_checksum`` of a file: the graph plus opsets, metadata, producer and source facts."""
    crc = graph_digest(graph, tensor_checksum)
    text = "\0".join([f"{d}={v}" for d, v in sorted(opsets.items())]
                     + [f"{k}={v}" for k, v in sorted(metadata.items())]
                     + [producer] + [str(source.get(k, "" if k in ("format", "file_name") else 0))
                                     for k in SOURCE_FIELDS])
    return zlib.crc32(text.encode("utf-8", "surrogateescape"), crc)
