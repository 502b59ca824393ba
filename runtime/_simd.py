"""Vector shuffles that LLVM's vectorizers do not find on their own, as numba intrinsics; import only
through ``numba_kernels.kernels()`` (via the kernel modules).

``transpose8x8`` moves an 8x8 tile of float32 values with eight vector loads, 24 shuffles and eight
vector stores. Written as loops over the tile, the same move compiles to 128 scalar loads and
stores: neither the loop nor the SLP vectorizer forms the shuffles. The shuffles are plain LLVM
``shufflevector``s, so each target lowers them its own way (unpack and lane permutes with AVX,
zips with NEON). Its test is ``tests/test_kernels.py::test_transpose8x8_intrinsic``; the kernels that
use it keep their numpy twins.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F8 = ir.VectorType(ir.FloatType(), 8)
_MASK = ir.VectorType(ir.IntType(32), 8)


def _at(builder: ir.IRBuilder, data: ir.Value, offset: ir.Value) -> ir.Value:
    """A pointer to the 8 floats from ``data[offset]`` (``data``: a float pointer)."""
    return builder.bitcast(builder.gep(data, [offset]), _F8.as_pointer())


def _load(builder: ir.IRBuilder, ptr: ir.Value) -> ir.Value:
    try:    # llvmlite >= 0.44 (opaque pointers) names the loaded type; older ones read it off ptr
        return builder.load(ptr, align=4, typ=_F8)
    except TypeError:
        return builder.load(ptr, align=4)


def _shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, mask: list) -> ir.Value:
    """Lanes of ``a`` (0-7) and ``b`` (8-15) picked by ``mask``."""
    return builder.shuffle_vector(a, b, ir.Constant(_MASK, mask))


def _float32_vector(t: types.Type) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 1 and t.layout == "C"


@intrinsic
def transpose8x8(typingctx, src, s0, s_step, dst, d0, d_step):
    """``dst[d0 + c * d_step + r] = src[s0 + r * s_step + c]`` for ``r, c < 8``: rows of ``src`` from
    ``s0`` (``s_step`` apart) become columns of ``dst`` (1-D C-contiguous float32 arrays; offsets are
    not bounds-checked, as numba's indexing is not)."""
    if not (_float32_vector(src) and _float32_vector(dst)):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_v, s0_v, s_step_v, dst_v, d0_v, d_step_v = args
        sdata = context.make_array(signature.args[0])(context, builder, src_v).data
        ddata = context.make_array(signature.args[3])(context, builder, dst_v).data
        nth = [ir.Constant(s0_v.type, i) for i in range(8)]
        rows = [_load(builder, _at(builder, sdata, builder.add(s0_v, builder.mul(s_step_v, nth[r]))))
                for r in range(8)]
        # 1: rows 2k and 2k+1 interleaved by pairs of columns: (0 1 4 5) and (2 3 6 7)
        pairs = []
        for r in range(0, 8, 2):
            pairs += [_shuffle(builder, rows[r], rows[r + 1], [0, 8, 1, 9, 4, 12, 5, 13]),
                      _shuffle(builder, rows[r], rows[r + 1], [2, 10, 3, 11, 6, 14, 7, 15])]
        # 2: four rows per column, columns (c, c + 4) in the two halves
        quads = []
        for q in (0, 4):
            for a, b in ((pairs[q], pairs[q + 2]), (pairs[q + 1], pairs[q + 3])):
                quads += [_shuffle(builder, a, b, [0, 1, 8, 9, 4, 5, 12, 13]),
                          _shuffle(builder, a, b, [2, 3, 10, 11, 6, 7, 14, 15])]
        # 3: the halves of rows 0-3 and rows 4-7 joined: whole columns
        for c in range(4):
            for col, mask in ((c, [0, 1, 2, 3, 8, 9, 10, 11]), (c + 4, [4, 5, 6, 7, 12, 13, 14, 15])):
                v = _shuffle(builder, quads[c], quads[c + 4], mask)
                builder.store(v, _at(builder, ddata, builder.add(d0_v, builder.mul(d_step_v, nth[col]))), align=4)
        return context.get_dummy_value()

    return sig, codegen
