"""Vector code that LLVM's vectorizers do not find on their own, as numba intrinsics; import only
through ``numba_kernels.kernels()`` (via the kernel modules).

``transpose8x8`` moves an 8x8 tile of float32 values with eight vector loads, 24 shuffles and eight
vector stores. Written as loops over the tile, the same move compiles to 128 scalar loads and
stores: neither the loop nor the SLP vectorizer forms the shuffles. The shuffles are plain LLVM
``shufflevector``s, so each target lowers them its own way (unpack and lane permutes with AVX,
zips with NEON). Its test is ``tests/test_kernels.py::test_transpose8x8_intrinsic``; the kernels that
use it keep their numpy twins.

``pointwise_tile`` is the register tile of a 1x1 convolution: 12 output channels by 16 positions
summed over every input channel in twelve 16-lane accumulators (a 16-lane vector is a zmm register
with AVX-512, a pair of ymm ones or four NEON ones elsewhere), one load of the input row and twelve
broadcast weights a step, from weights packed so that those twelve are adjacent (``PACK``). LLVM
keeps a loop's accumulators in memory when it vectorises the loop itself; here they stay in
registers, and the bias, residual and clamp are applied before the one store. A map's last few
positions (a 7x7 map is 3 x 16 + 1) take ``pointwise_column``: the twelve output channels are the
vector's lanes there, so that a step is one load of twelve packed weights, four broadcast inputs
and four multiply-adds, not the row tile's twelve broadcasts and twelve multiply-adds for one useful
position. ``conv_tile`` is ``pointwise_tile`` reading input row ``c`` at an offset from a table: a
convolution's taps read from its input in place (``_numba_conv.conv_tiles``). Their tests are
``tests/test_kernels.py::test_pointwise_kernel`` and ``test_conv_tiles_read_the_input_in_place``.

Two intrinsics serve pruned (CSR) weights. ``csr_lanes`` sums one CSR row's kept weights times up to
64 rows of ``x`` in four 16-lane registers (``_numba_index.lane_sums``: products of 2-64 rows);
``sliced_dot`` sums 32 rows of a weight at once, two permutes of 16 activations out of a block of
31 held in two registers a slot (``indexed.SlicedRows``, the LSTM's batch-1 recurrence). Their tests are
``test_fc_kernels_agree``, ``test_lstm_csr_kernel_takes_batches_past_one_pass`` and
``test_sliced_dot_reads_the_kept_weights_only``.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .indexed import SlicedRows

_F32 = ir.FloatType()
_F8 = ir.VectorType(_F32, 8)
_MASK = ir.VectorType(ir.IntType(32), 8)
#: Output channels of a ``pointwise_tile`` (weights are packed in groups of PACK rows) and its positions.
PACK = 12
LANES = 16
#: Positions of a ``pointwise_column`` tile.
COLUMNS = 4
#: Independent accumulators a tile keeps at least (``packed_tile`` of fewer rows sums in turns): two
#: multiply-adds a cycle, each waiting four cycles for the one before on the same register.
CHAINS = 8


def _at(builder: ir.IRBuilder, data: ir.Value, offset: ir.Value, vector: ir.Type = _F8) -> ir.Value:
    """A pointer to the ``vector`` from ``data[offset]`` (``data``: a pointer to its element type)."""
    return builder.bitcast(builder.gep(data, [offset]), vector.as_pointer())


def _load(builder: ir.IRBuilder, ptr: ir.Value, typ: ir.Type = _F8) -> ir.Value:
    try:    # llvmlite >= 0.44 (opaque pointers) names the loaded type; older ones read it off ptr
        return builder.load(ptr, align=4, typ=typ)
    except TypeError:
        return builder.load(ptr, align=4)


def _splat(builder: ir.IRBuilder, value: ir.Value, vector: ir.VectorType) -> ir.Value:
    """``value`` (of the vector's element type) in every lane of a ``vector``."""
    undef = ir.Constant(vector, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    lanes = vector.count
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _fmuladd(builder: ir.IRBuilder, vector: ir.VectorType) -> ir.Function:
    """LLVM's ``fmuladd`` on ``vector``s of floats: a fused multiply-add where the target has one."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                          f"llvm.fmuladd.v{vector.count}f32")


def _shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, mask: list) -> ir.Value:
    """Lanes of ``a`` (0-7) and ``b`` (8-15) picked by ``mask``."""
    return builder.shuffle_vector(a, b, ir.Constant(_MASK, mask))


def _vector_of(t: types.Type, dtype: types.Type) -> bool:
    """A 1-D C-contiguous array of ``dtype``."""
    return isinstance(t, types.Array) and t.dtype == dtype and t.ndim == 1 and t.layout == "C"


def _float32_vector(t: types.Type) -> bool:
    return _vector_of(t, types.float32)


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


def _tile_code(wp, x, rows_of, out, bias, res, pack=PACK, lead=()):
    """The typing and code of a register tile of ``pack`` accumulators (None: not these types):
    ``pointwise_tile`` when ``rows_of`` is an integer (input row ``c`` at ``x0 + c * ldx``),
    ``conv_tile`` when it is an int64 array (row ``c`` at ``x0 + offs[c]``); ``lead``: the types of
    arguments before those (not read by the code)."""
    vec = ir.VectorType(_F32, LANES)
    table = isinstance(rows_of, types.Array)
    if not all(_float32_vector(a) for a in (wp, x, out, bias, res)) or (
            table and not (rows_of.dtype == types.int64 and rows_of.ndim == 1 and rows_of.layout == "C")):
        return None
    i = types.intp
    sig = types.void(*lead, wp, i, x, i, rows_of if table else i, i, out, i, i, i, bias, i, res, types.float32,
                     types.float32, i)

    def codegen(context, builder, signature, args):
        types_of, args = signature.args[len(lead):], args[len(lead):]
        wp_v, w0_v, x_v, x0_v, ldx_v, k_v, out_v, o0_v, ldo_v, rows_v, b_v, b0_v, r_v, lo_v, hi_v, flags_v = args
        wd, xd, od, bd, rd = [context.make_array(types_of[n])(context, builder, args[n]).data
                              for n in (0, 2, 6, 10, 12)]
        td = context.make_array(types_of[4])(context, builder, ldx_v).data if table else None
        const = lambda n: ir.Constant(k_v.type, n)      # noqa: E731
        has = [builder.icmp_signed("!=", builder.and_(flags_v, const(bit)), const(0)) for bit in (1, 2, 4, 8)]
        fma = _fmuladd(builder, vec)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(pack)]
        with builder.if_then(has[3]):
            for r in range(pack):       # summing onto ``out``'s values (a later chunk of the inputs)
                with builder.if_then(builder.icmp_signed("<", const(r), rows_v)):
                    at = builder.add(o0_v, builder.mul(const(r), ldo_v))
                    builder.store(_load(builder, _at(builder, od, at, vec), vec), accs[r])

        def step(c, sums):
            """Input row ``c`` times its ``pack`` weights onto ``sums``."""
            row = _load(builder, builder.gep(td, [c]), ir.IntType(64)) if table else builder.mul(c, ldx_v)
            xv = _load(builder, _at(builder, xd, builder.add(x0_v, row), vec), vec)
            wrow = builder.add(w0_v, builder.mul(c, const(pack)))
            for r in range(pack):
                w = _load(builder, builder.gep(wd, [builder.add(wrow, const(r))]), _F32)
                builder.store(builder.call(fma, [_splat(builder, w, vec), xv, builder.load(sums[r])]), sums[r])

        # under CHAINS accumulators, each waited on its last multiply-add (the FMA's latency): the
        # inputs go in turns to ``chains`` sets of them, summed at the end
        chains = max(1, CHAINS // pack)
        sets = [accs] + [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(pack)]
                         for _ in range(chains - 1)]
        whole = builder.sub(k_v, builder.srem(k_v, const(chains)))
        with cgutils.for_range_slice(builder, const(0), whole, const(chains)) as (c, _):
            for j, sums in enumerate(sets):
                step(builder.add(c, const(j)), sums)
        with cgutils.for_range_slice(builder, whole, k_v, const(1)) as (c, _):
            step(c, accs)
        for sums in sets[1:]:
            for r in range(pack):
                builder.store(builder.fadd(builder.load(accs[r]), builder.load(sums[r])), accs[r])
        lo_s, hi_s = _splat(builder, lo_v, vec), _splat(builder, hi_v, vec)
        for r in range(pack):
            with builder.if_then(builder.icmp_signed("<", const(r), rows_v)):
                at = builder.add(o0_v, builder.mul(const(r), ldo_v))
                acc = cgutils.alloca_once_value(builder, builder.load(accs[r]))
                with builder.if_then(has[0]):
                    b = _load(builder, builder.gep(bd, [builder.add(b0_v, const(r))]), _F32)
                    builder.store(builder.fadd(builder.load(acc), _splat(builder, b, vec)), acc)
                with builder.if_then(has[1]):
                    r_vec = _load(builder, _at(builder, rd, at, vec), vec)
                    builder.store(builder.fadd(builder.load(acc), r_vec), acc)
                with builder.if_then(has[2]):
                    v = builder.load(acc)
                    v = builder.select(builder.fcmp_ordered("<", v, lo_s), lo_s, v)
                    builder.store(builder.select(builder.fcmp_ordered(">", v, hi_s), hi_s, v), acc)
                builder.store(builder.load(acc), _at(builder, od, at, vec), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def pointwise_tile(typingctx, wp, w0, x, x0, ldx, k, out, o0, ldo, rows, bias, b0, res, lo, hi, flags):
    """``out[o0 + i * ldo + j] = clamp(sum_c wp[w0 + c * PACK + i] * x[x0 + c * ldx + j] + bias[b0 + i]
    + res[o0 + i * ldo + j])`` for ``i < rows`` (<= PACK) and ``j < LANES``, over ``c < k``. ``flags``:
    1 adds the bias, 2 the residual ``res`` (laid out as ``out``), 4 clamps to [lo, hi] (NaN stays NaN,
    as ``np.clip``), 8 sums onto ``out``'s values instead of zeros. All arrays 1-D C-contiguous float32;
    offsets are not bounds-checked. The products are fused multiply-adds where the target has them
    (``llvm.fmuladd``)."""
    return _tile_code(wp, x, ldx, out, bias, res)


@intrinsic
def packed_tile(typingctx, pack, wp, w0, x, x0, ldx, k, out, o0, ldo, rows, bias, b0, res, lo, hi, flags):
    """``pointwise_tile`` of ``pack`` accumulators (a constant up to PACK; the weights packed ``pack`` a
    row): fewer rows cost fewer multiply-adds (the recurrent kernels' batches, ``_numba_rnn._tiled_rows``:
    two entries took twelve accumulators' work)."""
    if not (isinstance(pack, types.IntegerLiteral) and 1 <= pack.literal_value <= PACK):
        return None
    return _tile_code(wp, x, ldx, out, bias, res, pack.literal_value, (pack,))


@intrinsic
def conv_tile(typingctx, wp, w0, x, x0, offs, k, out, o0, ldo, rows, bias, b0, res, lo, hi, flags):
    """``pointwise_tile`` with input row ``c`` at ``x[x0 + offs[c]]`` (``offs``: 1-D int64): the taps of
    a convolution read in place, each row ``LANES`` adjacent input values (``_numba_conv.conv_tiles``)."""
    return _tile_code(wp, x, offs, out, bias, res)


@intrinsic
def pointwise_column(typingctx, wp, w0, x, x0, ldx, k, out, o0, ldo, rows, bias, b0):
    """``out[o0 + i * ldo + j] = sum_c wp[w0 + c * PACK + i] * x[x0 + c * ldx + j] + bias[b0 + i]`` for
    ``i < rows`` (<= PACK) and ``j < COLUMNS``, over ``c < k``; no bias when ``bias`` is empty. As
    ``pointwise_tile``, but the lanes of a vector are the PACK output channels and each of the
    COLUMNS positions has its own accumulators (two: even and odd input channels, so that the chains
    of multiply-adds overlap)."""
    if not all(_float32_vector(a) for a in (wp, x, out, bias)):
        return None
    i = types.intp
    sig = types.void(wp, i, x, i, i, i, out, i, i, i, bias, i)
    vec = ir.VectorType(_F32, PACK)

    def codegen(context, builder, signature, args):
        wp_v, w0_v, x_v, x0_v, ldx_v, k_v, out_v, o0_v, ldo_v, rows_v, b_v, b0_v = args
        wd, xd, od, bd = [context.make_array(signature.args[n])(context, builder, args[n]).data for n in (0, 2, 6, 10)]
        const = lambda n: ir.Constant(k_v.type, n)      # noqa: E731
        fma = _fmuladd(builder, vec)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(COLUMNS)] for _ in range(2)]

        def step(c, half):
            wv = _load(builder, _at(builder, wd, builder.add(w0_v, builder.mul(c, const(PACK))), vec), vec)
            xrow = builder.add(x0_v, builder.mul(c, ldx_v))
            for j in range(COLUMNS):
                xs = _load(builder, builder.gep(xd, [builder.add(xrow, const(j))]), _F32)
                acc = accs[half][j]
                builder.store(builder.call(fma, [_splat(builder, xs, vec), wv, builder.load(acc)]), acc)

        with cgutils.for_range(builder, builder.sdiv(k_v, const(2))) as loop:
            c = builder.mul(loop.index, const(2))
            step(c, 0)
            step(builder.add(c, const(1)), 1)
        with builder.if_then(builder.icmp_signed("!=", builder.srem(k_v, const(2)), const(0))):
            step(builder.sub(k_v, const(1)), 0)
        has_bias = builder.icmp_signed(">", context.make_array(signature.args[10])(context, builder, b_v).nitems,
                                       const(0))
        sums = [builder.fadd(builder.load(accs[0][j]), builder.load(accs[1][j])) for j in range(COLUMNS)]
        for r in range(PACK):
            with builder.if_then(builder.icmp_signed("<", const(r), rows_v)):
                b = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
                with builder.if_then(has_bias):
                    builder.store(_load(builder, builder.gep(bd, [builder.add(b0_v, const(r))]), _F32), b)
                row = builder.add(o0_v, builder.mul(const(r), ldo_v))
                for j in range(COLUMNS):
                    v = builder.fadd(builder.extract_element(sums[j], ir.Constant(ir.IntType(32), r)), builder.load(b))
                    builder.store(v, builder.gep(od, [builder.add(row, const(j))]))
        return context.get_dummy_value()

    return sig, codegen


def _lane_pointers(builder: ir.IRBuilder, data: ir.Value, index: ir.Value) -> ir.Value:
    """``&data[index[l]]`` for every lane ``l`` (``data``: a float pointer, ``index``: a vector of
    non-negative i32), one ``getelementptr`` of ``data`` by the vector, so that LLVM finds the base
    and the 32-bit indices a gather or scatter instruction takes (pointers summed as 64-bit integers
    made two ``vgatherqps`` of 8 lanes each with AVX-512). llvmlite builds a GEP of scalar indices
    only, so the vector index is put in afterwards."""
    gep = builder.gep(data, [ir.Constant(ir.IntType(32), 0)])
    gep.indices, gep.operands = [index], [data, index]
    gep.type = ir.VectorType(gep.type, index.type.count)
    return gep


def _masked(builder: ir.IRBuilder, pointers: ir.Value, value: ir.Value = None) -> ir.Value:
    """LLVM's masked gather of 16 floats from ``pointers`` (``value`` None) or scatter of ``value`` to
    them, every lane on: one instruction with AVX-512, scalar loads or stores where the target has none."""
    lanes = pointers.type.count
    vec, mask = ir.VectorType(_F32, lanes), ir.VectorType(ir.IntType(1), lanes)
    flags = [ir.Constant(ir.IntType(32), 4), ir.Constant(mask, [1] * lanes)]
    gather = value is None
    operands = [pointers, *flags, ir.Constant(vec, [0.0] * lanes)] if gather else [value, pointers, *flags]
    opaque = str(pointers.type.element) == "ptr"
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec if gather else ir.VoidType(), [o.type for o in operands]),
        f"llvm.masked.{'gather' if gather else 'scatter'}.v{lanes}f32.v{lanes}p0{'' if opaque else 'f32'}")
    return builder.call(fn, operands)


def _gather(builder: ir.IRBuilder, data: ir.Value, index: ir.Value) -> ir.Value:
    """``data[index[l]]`` for every lane ``l`` (``sliced_dot`` without AVX-512, ``centroids``)."""
    return _masked(builder, _lane_pointers(builder, data, index))


def _scatter(builder: ir.IRBuilder, value: ir.Value, data: ir.Value, index: ir.Value) -> None:
    """``data[index[l]] = value[l]`` for every lane ``l`` (distinct indices)."""
    _masked(builder, _lane_pointers(builder, data, index), value)


@intrinsic
def centroids(typingctx, codebook, symbols, values):
    """``values[e] = codebook[symbols[e]]`` for every ``e < values.size`` (``symbols`` at least as
    long), 16 at a time by a gather (a scalar loop's load, load and store per value was load-bound:
    the default plan's LSTM ``R`` in slices, 32,832 values, 9.7-15.2 -> 7-12 us a call here), the
    values past a multiple of 16 one by one. ``codebook``, ``values``: 1-D C-contiguous float32,
    ``symbols`` uint8/uint16; symbols are not bounds-checked."""
    if not (_float32_vector(codebook) and _float32_vector(values) and _index_vector(symbols)
            and symbols.dtype.bitwidth <= 16):
        return None
    sig = types.void(codebook, symbols, values)

    def codegen(context, builder, signature, args):
        bd, sd, vd = [context.make_array(signature.args[n])(context, builder, args[n]).data for n in range(3)]
        count = context.make_array(signature.args[2])(context, builder, args[2]).nitems
        width, step = signature.args[1].dtype.bitwidth, ir.Constant(count.type, LANES)
        vec, index, packed = (ir.VectorType(t, LANES) for t in (_F32, ir.IntType(32), ir.IntType(width)))
        whole = builder.mul(builder.sdiv(count, step), step)
        with cgutils.for_range_slice(builder, ir.Constant(count.type, 0), whole, step) as (e, _):
            at = builder.zext(_load(builder, _at(builder, sd, e, packed), packed), index)
            builder.store(_gather(builder, bd, at), _at(builder, vd, e, vec), align=4)
        with cgutils.for_range_slice(builder, whole, count, ir.Constant(count.type, 1)) as (e, _):
            builder.store(_load(builder, builder.gep(bd, [_entry(builder, sd, e, width)]), _F32), builder.gep(vd, [e]))
        return context.get_dummy_value()

    return sig, codegen


def _index_vector(t: types.Type) -> bool:
    """A 1-D C-contiguous array of unsigned integers or int32 (CSR columns: uint16 or int32)."""
    return (isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and isinstance(t.dtype, types.Integer)
            and (not t.dtype.signed or t.dtype == types.int32))


#: Rows of a slice of ``indexed.SlicedRows`` (SLICE // LANES registers) and columns of a block; a
#: block's activations and the zero that its padding lanes read make a table of two 16-lane
#: registers (TABLE floats).
SLICE, BLOCK = SlicedRows.ROWS, SlicedRows.BLOCK
TABLE = BLOCK + 1


def _permutes(context) -> bool:
    """Whether numba compiles for x86 with AVX-512, whose ``vpermi2ps`` picks 16 lanes out of two
    registers (one instruction, against ~18 cycles for a 16-lane gather on the machine measured)."""
    triple, _, features = context.codegen().magic_tuple()
    return triple.startswith("x86_64") and "+avx512f" in features.split(",")


@intrinsic
def sliced_dot(typingctx, x, slot_ptr, cols, values, p0, blocks, order, o0, out):
    """One slice of ``indexed.SlicedRows``: SLICE rows side by side, ``out[order[o0 + l]] = sum_b sum_e
    x[b * TABLE + cols[e * SLICE + l]] * values[e * SLICE + l]`` over the blocks ``b < blocks`` and
    their slots ``slot_ptr[p0 + b] <= e < slot_ptr[p0 + b + 1]``, for ``l < SLICE``. The sums go to
    their rows by a scatter (one instruction a register with AVX-512, scalar stores elsewhere), where
    a loop after the product put them back one by one (the default plan's LSTM classifier, its kernel
    in one process: 64.0-75.5 -> 61.6-73.6 us). ``x`` holds the activations in blocks of BLOCK, each
    followed by a zero: the padding lanes' column, so that an inf or NaN activation cannot reach a
    row that has no weight for it. A block's table stays in two registers, and a slot is, for each
    of its 16-lane halves, one permute of the table by its columns (a gather from the table where
    the target has no AVX-512), one load of the weights (their centroids, looked up once for all the
    steps of a call) and a multiply-add. ``x``, ``values``, ``out``: 1-D C-contiguous float32;
    ``slot_ptr``, ``order`` int32, ``cols`` uint8; offsets and rows are not bounds-checked."""
    if not (all(_float32_vector(a) for a in (x, values, out)) and _vector_of(slot_ptr, types.int32)
            and _vector_of(order, types.int32) and _vector_of(cols, types.uint8)):
        return None
    i = types.intp
    sig = types.void(x, slot_ptr, cols, values, i, i, order, i, out)

    def codegen(context, builder, signature, args):
        xd, pd, cd, vd, rd, od = [context.make_array(signature.args[n])(context, builder, args[n]).data
                                  for n in (0, 1, 2, 3, 6, 8)]
        p0, blocks, o0 = args[4], args[5], args[7]
        intp = p0.type
        vec, index, lanes = (ir.VectorType(t, LANES) for t in (_F32, ir.IntType(32), ir.IntType(8)))
        fma = _fmuladd(builder, vec)
        permute = _permutes(context) and cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, index, vec]), "llvm.x86.avx512.vpermi2var.ps.512")
        halves, one = [ir.Constant(intp, g * LANES) for g in range(SLICE // LANES)], ir.Constant(intp, 1)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in halves]

        with cgutils.for_range(builder, blocks) as loop:
            b = loop.index
            table = builder.gep(xd, [builder.mul(b, ir.Constant(intp, TABLE))])
            low, high = (_load(builder, _at(builder, table, ir.Constant(intp, n), vec), vec) for n in (0, LANES))
            k = builder.add(p0, b)
            with cgutils.for_range_slice(builder, _pointer(builder, pd, k), _pointer(builder, pd, builder.add(k, one)),
                                         one) as (e, _):
                for half, acc in zip(halves, accs):
                    at = builder.add(builder.mul(e, ir.Constant(intp, SLICE)), half)
                    column = builder.zext(_load(builder, _at(builder, cd, at, lanes), lanes), index)
                    xs = builder.call(permute, [low, column, high]) if permute else _gather(builder, table, column)
                    ws = _load(builder, _at(builder, vd, at, vec), vec)
                    builder.store(builder.call(fma, [xs, ws, builder.load(acc)]), acc)
        for half, acc in zip(halves, accs):
            rows = _load(builder, _at(builder, rd, builder.add(o0, half), index), index)
            _scatter(builder, builder.load(acc), od, rows)
        return context.get_dummy_value()

    return sig, codegen


#: Most 16-lane register sums of a ``csr_lanes`` call: 64 rows of x, the CSR kernels' largest batch.
LANE_GROUPS = 4


@intrinsic
def csr_lanes(typingctx, xt, x0, ldx, groups, row_ptr, cols, symbols, codebook, n0, n1, out, o0, ldo):
    """``out[o0 + (n - n0) * ldo + l] = sum_e codebook[symbols[e]] * xt[x0 + cols[e] * ldx + l]`` over
    the kept weights ``row_ptr[n] <= e < row_ptr[n + 1]`` of each CSR row ``n0 <= n < n1``, for
    ``l < groups * LANES`` (``groups`` <= LANE_GROUPS): that many rows of ``x`` side by side (``xt``:
    x transposed, rows ``ldx`` apart), summed in ``groups`` registers, each kept weight read once (a
    broadcast centroid and a multiply-add per register). The loop over the rows is in here, below
    the choice of the register count: a row keeps ~6 weights at 90 % pruning, so that what a row
    costs besides them counts (512x64 at 10 %, 16 rows of x: 5.0-5.4 -> 4.4-4.8 us). ``xt``,
    ``codebook``, ``out``: 1-D C-contiguous float32; ``row_ptr`` int32, ``cols`` uint16/int32,
    ``symbols`` uint8/uint16; offsets are not bounds-checked."""
    if not (all(_float32_vector(a) for a in (xt, codebook, out)) and all(_index_vector(a) for a in (cols, symbols))
            and _vector_of(row_ptr, types.int32)):
        return None
    i = types.intp
    sig = types.void(xt, i, i, i, row_ptr, cols, symbols, codebook, i, i, out, i, i)

    def codegen(context, builder, signature, args):
        xd, pd, cd, sd, bd, od = [context.make_array(signature.args[n])(context, builder, args[n]).data
                                  for n in (0, 4, 5, 6, 7, 10)]

        def bounds(n):
            return _pointer(builder, pd, n), _pointer(builder, pd, builder.add(n, ir.Constant(n.type, 1)))

        def entry(e, e0):
            return (_entry(builder, cd, e, signature.args[5].dtype.bitwidth),
                    _entry(builder, sd, e, signature.args[6].dtype.bitwidth))
        _lane_rows(builder, xd, bd, od, *(args[n] for n in (1, 2, 3, 8, 9, 11, 12)), bounds, entry)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def index_lanes(typingctx, xt, x0, ldx, groups, indices, k, codebook, n0, n1, out, o0, ldo):
    """:func:`csr_lanes` for a weight of dense indices ``[N, k]`` (``indices`` flat, uint8/uint16):
    every column of a row, ``codebook[indices[n * k + c]]`` times row ``c`` of ``xt``, each row of
    the weight expanded once for up to 64 rows of ``x`` (the default plan's LSTM input projection, 16
    steps of its 60 %-pruned 512x64 ``W``: expanded tiles and BLAS 46 us, this ~21 in the kernel)."""
    if not (all(_float32_vector(a) for a in (xt, codebook, out)) and _index_vector(indices)):
        return None
    i = types.intp
    sig = types.void(xt, i, i, i, indices, i, codebook, i, i, out, i, i)

    def codegen(context, builder, signature, args):
        xd, sd, bd, od = [context.make_array(signature.args[n])(context, builder, args[n]).data for n in (0, 4, 6, 9)]
        k = args[5]

        def bounds(n):
            e0 = builder.mul(n, k)
            return e0, builder.add(e0, k)

        def entry(e, e0):
            return builder.sub(e, e0), _entry(builder, sd, e, signature.args[4].dtype.bitwidth)
        _lane_rows(builder, xd, bd, od, *(args[n] for n in (1, 2, 3, 7, 8, 10, 11)), bounds, entry)
        return context.get_dummy_value()

    return sig, codegen


#: Columns of ``x`` an ``index_tile`` holds in registers: 16 of the 32 zmm registers, the rest for
#: the sums and the broadcast centroids.
TILE_COLUMNS = 16


@intrinsic
def index_tile(typingctx, xt, x0, ldx, indices, k, codebook, n0, n1, out, o0, ldo):
    """:func:`index_lanes` for one register of sums (up to 16 rows of ``x``: an LSTM's 16 steps), with
    the rows of ``xt`` held in registers TILE_COLUMNS at a time: every weight is then one load of its
    index and one multiply-add by its broadcast centroid (``index_lanes`` also loads its row of
    ``xt``, and its sums wait on each other). The default plan's LSTM input projection, 16 steps of
    its 512x64 ``W``, one core, one process: 20-30 -> 12-13 us. Columns past a multiple of
    TILE_COLUMNS are summed one at a time."""
    if not (all(_float32_vector(a) for a in (xt, codebook, out)) and _index_vector(indices)):
        return None
    i = types.intp
    sig = types.void(xt, i, i, indices, i, codebook, i, i, out, i, i)

    def codegen(context, builder, signature, args):
        xd, sd, bd, od = [context.make_array(signature.args[n])(context, builder, args[n]).data for n in (0, 3, 5, 8)]
        x0, ldx, k, n0, n1, o0, ldo = (args[n] for n in (1, 2, 4, 6, 7, 9, 10))
        vec, const = ir.VectorType(_F32, LANES), (lambda v: ir.Constant(k.type, v))
        fma = _fmuladd(builder, vec)

        def weight(n, c):
            symbol = _entry(builder, sd, builder.add(builder.mul(n, k), c), signature.args[3].dtype.bitwidth)
            return _splat(builder, _load(builder, builder.gep(bd, [symbol]), _F32), vec)

        def rows(body):
            """``body(n, sums)`` for each weight row ``n``: ``sums`` points at its 16 lanes of ``out``."""
            with cgutils.for_range_slice(builder, n0, n1, const(1)) as (n, _):
                body(n, _at(builder, od, builder.add(o0, builder.mul(builder.sub(n, n0), ldo)), vec))

        def x_row(c):
            return _load(builder, _at(builder, xd, builder.add(x0, builder.mul(c, ldx)), vec), vec)

        rows(lambda n, sums: builder.store(ir.Constant(vec, None), sums, align=4))
        tiles = builder.sdiv(k, const(TILE_COLUMNS))
        with cgutils.for_range(builder, tiles) as loop:
            c0 = builder.mul(loop.index, const(TILE_COLUMNS))
            xs = [x_row(builder.add(c0, const(j))) for j in range(TILE_COLUMNS)]

            def tile(n, sums):      # two chains of multiply-adds, so that each waits half as long
                acc = [_load(builder, sums, vec), ir.Constant(vec, None)]
                for j, xv in enumerate(xs):
                    acc[j % 2] = builder.call(fma, [weight(n, builder.add(c0, const(j))), xv, acc[j % 2]])
                builder.store(builder.fadd(acc[0], acc[1]), sums, align=4)
            rows(tile)

        def rest(n, sums):
            acc = cgutils.alloca_once_value(builder, _load(builder, sums, vec))
            with cgutils.for_range_slice(builder, builder.mul(tiles, const(TILE_COLUMNS)), k, const(1)) as (c, _):
                builder.store(builder.call(fma, [weight(n, c), x_row(c), builder.load(acc)]), acc)
            builder.store(builder.load(acc), sums, align=4)
        rows(rest)
        return context.get_dummy_value()

    return sig, codegen


def _pointer(builder: ir.IRBuilder, data: ir.Value, k: ir.Value) -> ir.Value:
    """``data[k]`` of an int32 array of pointers (CSR rows, slices' blocks) as ``k``'s integer type."""
    return builder.sext(_load(builder, builder.gep(data, [k]), ir.IntType(32)), k.type)


def _entry(builder: ir.IRBuilder, data: ir.Value, e: ir.Value, width: int) -> ir.Value:
    """``data[e]`` (an unsigned integer of ``width`` bits) as i64."""
    return builder.zext(_load(builder, builder.gep(data, [e]), ir.IntType(width)), ir.IntType(64))


def _lane_rows(builder, xd, bd, od, x0_v, ldx_v, groups_v, n0_v, n1_v, o0_v, ldo_v, bounds, entry) -> None:
    """The loops of :func:`csr_lanes` and :func:`index_lanes`: for each row ``n``, its entries
    ``bounds(n)`` = ``[e0, e1)``, each ``entry(e, e0)`` = (column, symbol), summed as described there."""
    vec, i64 = ir.VectorType(_F32, LANES), ir.IntType(64)
    fma = _fmuladd(builder, vec)

    def add(e, e0, accs):
        column, symbol = entry(e, e0)
        row = builder.add(x0_v, builder.mul(column, ldx_v))
        w = _splat(builder, _load(builder, builder.gep(bd, [symbol]), _F32), vec)
        for g, acc in enumerate(accs):
            xv = _load(builder, _at(builder, xd, builder.add(row, ir.Constant(i64, g * LANES)), vec), vec)
            builder.store(builder.call(fma, [w, xv, builder.load(acc)]), acc)

    for count in range(1, LANE_GROUPS + 1):     # a loop for each number of registers
        with builder.if_then(builder.icmp_signed("==", groups_v, ir.Constant(groups_v.type, count))):
            # one or two registers take the kept weights in turns into two sets of sums, so
            # that each multiply-add does not wait for the one before (the FMA's latency)
            sets = [[cgutils.alloca_once(builder, vec) for _ in range(count)] for _ in range(2 if count <= 2 else 1)]
            step = ir.Constant(i64, len(sets))
            with cgutils.for_range_slice(builder, n0_v, n1_v, ir.Constant(n0_v.type, 1)) as (n, _):
                e0_v, e1_v = bounds(n)
                for accs in sets:
                    for acc in accs:
                        builder.store(ir.Constant(vec, None), acc)
                mid = builder.sub(e1_v, builder.srem(builder.sub(e1_v, e0_v), step))
                with cgutils.for_range_slice(builder, e0_v, mid, step) as (e, _):
                    for s, accs in enumerate(sets):
                        add(builder.add(e, ir.Constant(i64, s)), e0_v, accs)
                with cgutils.for_range_slice(builder, mid, e1_v, ir.Constant(i64, 1)) as (e, _):
                    add(e, e0_v, sets[0])
                o = builder.add(o0_v, builder.mul(builder.sub(n, n0_v), ldo_v))
                for g in range(count):
                    total = builder.load(sets[0][g])
                    for accs in sets[1:]:
                        total = builder.fadd(total, builder.load(accs[g]))
                    builder.store(total, _at(builder, od, builder.add(o, ir.Constant(i64, g * LANES)), vec), align=4)
