"""Entropy coders for index streams: one module per coder, each with ``encode``/``decode``.

A coder turns a sequence of integer *symbols* in ``[0, alphabet)`` into bytes and back:

    payload, stage = module.encode(symbols, alphabet)   # stage: the parameters decode needs
    symbols = module.decode(payload, stage)

``encode`` returns a :class:`Stage` beside the bytes because some coders need side information that
the file format stores as typed fields, not inside the payload: canonical Huffman stores its code
lengths (the codes follow from them) and the bit offset of each independently decodable chunk.

Coders chain: in ``huffman+lzw`` Huffman codes the symbols and LZW then codes Huffman's output bytes
(as symbols with alphabet 256); decoding runs the stages in reverse. The seed-000 experiment compared
exactly these four: ``huffman``, ``lzw``, ``huffman+lzw`` and ``lzw+huffman``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import FormatError


class Coder(IntEnum):
    """Coder ids; the values are the ``Coder`` enum of ``schema/dcm.fbs``."""

    NONE = 0     # little-endian uint8/uint16/uint32 per symbol (width from the alphabet): viewable in place
    HUFFMAN = 1  # canonical, length-limited Huffman, MSB-first bits, chunked
    LZW = 2      # variable-width LZW


@dataclass
class Stage:
    """One coder applied to one symbol sequence, and what its decoder needs besides the payload."""

    coder: Coder
    count: int                # symbols this stage decodes to
    alphabet: int             # symbols are in [0, alphabet)
    code_lengths: Optional[np.ndarray] = None       # HUFFMAN: uint8 per symbol, 0 = symbol unused
    chunk_size: int = 0                              # HUFFMAN: symbols per chunk (last may be short)
    chunk_bit_offsets: Optional[np.ndarray] = None  # HUFFMAN: uint64 start bit of every chunk
    max_code_width: int = 0                          # LZW: widest code in bits (dictionary bound)


@dataclass
class EncodedStream:
    """An index stream: the coder stages in encoding order and the final payload bytes."""

    stages: List[Stage]
    payload: Union[bytes, memoryview, np.ndarray] = b""

    @property
    def count(self) -> int:
        """Number of symbols the stream decodes to."""
        return self.stages[0].count if self.stages else 0

    @property
    def alphabet(self) -> int:
        """Symbols of the stream are in ``[0, alphabet)``."""
        return self.stages[0].alphabet if self.stages else 0

    def name(self) -> str:
        """The chain as written on the command line, e.g. ``huffman+lzw``."""
        return "+".join(s.coder.name.lower() for s in self.stages)


CHAINS = ("none", "huffman", "lzw", "huffman+lzw", "lzw+huffman")


def parse_chain(spec: str) -> List[Coder]:
    """``"huffman+lzw"`` -> ``[Coder.HUFFMAN, Coder.LZW]``; raises ValueError on unknown names."""
    try:
        return [Coder[part.strip().upper()] for part in spec.split("+")]
    except KeyError:
        raise ValueError(f"unknown coder {spec!r}; use one of {', '.join(CHAINS)} or auto") from None


def _module(coder: Coder):
    from . import huffman, lzw, raw

    try:
        return {Coder.NONE: raw, Coder.HUFFMAN: huffman, Coder.LZW: lzw}[coder]
    except KeyError:
        raise FormatError(f"unknown coder {coder!r}; a newer dcrt may read this file") from None


def encode(symbols: np.ndarray, alphabet: int, chain: Union[str, Sequence[Coder]] = "huffman") -> EncodedStream:
    """Code ``symbols`` (integers in ``[0, alphabet)``) through ``chain``; ``"auto"`` keeps the smallest."""
    symbols = np.ascontiguousarray(symbols).ravel()
    if isinstance(chain, str):
        if chain == "auto":
            return min((encode(symbols, alphabet, c) for c in CHAINS if usable(c, alphabet)),
                       key=stream_bytes)
        chain = parse_chain(chain)
    stages: List[Stage] = []
    data, size = symbols, alphabet
    for coder in chain:
        payload, stage = _module(coder).encode(data, size)
        stages.append(stage)
        data, size = np.frombuffer(payload, dtype=np.uint8), 256
    return EncodedStream(stages, bytes(payload) if stages else b"")


def decode(stream: EncodedStream) -> np.ndarray:
    """Inverse of :func:`encode`: the symbols, as the smallest unsigned integer dtype that holds them."""
    if not stream.stages:
        return np.zeros(0, dtype=np.uint8)
    if any(s.alphabet != 256 for s in stream.stages[1:]):
        raise FormatError("a chained coder stage must code bytes (alphabet 256)")
    data = stream.payload
    for stage in reversed(stream.stages):
        data = _module(stage.coder).decode(data, stage)
    return data


def usable(chain: str, alphabet: int) -> bool:
    """Whether ``chain`` can code symbols of this alphabet (Huffman and LZW have bounded alphabets)."""
    first = _module(parse_chain(chain)[0])
    return alphabet <= first.MAX_ALPHABET


def stream_bytes(stream: EncodedStream) -> int:
    """Bytes the stream costs in a file: payload plus the side information of every stage."""
    side = 0
    for s in stream.stages:
        side += 16  # coder, count, alphabet, chunk size: roughly what the flatbuffer table takes
        if s.code_lengths is not None:
            side += len(s.code_lengths)
        if s.chunk_bit_offsets is not None:
            side += 8 * len(s.chunk_bit_offsets)
    return len(stream.payload) + side


def symbol_dtype(alphabet: int) -> np.dtype:
    """The smallest unsigned dtype holding symbols in ``[0, alphabet)``."""
    return np.dtype(np.uint8 if alphabet <= 1 << 8 else np.uint16 if alphabet <= 1 << 16 else np.uint32)
