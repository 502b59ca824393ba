"""Entropy coders: round trips, determinism, code properties, chunking and damaged input.

Property tests generate symbol streams of random alphabets and shapes (empty, a single symbol,
uniform, geometric) and check every coder module, both Huffman and LZW decoders (numpy and numba),
and the coder chains of ``dcrt.codecs``. Damaged payloads and stages must raise FormatError and
nothing else.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dcrt.codecs as codecs
from dcrt.codecs import CHAINS, Coder, EncodedStream, Stage, huffman, lzw, raw, symbol_dtype
from dcrt.codecs.raw import pack_codes
from dcrt.errors import FormatError

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NOTABLE_ALPHABETS = [1, 2, 3, 16, 255, 256, 257, 1000, 4096, 32768, 65535, 65536, 65537, 1 << 20, (1 << 32) - 1]


def _decoders(module):
    """Every decoder of a coder module: the automatic one and the explicit implementations."""
    found = [module.decode]
    if hasattr(module, "decode_numpy"):
        found.append(module.decode_numpy)
        if HAVE_NUMBA:
            found.append(module.decode_numba)
    return found


@st.composite
def streams(draw, max_alphabet: int = (1 << 32) - 1, max_size: int = 20000):
    """(symbols, alphabet): a random alphabet and a stream shaped to hit the coders' edge cases."""
    alphabet = draw(st.one_of(
        st.sampled_from([a for a in NOTABLE_ALPHABETS if a <= max_alphabet]),
        st.integers(1, max_alphabet)))
    kind = draw(st.sampled_from(["empty", "single", "small", "uniform", "geometric", "runs"]))
    if kind == "empty":
        return np.zeros(0, dtype=np.int64), alphabet
    if kind == "small":  # element-wise generated, so hypothesis can shrink it
        symbols = draw(hnp.arrays(np.int64, st.integers(1, 64), elements=st.integers(0, alphabet - 1)))
        return symbols, alphabet
    size = draw(st.integers(1, max_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "single":
        symbols = np.full(size, rng.integers(0, alphabet), dtype=np.int64)
    elif kind == "uniform":
        symbols = rng.integers(0, alphabet, size, dtype=np.int64)
    elif kind == "geometric":
        symbols = np.minimum(rng.geometric(draw(st.sampled_from([0.05, 0.3, 0.7])), size) - 1, alphabet - 1)
    else:  # long repeats of few values: what LZW is good at
        values = rng.integers(0, alphabet, 8)
        symbols = np.repeat(values[rng.integers(0, 8, size // 16 + 1)], 16)[:size]
    return symbols.astype(np.int64), alphabet


def _check_round_trip(module, symbols: np.ndarray, alphabet: int) -> tuple:
    payload, stage = module.encode(symbols, alphabet)
    assert isinstance(payload, bytes)
    assert stage.count == symbols.size and stage.alphabet == alphabet
    for decode in _decoders(module):
        for given_payload in (payload, memoryview(payload), np.frombuffer(payload, dtype=np.uint8)):
            out = decode(given_payload, stage)
            assert out.ndim == 1 and out.dtype == symbol_dtype(alphabet), decode
            np.testing.assert_array_equal(out, symbols)
    return payload, stage


# --------------------------------------------------------------------------------------------------
# Round trips


@SETTINGS
@given(streams())
def test_raw_round_trip(case):
    _check_round_trip(raw, *case)


@SETTINGS
@given(streams(max_alphabet=huffman.MAX_ALPHABET))
def test_huffman_round_trip(case):
    payload, stage = _check_round_trip(huffman, *case)
    assert stage.code_lengths.dtype == np.uint8 and stage.code_lengths.size == case[1]
    assert stage.chunk_bit_offsets.dtype == np.uint64
    assert stage.chunk_size == huffman.chunk_size_for(case[0].size)


@SETTINGS
@given(streams(max_alphabet=lzw.MAX_ALPHABET))
def test_lzw_round_trip(case):
    payload, stage = _check_round_trip(lzw, *case)
    assert stage.max_code_width == lzw.MAX_CODE_WIDTH


@SETTINGS
@given(streams(max_alphabet=lzw.MAX_ALPHABET, max_size=5000), st.sampled_from(CHAINS + ("auto",)))
def test_chain_round_trip(case, chain):
    symbols, alphabet = case
    stream = codecs.encode(symbols, alphabet, chain)
    if chain != "auto":
        assert stream.name() == chain
    out = codecs.decode(stream)
    assert out.dtype == symbol_dtype(alphabet)
    np.testing.assert_array_equal(out, symbols)


@FEW
@given(streams(min(huffman.MAX_ALPHABET, lzw.MAX_ALPHABET), max_size=5000))
def test_auto_keeps_the_smallest(case):
    symbols, alphabet = case
    best = codecs.encode(symbols, alphabet, "auto")
    sizes = [codecs.stream_bytes(codecs.encode(symbols, alphabet, c)) for c in CHAINS]
    assert codecs.stream_bytes(best) == min(sizes)


def test_huffman_wide_alphabet_and_all_symbols():
    symbols = np.random.default_rng(5).permutation(np.tile(np.arange(1 << 16), 2))
    payload, stage = _check_round_trip(huffman, symbols, 1 << 16)
    assert set(np.unique(stage.code_lengths)) == {16}  # uniform over 2^16 symbols: 16 bits each


def test_lzw_dictionary_freezes():
    # Random bytes fill the 2^16-entry dictionary after ~65k codes; coding must go on with it frozen.
    symbols = np.random.default_rng(6).integers(0, 256, 150_000)
    payload, stage = _check_round_trip(lzw, symbols, 256)
    assert len(payload) * 8 > lzw.code_widths(70_000, 256).sum()  # more codes than the dictionary holds


def test_huffman_many_chunks_and_groups(monkeypatch):
    # Small groups, small blocks of temporaries (bytes; visited positions, across the short last
    # chunk's end) and both ways of finding code lengths in decode_numpy, on a stream of many chunks.
    symbols = np.minimum(np.random.default_rng(7).geometric(0.2, 300_000) - 1, 199)
    payload, stage = huffman.encode(symbols, 200)
    assert len(stage.chunk_bit_offsets) > 32 and symbols.size % stage.chunk_size
    for group_bits, row_min, block in ((1 << 15, 0, 1 << 18), (1 << 25, 0, 1000), (1 << 23, 1 << 40, 333)):
        monkeypatch.setattr(huffman, "_GROUP_BITS", group_bits)
        monkeypatch.setattr(huffman, "_ROW_TABLE_MIN_BITS", row_min)
        monkeypatch.setattr(huffman, "_BLOCK", block)
        np.testing.assert_array_equal(huffman.decode_numpy(payload, stage), symbols)


@needs_numba
@SETTINGS
@given(streams(max_alphabet=huffman.MAX_ALPHABET))
def test_huffman_numpy_and_numba_agree(case):
    payload, stage = huffman.encode(*case)
    a, b = huffman.decode_numpy(payload, stage), huffman.decode_numba(payload, stage)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_huffman_long_codes_past_the_table():
    """decode_numba looks codes of up to PRIMARY_BITS bits up in its table and finds longer ones by
    their canonical ranges: codes of every length 1..16 decode as numpy's decoder does, and a long
    code that the code lengths leave unassigned is damage, not a symbol."""
    rng = np.random.default_rng(0)
    counts = np.array([1 << max(15 - i, 0) for i in range(20)])      # lengths 1, 2, ..., 16, 16, ...
    symbols = rng.permutation(np.repeat(np.arange(20), counts))
    payload, stage = huffman.encode(symbols, 20)
    lengths = stage.code_lengths.astype(int)
    assert lengths.min() == 1 and lengths.max() == 16 and (lengths > huffman.PRIMARY_BITS).sum() >= 6
    decoders = [huffman.decode_numpy] + ([huffman.decode_numba] if HAVE_NUMBA else [])
    for decode in decoders:
        np.testing.assert_array_equal(decode(payload, stage), symbols)
    # the last code in canonical order (longest length, highest symbol) unassigned: Kraft's sum < 1
    last = max(range(20), key=lambda s: (lengths[s], s))
    cut = stage.code_lengths.copy()
    cut[last] = 0
    for decode in decoders:
        with pytest.raises(FormatError, match="does not decode"):
            decode(payload, dataclasses.replace(stage, code_lengths=cut))


@needs_numba
@SETTINGS
@given(st.integers(2, 300), st.integers(0, 2**32 - 1), st.integers(1, 3000), st.data())
def test_huffman_decoders_agree_on_any_bits(alphabet, seed, count, data):
    """Symbols coded with a random, often incomplete, code whose codes run up to 16 bits, in chunks,
    then a few bits flipped or not: the compiled decoder (table + canonical ranges) and the numpy one
    (16-bit table) give the same symbols, or both raise FormatError."""
    rng = np.random.default_rng(seed)
    lengths = huffman.code_lengths(rng.geometric(0.02, alphabet) * rng.integers(1, 50, alphabet) ** 2)
    lengths[rng.random(alphabet) < data.draw(st.sampled_from([0.0, 0.1, 0.5]))] = 0     # drop codes
    used = np.flatnonzero(lengths)
    assume(used.size > 0)
    symbols = rng.choice(used, count)
    width = lengths[symbols].astype(np.int64)
    ends = np.cumsum(width)
    starts = ends - width
    chunk = data.draw(st.sampled_from([count, max(1, count // 5)]))
    payload = bytearray(pack_codes(huffman.canonical_codes(lengths)[symbols], width, starts, int(ends[-1])))
    for _ in range(data.draw(st.integers(0, 3))):
        payload[rng.integers(0, len(payload))] ^= 1 << int(rng.integers(0, 8))
    stage = Stage(Coder.HUFFMAN, count=count, alphabet=alphabet, code_lengths=lengths,
                  chunk_size=chunk, chunk_bit_offsets=starts[::chunk].astype(np.uint64))
    results = []
    for decode in (huffman.decode_numpy, huffman.decode_numba):
        try:
            results.append(decode(bytes(payload), stage))
        except FormatError:
            results.append(None)
    assert (results[0] is None) == (results[1] is None)
    if results[0] is not None:
        np.testing.assert_array_equal(results[0], results[1])


def test_concurrent_decoding():
    from concurrent.futures import ThreadPoolExecutor

    symbols = _sample(size=50_000)
    encoded = [module.encode(symbols, 50) + (module,) for module in (raw, huffman, lzw)] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda e: e[2].decode(e[0], e[1]), encoded))
    for out in results:
        np.testing.assert_array_equal(out, symbols)


def test_no_numba_env_forces_numpy(monkeypatch):
    monkeypatch.setenv("DCRT_NO_NUMBA", "1")
    assert raw.numba_kernels() is None
    monkeypatch.delenv("DCRT_NO_NUMBA")
    assert (raw.numba_kernels() is not None) == HAVE_NUMBA


# --------------------------------------------------------------------------------------------------
# Determinism, format details


@SETTINGS
@given(streams(max_alphabet=lzw.MAX_ALPHABET, max_size=5000))
def test_encoding_is_deterministic(case):
    for module in (raw, huffman, lzw):
        first, second = module.encode(*case), module.encode(case[0].copy(), case[1])
        assert first[0] == second[0]
        for field in dataclasses.fields(Stage):
            x, y = getattr(first[1], field.name), getattr(second[1], field.name)
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y


def test_raw_is_little_endian_and_zero_copy():
    payload, stage = raw.encode(np.array([1, 258, 65535]), 65536)
    assert payload == b"\x01\x00\x02\x01\xff\xff"
    assert raw.encode(np.array([1, 70000]), 1 << 20)[0] == b"\x01\x00\x00\x00\x70\x11\x01\x00"
    buffer = np.frombuffer(payload, dtype=np.uint8)  # read-only, like a memory-mapped file
    out = raw.decode(buffer, stage)
    if sys.byteorder == "little":
        assert np.shares_memory(out, buffer)


def test_huffman_known_answer():
    # Frequencies 4, 2, 1, 1 -> lengths 1, 2, 3, 3 -> canonical codes 0, 10, 110, 111.
    payload, stage = huffman.encode(np.array([0, 0, 1, 0, 2, 3, 1, 0]), 4)
    np.testing.assert_array_equal(stage.code_lengths, [1, 2, 3, 3])
    np.testing.assert_array_equal(huffman.canonical_codes(stage.code_lengths), [0b0, 0b10, 0b110, 0b111])
    assert payload == bytes([0b00100110, 0b11110000])  # 0 0 10 0 110 111 10 0, zero-padded


def test_huffman_single_symbol_costs_one_bit():
    payload, stage = huffman.encode(np.full(1001, 7), 9)
    assert stage.code_lengths.tolist() == [0] * 7 + [1, 0]
    assert payload == bytes(126)


def test_huffman_chunk_size_rule():
    assert [huffman.chunk_size_for(n) for n in (0, 1, 32 * 2048, 32 * 2048 + 1, 100_000, 10**6)] == \
        [2048, 2048, 2048, 4096, 4096, 8192]


def test_lzw_known_answer():
    text = np.frombuffer(b"TOBEORNOTTOBEORTOBEORNOT", dtype=np.uint8)
    assert lzw._lzw_codes(text.tolist(), 256, 1 << 16) == \
        [84, 79, 66, 69, 79, 82, 78, 79, 84, 256, 258, 260, 265, 259, 261, 263]
    payload, stage = _check_round_trip(lzw, text, 256)
    assert len(payload) == -(-16 * 9 // 8)  # 16 codes of 9 bits


def test_lzw_code_widths():
    np.testing.assert_array_equal(lzw.code_widths(7, 2), [2, 2, 3, 3, 3, 3, 4])
    assert lzw.code_widths(1, 256)[0] == 9 and lzw.code_widths(1, 1)[0] == 1
    assert lzw.code_widths(1, 1 << 15)[0] == 16
    widths = lzw.code_widths(70_000, 256)
    assert widths.max() == 16 and widths[-1] == 16 and np.all(np.diff(widths) >= 0)


def test_encoders_reject_bad_symbols():
    for module in (raw, huffman, lzw):
        with pytest.raises(ValueError):
            module.encode(np.array([0, 5]), 5)
        with pytest.raises(ValueError):
            module.encode(np.array([-1, 0]), 5)
        with pytest.raises(ValueError):
            module.encode(np.array([0.5]), 5)
    with pytest.raises(ValueError):
        huffman.encode(np.array([0]), huffman.MAX_ALPHABET + 1)
    with pytest.raises(ValueError):
        lzw.encode(np.array([0]), lzw.MAX_ALPHABET + 1)


# --------------------------------------------------------------------------------------------------
# Huffman code lengths


def _fibonacci(n: int) -> list:
    out = [1, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]


@SETTINGS
@given(st.one_of(
    hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 10**6)),
    st.integers(2, 60).map(lambda n: np.array(_fibonacci(n), dtype=np.int64)),  # forces deep trees
    st.integers(2, 40).map(lambda n: np.int64(2) ** np.arange(n))))
def test_code_lengths_are_limited_and_complete(freqs):
    lengths = huffman.code_lengths(freqs)
    used = np.flatnonzero(freqs)
    assert lengths.dtype == np.uint8 and lengths.size == freqs.size
    assert lengths.max(initial=0) <= huffman.MAX_CODE_LENGTH
    np.testing.assert_array_equal(lengths != 0, freqs != 0)
    if used.size >= 2:
        assert huffman.kraft_sum(lengths) == 1.0  # a complete prefix code
    elif used.size == 1:
        assert lengths[used[0]] == 1
    # More frequent symbols never get longer codes.
    order = used[np.argsort(freqs[used], kind="stable")]
    assert np.all(np.diff(lengths[order].astype(int)) <= 0)


def test_length_limit_costs_little():
    freqs = np.array(_fibonacci(40), dtype=np.int64)
    limited = huffman.code_lengths(freqs)
    unlimited = huffman.code_lengths(freqs, max_length=64)
    assert unlimited.max() == 39 and limited.max() == 16
    cost = lambda ln: float(np.dot(freqs, ln)) / freqs.sum()  # noqa: E731
    assert cost(limited) <= cost(unlimited) * 1.01


@pytest.mark.parametrize("p", [0.5, 0.3, 0.1])
def test_huffman_near_entropy_on_skewed_data(p):
    symbols = np.minimum(np.random.default_rng(8).geometric(p, 200_000) - 1, 255)
    payload, stage = huffman.encode(symbols, 256)
    counts = np.bincount(symbols)
    prob = counts[counts > 0] / symbols.size
    entropy_bytes = -(prob * np.log2(prob)).sum() * symbols.size / 8
    assert len(payload) < 0.75 * len(raw.encode(symbols, 256)[0])
    assert len(payload) <= entropy_bytes * 1.01 + 64


def test_chunks_decode_independently():
    symbols = np.minimum(np.random.default_rng(9).geometric(0.2, 20_000) - 1, 99)
    payload, stage = huffman.encode(symbols, 100)
    offsets = stage.chunk_bit_offsets.astype(np.int64)
    assert len(offsets) >= 10
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    c = len(offsets) // 2
    alone = np.packbits(bits[offsets[c]: offsets[c + 1]]).tobytes()  # that chunk's bits only
    sub = Stage(Coder.HUFFMAN, count=stage.chunk_size, alphabet=100, code_lengths=stage.code_lengths,
                chunk_size=stage.chunk_size, chunk_bit_offsets=np.zeros(1, np.uint64))
    for decode in _decoders(huffman):
        np.testing.assert_array_equal(decode(alone, sub), symbols[c * stage.chunk_size: (c + 1) * stage.chunk_size])


# --------------------------------------------------------------------------------------------------
# Damaged input


def _must_fail(module, payload, stage, what=""):
    for decode in _decoders(module):
        with pytest.raises(FormatError):
            decode(payload, stage)


def _sample(alphabet=50, size=5000, seed=10):
    return np.minimum(np.random.default_rng(seed).geometric(0.15, size) - 1, alphabet - 1)


def test_truncated_payloads_fail():
    symbols = _sample()
    for module in (raw, huffman, lzw):
        payload, stage = module.encode(symbols, 50)
        for cut in (1, 2, len(payload) // 2, len(payload)):
            _must_fail(module, payload[:-cut], stage)
        _must_fail(module, payload + b"\0", stage)  # trailing garbage is damage too


def test_bad_huffman_stages_fail():
    payload, stage = huffman.encode(_sample(), 50)
    lengths = stage.code_lengths.copy()
    lengths[lengths > 0] = 1  # many one-bit codes: violates Kraft
    bad = [
        dataclasses.replace(stage, code_lengths=lengths),
        dataclasses.replace(stage, code_lengths=np.full(50, 17, np.uint8)),
        dataclasses.replace(stage, code_lengths=stage.code_lengths[:-1]),
        dataclasses.replace(stage, code_lengths=np.zeros(50, np.uint8)),
        dataclasses.replace(stage, code_lengths=None),
        dataclasses.replace(stage, chunk_bit_offsets=stage.chunk_bit_offsets + np.uint64(len(payload) * 8)),
        dataclasses.replace(stage, chunk_bit_offsets=np.full_like(stage.chunk_bit_offsets, 2**64 - 1)),
        dataclasses.replace(stage, chunk_bit_offsets=stage.chunk_bit_offsets[::-1].copy()),
        dataclasses.replace(stage, chunk_bit_offsets=stage.chunk_bit_offsets[:-1]),
        dataclasses.replace(stage, chunk_bit_offsets=None),
        # +-8: the zero padding (< 8 bits) may decode as a few symbols, so +-1 is not always detectable.
        dataclasses.replace(stage, count=stage.count + 8),
        dataclasses.replace(stage, count=stage.count - 8),
        dataclasses.replace(stage, count=10**15),
        dataclasses.replace(stage, count=-1),
        dataclasses.replace(stage, chunk_size=0),
        dataclasses.replace(stage, chunk_size=2**40),
        dataclasses.replace(stage, alphabet=49),
        dataclasses.replace(stage, coder=Coder.LZW),
    ]
    for damaged in bad:
        _must_fail(huffman, payload, damaged)


@pytest.mark.parametrize("count", [1 << 63, (1 << 64) - 1])
def test_counts_past_int64_fail(count):
    """The file's count is 64 bits unsigned: one past int64 is damage (FormatError), for every coder
    and decoder. It was an OverflowError from LZW's kernel once an int64 count had compiled it (numba
    casts the next call's count to that signature); hypothesis found it."""
    for module in (raw, huffman, lzw):
        payload, stage = module.encode(_sample(), 50)
        _must_fail(module, payload, dataclasses.replace(stage, count=count))


def test_bad_lzw_and_raw_stages_fail():
    symbols = _sample()
    payload, stage = lzw.encode(symbols, 50)
    for damaged in (dataclasses.replace(stage, count=stage.count + 1), dataclasses.replace(stage, count=10**15),
                    dataclasses.replace(stage, count=stage.count - 1), dataclasses.replace(stage, count=0),
                    dataclasses.replace(stage, max_code_width=17), dataclasses.replace(stage, max_code_width=0),
                    dataclasses.replace(stage, alphabet=lzw.MAX_ALPHABET + 1)):
        _must_fail(lzw, payload, damaged)
    payload, stage = raw.encode(symbols, 50)
    for damaged in (dataclasses.replace(stage, count=stage.count + 1), dataclasses.replace(stage, alphabet=300),
                    dataclasses.replace(stage, alphabet=10)):  # symbols >= alphabet
        _must_fail(raw, payload, damaged)
    _must_fail(raw, np.zeros(4, np.uint16), Stage(Coder.NONE, 4, 256))  # payload must be bytes


def test_invalid_lzw_code_fails():
    # Alphabet 4: the first code is 3 bits wide (bit_length(4)); code 7 is not in the dictionary.
    _must_fail(lzw, bytes([0b11100000]), Stage(Coder.LZW, 1, 4, max_code_width=16))
    # Code 4 at step 0 (the KwKwK case needs a previous string).
    _must_fail(lzw, bytes([0b10000000]), Stage(Coder.LZW, 2, 4, max_code_width=16))


def _flip(payload: bytes, flips) -> bytes:
    data = bytearray(payload)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    return bytes(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(max_alphabet=lzw.MAX_ALPHABET, max_size=3000),
       st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes_never_crash(case, flips):
    symbols, alphabet = case
    assume(symbols.size > 0)
    for module in (raw, huffman, lzw):
        payload, stage = module.encode(symbols, alphabet)
        damaged = _flip(payload, flips)
        for decode in _decoders(module):
            try:
                out = decode(damaged, stage)
            except FormatError:
                continue
            assert out.shape == (symbols.size,) and out.dtype == symbol_dtype(alphabet)
            assert out.size == 0 or int(out.max()) < alphabet


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(max_alphabet=lzw.MAX_ALPHABET, max_size=3000), st.data())
def test_damaged_stages_never_crash(case, data):
    symbols, alphabet = case
    module = data.draw(st.sampled_from([raw, huffman, lzw]))
    payload, stage = module.encode(symbols, alphabet)
    changes = {}
    field = data.draw(st.sampled_from(["count", "alphabet", "chunk_size", "offsets", "lengths", "width", "cut"]))
    if field == "count":
        changes["count"] = data.draw(st.integers(0, 2**63))
    elif field == "alphabet":
        changes["alphabet"] = data.draw(st.integers(0, 2**33))
    elif field == "chunk_size":
        changes["chunk_size"] = data.draw(st.integers(0, 2**33))
    elif field == "offsets" and stage.chunk_bit_offsets is not None and stage.chunk_bit_offsets.size:
        offsets = stage.chunk_bit_offsets.copy()
        offsets[data.draw(st.integers(0, offsets.size - 1))] = data.draw(st.integers(0, 2**64 - 1))
        changes["chunk_bit_offsets"] = offsets
    elif field == "lengths" and stage.code_lengths is not None and stage.code_lengths.size:
        lengths = stage.code_lengths.copy()
        lengths[data.draw(st.integers(0, lengths.size - 1))] = data.draw(st.integers(0, 255))
        changes["code_lengths"] = lengths
    elif field == "width":
        changes["max_code_width"] = data.draw(st.integers(0, 40))
    elif field == "cut":
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    stage = dataclasses.replace(stage, **changes)
    for decode in _decoders(module):
        try:
            out = decode(payload, stage)
        except FormatError:
            continue
        assert out.shape == (stage.count,) and out.dtype == symbol_dtype(stage.alphabet)


@FEW
@given(streams(max_alphabet=lzw.MAX_ALPHABET, max_size=3000), st.sampled_from(CHAINS[1:]),
       st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=3))
def test_damaged_chains_never_crash(case, chain, flips):
    symbols, alphabet = case
    assume(symbols.size > 0)
    stream = codecs.encode(symbols, alphabet, chain)
    damaged = EncodedStream(stream.stages, _flip(stream.payload, flips))
    try:
        out = codecs.decode(damaged)
    except FormatError:
        return
    assert out.shape == (symbols.size,) and out.dtype == symbol_dtype(alphabet)
