"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016).

Each 2x2 block of outputs is ``A^T [(G g G^T) * (B^T d B)] A`` for its 4x4 input patch ``d`` and
the 3x3 kernel ``g``: 16 multiplies instead of 36. Over all tiles and channels the multiplies are 16
matrix products ``U[e] @ V[e]`` (``U [16, K, C]`` the transformed weight, ``V [16, C, tiles]`` the
transformed input), so BLAS does 16/36 of the multiply-adds the im2col product would, and there is
no ``9 C x positions`` im2col matrix. The transforms are additions only (``B``, ``A``) or halves
(``G``), so the result differs from the direct sum by a few float32 roundings.

Used by ``kernels.conv`` with numba, for float32 3x3 convolutions with unit strides and dilations and
one group, on maps big enough for 16 small products to beat one large one (:data:`MIN_TILES`), when
the weight is

- a constant (a read-only array: the session's decoded weights in dense mode, the file's raw ones):
  its transform is computed once and kept beside it (``transformed``, through ``runtime/derived.py``;
  16/9 of its bytes, counted by ``Session.resident_bytes()["now"]``);
- an index-mode weight: tiles of output channels are expanded from the codebook and transformed on
  every call, each tile and its transform together under half of the weight (never a dense copy),
  on bigger maps only (:data:`MIN_TILES_INDEXED`).

The input, output and weight transforms are the ``winograd_input``/``winograd_output``/
``winograd_weights`` numba kernels (``runtime/_numba_conv.py``), with the numpy twins below. The
twins serve the agreement tests only: without numba im2col + BLAS is faster (one core, a 3x3 layer
with as many channels in as out: 64 on 56x56 3.8 against 13.8 ms, 128 on 28x28 1.7 against 7.1 ms,
32 on 32x32 0.38 against 1.29 ms; the same with an index-mode weight, 2.4 against 15.3 ms at 64).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np

from .derived import derived
from .numba_kernels import launch

#: Tiles (2x2 outputs each) per image from which the Winograd form is used: below it the 16 products
#: are too small for BLAS to run at speed. Measured on one core (256 channels in and out, a 14x14
#: map: 49 tiles): 1.5 ms against 2.5 ms for im2col; 512 channels on a 7x7 map (16 tiles): 3.4 against 3.1.
MIN_TILES = 32
#: The same for an index-mode weight, whose tiles are expanded and transformed on every call (work in
#: proportion to the weight, not the map) and are small (half of ``tile_rows``): measured on one core,
#: 64 channels on a 56x56 map (784 tiles) 3.1 -> 1.8 ms, 128 on 28x28 (196) 2.7 -> 2.3 ms, 256 on
#: 14x14 (49) 3.0 -> 4.8 ms.
MIN_TILES_INDEXED = 128

_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def usable(x: np.ndarray, w: Any, strides, dilations, group: int) -> bool:
    """Whether ``conv`` can take the Winograd form for these operands (before the map size check):
    a constant float32 array weight, or an index-mode weight (expanded a tile at a time)."""
    if not (group == 1 and x.ndim == 4 and x.dtype == np.float32 and w.dtype == np.float32
            and tuple(w.shape[2:]) == (3, 3) and tuple(strides) == (1, 1) and tuple(dilations) == (1, 1)):
        return False
    return not w.flags.writeable if isinstance(w, np.ndarray) else hasattr(w, "expand_rows")


def weight_transform(k, w: np.ndarray, u: Optional[np.ndarray] = None) -> np.ndarray:
    """``U [16, K, C]`` (into ``u`` if given): ``G g G^T`` of every 3x3 kernel ``g`` of
    ``w [K, C, 3, 3]``, element ``4a + b``; ``k`` the numba kernels (``winograd_weights``) or None."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if u is None:
        u = np.empty((16,) + w.shape[:2], np.float32)
    if k is not None:
        launch(k, "winograd_weights", u.size, w, u)
        return u
    u[...] = np.einsum("ai,kcij,bj->abkc", _G, w, _G, optimize=True).reshape(u.shape)
    return u


def transformed(k, w: np.ndarray) -> np.ndarray:
    """The kept ``weight_transform`` of a constant weight (dropped when the weight is freed)."""
    return derived(w, "winograd", lambda w: weight_transform(k, w))


def _weight_tiles(k, w: Any, cout: int, cin: int) -> Iterator[Tuple[int, np.ndarray]]:
    """``(a, U of output channels a..)``: the cached whole for a constant array; for an index-mode
    weight, tiles of half its ``tile_rows`` transformed as they are expanded (a tile and its transform
    together stay under half of the weight's float32 bytes: never a dense copy)."""
    if isinstance(w, np.ndarray):
        yield 0, transformed(k, w)
        return
    rows = w.reshape(cout, -1)
    step = max(1, rows.tile_rows() // 2)
    buf = np.empty((min(step, cout), cin * 9), np.float32)
    for a in range(0, cout, step):
        b = min(cout, a + step)
        tile = rows.expand_rows(a, b, buf[:b - a]).reshape(b - a, cin, 3, 3)
        if b - a < step or a == 0:      # one buffer for every full tile
            u = np.empty((16, b - a, cin), np.float32)
        yield a, weight_transform(k, tile, u)


def pays(w: Any, out: Sequence[int]) -> bool:
    """Whether an output map of size ``out`` has the tiles for the Winograd form to pay with ``w``."""
    tiles = -(-int(out[0]) // 2) * -(-int(out[1]) // 2)
    return tiles >= (MIN_TILES if isinstance(w, np.ndarray) else MIN_TILES_INDEXED)


def conv3x3(k, x: np.ndarray, w: Any, b: np.ndarray, lo: np.float32, hi: np.float32, clamp: bool, pads,
            out: Tuple[int, int], block_bytes: int, res: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """``Conv`` of ``x [N, C, H, W]`` with a 3x3 weight (unit strides; see :func:`usable`), or None
    when the map is too small for the Winograd form to pay. ``b`` the float32 bias (empty for none),
    plus ``res`` (a residual Add fused: float32, C-contiguous, of the output's shape), then clamped
    to [lo, hi] with ``clamp``; ``pads`` = (top, left, ...), ``out`` the output size; ``k`` the numba
    kernels or None (numpy twins)."""
    if not pays(w, out):
        return None
    oh, ow = out
    th, tw = -(-oh // 2), -(-ow // 2)
    batch, cin = x.shape[:2]
    cout = int(w.shape[0])
    y = np.empty((batch, cout, oh, ow), np.float32)
    res = _NO_RESIDUAL if res is None else res
    ph, pw = int(pads[0]), int(pads[1])
    rows = batch * th
    step = max(1, block_bytes // (16 * 4 * tw * max(cin, cout)))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        v = np.empty((16, cin, (r1 - r0) * tw), np.float32)
        if k is not None:
            launch(k, "winograd_input", v.size * 2, x, ph, pw, r0, r1, th, v)
        else:
            input_numpy(x, ph, pw, r0, r1, th, v)
        m = None
        for a, u in _weight_tiles(k, w, cout, cin):
            m = np.matmul(u, v, out=m if m is not None and m.shape[1] == u.shape[1] else None)
            if k is not None:
                launch(k, "winograd_output", m.size, m, b, res, lo, hi, clamp, r0, r1, th, a, y)
            else:
                output_numpy(m, b, res, lo, hi, clamp, r0, r1, th, a, y)
    return y


def input_numpy(x: np.ndarray, ph: int, pw: int, r0: int, r1: int, th: int, v: np.ndarray) -> None:
    """numpy twin of the ``winograd_input`` kernel."""
    batch, cin, height, width = x.shape
    tw = v.shape[2] // max(1, r1 - r0)
    xp = np.zeros((batch, cin, 2 * th + 2, 2 * tw + 2), np.float32)     # the tiles' patches, zero-padded
    h, wd = min(height, 2 * th + 2 - ph), min(width, 2 * tw + 2 - pw)
    xp[:, :, ph:ph + h, pw:pw + wd] = x[:, :, :h, :wd]
    patches = np.lib.stride_tricks.sliding_window_view(xp, (4, 4), axis=(2, 3))[:, :, ::2, ::2]
    patches = patches.transpose(0, 2, 1, 3, 4, 5).reshape(batch * th, cin, tw, 4, 4)[r0:r1]
    d = np.einsum("ai,qcjil,bl->abcqj", _BT, patches, _BT, optimize=True)
    v[...] = d.reshape(16, cin, -1)


def output_numpy(m: np.ndarray, bias: np.ndarray, res: np.ndarray, lo: float, hi: float, clamp: bool, r0: int,
                 r1: int, th: int, k0: int, out: np.ndarray) -> None:
    """numpy twin of the ``winograd_output`` kernel."""
    oh, ow = out.shape[2:]
    cout = m.shape[1]
    tw = m.shape[2] // max(1, r1 - r0)
    tiles = np.einsum("ia,abkqj,lb->kqjil", _AT, m.reshape(4, 4, cout, r1 - r0, tw), _AT, optimize=True)
    if bias.size:
        tiles += bias[k0:k0 + cout].reshape(-1, 1, 1, 1, 1)
    if clamp and not res.size:      # with a residual the clamp follows its sum
        np.clip(tiles, np.float32(lo), np.float32(hi), out=tiles)
    for q in range(r0, r1):
        n, i = divmod(q, th)
        rows = min(2, oh - 2 * i)
        block = tiles[:, q - r0].transpose(0, 2, 1, 3).reshape(cout, 2, 2 * tw)
        part = out[n, k0:k0 + cout, 2 * i:2 * i + rows]
        part[...] = block[:, :rows, :ow]
        if res.size:
            part += res[n, k0:k0 + cout, 2 * i:2 * i + rows]
            if clamp:
                np.clip(part, np.float32(lo), np.float32(hi), out=part)


_NO_RESIDUAL = np.zeros((0, 0, 0, 0), np.float32)
