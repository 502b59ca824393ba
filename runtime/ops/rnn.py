"""Recurrent operators: LSTM, GRU and RNN (forward, reverse, bidirectional).

The input projection of all time steps is one ``matmul_t`` per direction; each step then adds
``matmul_t(h, R)``. ``W`` and ``R`` (``[directions, gates * hidden, ...]``) may be indexed weights:
they are only sliced along their leading axis and handed to the kernels.

``sequence_lens`` is honoured: past its length a batch entry's state stops changing and its outputs
are zero; the reverse direction starts at the last valid step of each sequence; an entry of length 0
has zero final states (``Y_h``, ``Y_c``), as onnxruntime gives, not its initial ones. ``layout=1`` means
batch-major inputs and outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import kernels
from ..indexed import IndexedWeight, SlicedRows, SparseWeight, TableRows, call_bound, step_product
from ..numba_kernels import wide_vectors
from dcrt.errors import InputError, UnsupportedOperatorError

from . import register
from .elementwise import sigmoid

Attrs = Dict[str, Any]
Activation = Callable[[np.ndarray], np.ndarray]


def _activation(name: str, alpha: Optional[float], beta: Optional[float]) -> Activation:
    """An activation function by its ONNX RNN name, with its optional alpha/beta."""
    key = name.decode() if isinstance(name, bytes) else name
    key = key.lower()
    if key == "sigmoid":
        return sigmoid
    if key == "tanh":
        return np.tanh
    if key == "relu":
        return lambda v: np.maximum(v, 0)
    if key == "leakyrelu":
        a = 0.01 if alpha is None else alpha
        return lambda v: np.where(v >= 0, v, a * v)
    if key == "thresholdedrelu":
        a = 1.0 if alpha is None else alpha
        return lambda v: np.where(v > a, v, 0)
    if key == "scaledtanh":
        a, b = (1.0 if alpha is None else alpha), (1.0 if beta is None else beta)
        return lambda v: a * np.tanh(b * v)
    if key == "hardsigmoid":
        a, b = (0.2 if alpha is None else alpha), (0.5 if beta is None else beta)
        return lambda v: np.clip(a * v + b, 0, 1)
    if key == "elu":
        a = 1.0 if alpha is None else alpha
        return lambda v: np.where(v > 0, v, a * np.expm1(np.minimum(v, 0)))
    if key == "softsign":
        return lambda v: v / (1 + np.abs(v))
    if key == "softplus":
        return lambda v: np.logaddexp(0, v)
    if key == "affine":
        a, b = (1.0 if alpha is None else alpha), (0.0 if beta is None else beta)
        return lambda v: a * v + b
    raise UnsupportedOperatorError(f"RNN activation '{name}'")


_TAKES_ALPHA = {"leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu", "affine"}
_TAKES_BETA = {"scaledtanh", "hardsigmoid", "affine"}


def _activations(attrs: Attrs, defaults: Sequence[str], directions: int) -> List[List[Activation]]:
    """Per direction, the activation functions (``activations`` attribute or the defaults).

    ``activation_alpha``/``activation_beta`` are consumed in order by the functions that take them.
    Worked out once per node (and number of directions): ~1.7 us a call otherwise.
    """
    known = attrs.get("_activations")
    if known is not None and known[0] == directions:
        return known[1]
    names = list(attrs.get("activations") or list(defaults) * directions)
    if len(names) == len(defaults) and directions == 2:
        names = names * 2
    alphas = list(attrs.get("activation_alpha") or [])
    betas = list(attrs.get("activation_beta") or [])
    funcs = []
    for name in names:
        key = (name.decode() if isinstance(name, bytes) else name).lower()
        alpha = alphas.pop(0) if key in _TAKES_ALPHA and alphas else None
        beta = betas.pop(0) if key in _TAKES_BETA and betas else None
        funcs.append(_activation(name, alpha, beta))
    n = len(defaults)
    result = [funcs[d * n:(d + 1) * n] for d in range(directions)]
    attrs["_activations"] = (directions, result)
    return result


def _reverse_within(x: np.ndarray, lengths: Optional[np.ndarray]) -> np.ndarray:
    """Reverse ``[T, B, ...]`` along time, each batch entry within its own length."""
    if lengths is None:
        return x[::-1]
    steps = x.shape[0]
    t = np.arange(steps)[:, None]
    n = lengths[None, :]
    src = np.where(t < n, n - 1 - t, t)  # [T, B]: padding steps stay where they are
    return np.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=0)


class _Recurrence:
    """What the three operators share: directions, layout, sequence lengths, clipping."""

    def __init__(self, attrs: Attrs, x: np.ndarray, w: Any, seq_lens: Optional[np.ndarray],
                 gates: int):
        self.attrs = attrs
        self.batch_major = bool(attrs.get("layout", 0))
        self.x = np.swapaxes(x, 0, 1) if self.batch_major else x  # [T, B, I]
        self.directions = int(w.shape[0])
        self.hidden = int(attrs.get("hidden_size") or w.shape[1] // gates)
        self.steps, self.batch = self.x.shape[:2]
        self.clip = attrs.get("clip")
        self.dtype = x.dtype
        lens = None if seq_lens is None else np.asarray(seq_lens).astype(np.int64).reshape(-1)
        if lens is not None and (lens.shape != (self.batch,) or lens.min(initial=0) < 0
                                 or lens.max(initial=0) > self.steps):
            raise InputError(f"sequence_lens {np.asarray(seq_lens).tolist()} must give one length in 0..{self.steps} "
                             f"(the sequence's steps) for each of the {self.batch} batch entries")
        if lens is not None and np.all(lens >= self.steps):
            lens = None  # every sequence is full length: no masking needed
        self.lens = lens

    def initial(self, state: Optional[np.ndarray]) -> np.ndarray:
        """An initial state as ``[directions, B, H]`` (zeros when absent)."""
        if state is None:
            return np.zeros((self.directions, self.batch, self.hidden), dtype=self.dtype)
        return np.swapaxes(state, 0, 1) if self.batch_major else state

    def inputs(self, direction: int) -> np.ndarray:
        """The time-major input in processing order for a direction."""
        reverse = self.direction_is_reverse(direction)
        return _reverse_within(self.x, self.lens) if reverse else self.x

    def direction_is_reverse(self, direction: int) -> bool:
        mode = self.attrs.get("direction", "forward")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        return mode == "reverse" or (mode == "bidirectional" and direction == 1)

    def clipped(self, v: np.ndarray) -> np.ndarray:
        return v if self.clip is None else np.clip(v, -self.clip, self.clip)

    def active(self, t: int) -> Optional[np.ndarray]:
        """``[B, 1]`` mask of the batch entries still inside their sequence at step ``t``."""
        return None if self.lens is None else (t < self.lens)[:, None]

    def finish(self, direction: int, ys: List[np.ndarray]) -> np.ndarray:
        """Stack a direction's per-step outputs back into time order: ``[T, B, H]``."""
        y = np.stack(ys) if ys else np.zeros((0, self.batch, self.hidden), dtype=self.dtype)
        if self.lens is not None:
            y = np.where((np.arange(self.steps)[:, None] < self.lens[None, :])[..., None], y, 0)
        return _reverse_within(y, self.lens) if self.direction_is_reverse(direction) else y

    def empty(self, states: int) -> Tuple[np.ndarray, ...]:
        """The outputs of an empty batch, computed by no kernel: the compiled ones take a batch of 0
        for their batch-1 path and would write past their arrays."""
        ys = [np.zeros((self.steps, 0, self.hidden), self.dtype)] * self.directions
        return self.outputs(ys, [np.zeros((self.directions, 0, self.hidden), self.dtype)] * states)

    def outputs(self, ys: List[np.ndarray], states: List[np.ndarray]) -> Tuple[np.ndarray, ...]:
        """``Y [T, D, B, H]`` (or ``[B, T, D, H]``) and each final state ``[D, B, H]`` (or ``[B, D, H]``)."""
        y = _stack(ys, axis=1).astype(self.dtype, copy=False)
        finals = [s.astype(self.dtype, copy=False) for s in states]
        if self.lens is not None and not self.lens.all():   # the spec is silent; onnxruntime answers zeros
            finals = [np.where((self.lens == 0)[:, None], 0, s).astype(self.dtype, copy=False) for s in finals]
        if self.batch_major:
            y = y.transpose(2, 0, 1, 3)
            finals = [np.swapaxes(s, 0, 1) for s in finals]
        return (y, *finals)


def _stack(arrays: List[np.ndarray], axis: int = 0) -> np.ndarray:
    """``np.stack``; for one direction whose array owns its data (made by the operator, not a view of
    an input), a view with the new axis: no copy (an LSTM classifier's three outputs: ~6 us less)."""
    if len(arrays) == 1 and arrays[0].base is None:
        a = arrays[0]
        return a.reshape(a.shape[:axis] + (1,) + a.shape[axis:])
    return np.stack(arrays, axis=axis)


def _step(mask: Optional[np.ndarray], new: np.ndarray, old: np.ndarray) -> np.ndarray:
    return new if mask is None else np.where(mask, new, old)


def _step_product(r: Any, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """``h -> h @ r.T`` for the steps of one call of the numpy step loops: at batch 1 a pruned or
    indexed ``r`` prepared once for the call (``indexed.step_product``), else ``kernels.matmul_t``."""
    prepared = step_product(r) if batch == 1 else None
    return prepared if prepared is not None else (lambda h: kernels.matmul_t(h, r))


def _prepared_call(attrs: Attrs, x: np.ndarray, w: Any, r: Any, b: Optional[np.ndarray]) -> Optional[tuple]:
    """The outputs of a recurrent node's prepared plain call (:func:`_plain_run`) for this input
    shape, or None (not prepared for it, or no kernel takes these weights)."""
    last = attrs.get("_plain")
    if last is not None and last[0] == (x.shape, x.dtype, w.shape, kernels.kernels()):
        return last[1](x, w, r, b)
    return None


def _first_plain_call(attrs: Attrs, x: np.ndarray, w: Any, r: Any, b: Optional[np.ndarray], ready: Optional[tuple],
                      make: Callable[..., Callable[..., Optional[tuple]]]) -> Optional[tuple]:
    """A plain call's outputs by ``make(*ready)`` (its prepared run; ``ready`` as :func:`_compiled`
    gives it), kept for the node's later calls of this input shape, so that every call takes the same
    kernels and gives the same results; None when no kernel takes it."""
    run = None if ready is None else make(*ready)
    outputs = None if run is None else run(x, w, r, b)
    if outputs is not None:
        attrs["_plain"] = ((x.shape, x.dtype, w.shape, ready[0]), run)
    return outputs


@register("LSTM", weights=(1, 2))
def lstm(attrs: Attrs, x: np.ndarray, w: Any, r: Any, b: Optional[np.ndarray] = None,
         seq_lens: Optional[np.ndarray] = None, h0: Optional[np.ndarray] = None,
         c0: Optional[np.ndarray] = None, p: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
    """LSTM with gates ``i, o, f, c``, optional peepholes ``P``, ``input_forget`` and ``clip``."""
    plain = seq_lens is None and h0 is None and c0 is None and p is None
    outputs = _prepared_call(attrs, x, w, r, b) if plain else None
    if outputs is not None:
        return outputs
    rec = _Recurrence(attrs, x, w, seq_lens, 4)
    if rec.batch == 0:
        return rec.empty(2)
    hsz = rec.hidden
    funcs = _activations(attrs, ("Sigmoid", "Tanh", "Tanh"), rec.directions)
    forget = bool(attrs.get("input_forget", 0))
    if plain and rec.directions == 1 and not rec.batch_major and not rec.direction_is_reverse(0):
        outputs = _first_plain_call(attrs, x, w, r, b, _compiled(rec, funcs[0], _DEFAULT_LSTM),
                                    lambda k, clip: _plain_run(k, clip, forget, hsz))
        if outputs is not None:
            return outputs
    hs, cs = rec.initial(h0), rec.initial(c0)
    ys, h_last, c_last = [], [], []
    for d in range(rec.directions):
        f, g, act_h = funcs[d]
        # [T, B, 4H], the two biases added in the product's pass
        proj = kernels.matmul_t(rec.inputs(d), w[d], None if b is None else b[d, :4 * hsz] + b[d, 4 * hsz:])
        rd = r[d]
        ready = _compiled(rec, funcs[d], _DEFAULT_LSTM)     # the step loop below is the kernels' twin
        batch = proj.shape[1]
        fast = None if ready is None else _lstm_kernel(*ready, rd, _sliced(rd, batch), forget, batch)
        if fast is not None:
            h, c = np.array(hs[d], np.float32), np.array(cs[d], np.float32)
            ys_d = np.empty(proj.shape[:2] + (hsz,), np.float32)
            peep = np.ascontiguousarray(p[d], np.float32) if p is not None else _NO_PEEPHOLES
            fast(np.ascontiguousarray(proj, np.float32), peep, h, c, ys_d)
            ys.append(ys_d[::-1] if rec.direction_is_reverse(d) else ys_d)
            h_last.append(h)
            c_last.append(c)
            continue
        h, c = hs[d], cs[d]
        out = []
        recurrent = _step_product(rd, rec.batch)
        for t in range(rec.steps):
            gates = proj[t] + recurrent(h)
            gc = gates[:, 3 * hsz:]
            if p is None:   # gates i, o (and f) side by side in one call: numpy costs ~1 us a call
                s = f(rec.clipped(gates[:, :(2 if forget else 3) * hsz]))
                i, o = s[:, :hsz], s[:, hsz:2 * hsz]
                c_new = (1 - i if forget else s[:, 2 * hsz:]) * c + i * g(rec.clipped(gc))
            else:           # peepholes: o reads the new cell state
                i = f(rec.clipped(gates[:, :hsz] + p[d, :hsz] * c))
                fg = 1 - i if forget else f(rec.clipped(gates[:, 2 * hsz:3 * hsz] + p[d, 2 * hsz:] * c))
                c_new = fg * c + i * g(rec.clipped(gc))
                o = f(rec.clipped(gates[:, hsz:2 * hsz] + p[d, hsz:2 * hsz] * c_new))
            h_new = o * act_h(c_new)
            mask = rec.active(t)
            h, c = _step(mask, h_new, h), _step(mask, c_new, c)
            out.append(h)
        ys.append(rec.finish(d, out))
        h_last.append(h)
        c_last.append(c)
    return rec.outputs(ys, [_stack(h_last), _stack(c_last)])


_NO_PEEPHOLES = np.zeros(0, np.float32)
_DEFAULT_LSTM = (sigmoid, np.tanh, np.tanh)


# The common inference call (one forward direction, no initial states, sequence lengths or
# peepholes, compiled) is prepared once per node and input shape, and runs from the first call on
# (so that every call takes the same kernels): a later call computes the projection and runs the
# kernel, none of the rest of the operator's Python (~15 us a call: ~10 % of the 90 %-pruned LSTM
# classifier's run). The weights are arguments, not kept: stream mode drops them after the node.
# With R in slices and W as CSR or dense indices, one kernel takes the projection too.
def _plain_run(k: Any, clip: np.float32, forget: bool, hsz: int) -> Callable[..., Optional[Tuple[np.ndarray, ...]]]:
    """``run(x, w, r, b)``: the outputs, or None when no kernel takes this ``R`` (the full operator then)."""
    def run(x: np.ndarray, w: Any, r: Any, b: Optional[np.ndarray]) -> Optional[Tuple[np.ndarray, ...]]:
        steps, batch = x.shape[:2]
        wd, rd = w[0], r[0]
        sliced = _sliced(rd, batch)
        projecting = None if sliced is None else _projecting(k, wd)
        if projecting is None:
            fast = _lstm_kernel(k, clip, rd, sliced, forget, batch)
            if fast is None:
                return None
            bias = None if b is None else b[0, :4 * hsz] + b[0, 4 * hsz:]
            proj = np.ascontiguousarray(kernels.matmul_t(x, wd, bias), np.float32)
        # the outputs made after the projection (a weight expanded there: it peaks without them)
        h, c = np.zeros((batch, hsz), np.float32), np.zeros((batch, hsz), np.float32)
        ys = np.empty((steps, batch, hsz), np.float32)
        if projecting is not None:
            both = np.zeros(8 * hsz, np.float32) if b is None else np.ascontiguousarray(b[0], np.float32)
            projecting(np.ascontiguousarray(x), *wd.arrays, both, *sliced.arrays, clip, forget, h, c, ys)
        else:
            fast(proj, _NO_PEEPHOLES, h, c, ys)
        return ys.reshape(steps, 1, batch, hsz), h.reshape(1, batch, hsz), c.reshape(1, batch, hsz)
    return run


def _projecting(k: Any, wd: Any, kind: str = "lstm") -> Optional[Callable[..., None]]:
    """The sliced kernel of ``kind`` (lstm, gru) that also takes the input projection by ``wd`` (CSR
    or dense indices), or None: ``matmul_t`` then projects."""
    if isinstance(wd, SparseWeight):
        return getattr(k, kind + "_sliced_csr")
    if isinstance(wd, IndexedWeight) and wd.indices.flags.c_contiguous:
        return getattr(k, kind + "_sliced_index")
    return None


def _compiled(rec: _Recurrence, funcs: Sequence[Activation], defaults: Tuple[Activation, ...]) -> Optional[tuple]:
    """``(numba's kernels, the clip as float32)`` when a recurrence can run compiled, else None: numba
    off, not float32, other activations than ``defaults``, or ``sequence_lens``. The clip is float32,
    as the gates: a float64 one would widen every gate update to float64 (a third slower)."""
    if rec.lens is not None or rec.dtype != np.float32 or tuple(funcs) != defaults:
        return None
    k = kernels.kernels()
    return None if k is None else (k, np.float32(np.inf if rec.clip is None else rec.clip))


def _sliced(rd: Any, batch: int, split: int = 0) -> Any:
    """A recurrent weight's 32-row slices for the batch-1 kernel (``held_slices`` of a CSR or
    table-slot weight that a session holds; a pair split at row ``split``), where AVX-512 permutes
    their activations (``numba_kernels.wide_vectors``), else None."""
    if isinstance(rd, (SparseWeight, TableRows)) and batch == 1 and wide_vectors():
        return rd.held_slices(split)
    return None


def candidate_split(linear_before_reset: bool, hidden: int) -> int:
    """The row at which a GRU's held ``R`` is sliced in two (:func:`_sliced`): 0, one set of slices,
    with ``linear_before_reset`` (the reset applied after ``R``); without it ``2H``, where the
    candidate's rows begin, which multiply ``r * h`` in a product of their own."""
    return 0 if linear_before_reset else 2 * hidden


#: Entries of a batch from which the recurrent product runs in register tiles from R expanded for the
#: call (:func:`_tiled`; a float32 R from one more); one entry takes R's slices or product tables.
TILED_BATCH = 2


def _tiled(k: Any, rd: Any, batch: int, kind: str) -> Optional[Callable[[], np.ndarray]]:
    """A function expanding ``rd`` to float32 in blocks of 16 rows, each transposed, for one call of
    the batch kernels' register tiles (``lstm_tiled``, ``gru_tiled``), or None: a batch under
    TILED_BATCH, no AVX-512 (the tiles' 16-lane sums need its 32 registers,
    ``numba_kernels.wide_vectors``), a weight whose float32 form is more than a call may hold
    (``indexed.call_bound``), or an LSTM's CSR ``R``, whose lane sums read each kept weight once for
    16 entries (at 90 % pruning as fast as the tiles' dense product or faster: the LSTM classifier's
    kernel, one process, batch 3 115 against 110 us, batch 8 183 against 212)."""
    if batch < TILED_BATCH or not wide_vectors():
        return None
    rows, width = rd.shape
    if 4 * -(-rows // 16) * 16 * width > call_bound(rows, width):
        return None
    if isinstance(rd, np.ndarray):      # at two entries two vector products (lstm_dense) cost less
        return (lambda: k.dense_t(np.ascontiguousarray(rd, np.float32))) if batch > TILED_BATCH else None
    if isinstance(rd, TableRows):
        return lambda: k.slots_t(*rd.arrays, width)
    if isinstance(rd, SparseWeight) and kind == "gru":
        return lambda: k.csr_t(rd.row_ptr, rd.cols, rd.symbols, rd.codebook, width)
    if isinstance(rd, IndexedWeight) and rd.indices.flags.c_contiguous:
        return lambda: k.index_t(rd.indices, rd.codebook)
    return None


def _lstm_kernel(k: Any, clip: np.float32, rd: Any, sliced: Optional[SlicedRows], forget: bool,
                 batch: int) -> Optional[Callable[..., None]]:
    """``run(proj, p, h, c, ys)``: the numba kernel (``runtime/_numba_rnn.py``) running all steps of one
    direction, bound to its recurrent weight ``rd`` as it is held (its slices when ``sliced``: see
    :func:`_sliced`; for a batch, expanded for the call when :func:`_tiled` says so), or None; ``k``
    and ``clip`` as :func:`_compiled` gives them."""
    tiled = _tiled(k, rd, batch, "lstm")
    if tiled is not None:
        return lambda proj_, p, h, c, ys: k.lstm_tiled(proj_, tiled(), p, clip, forget, h, c, ys)
    if isinstance(rd, np.ndarray):
        r = np.ascontiguousarray(rd, np.float32)
        return lambda proj_, p, h, c, ys: k.lstm_dense(proj_, r, p, clip, forget, h, c, ys)
    if isinstance(rd, IndexedWeight) and rd.indices.flags.c_contiguous:
        return lambda proj_, p, h, c, ys: k.lstm_index(proj_, rd.indices, rd.codebook, p, clip, forget, h, c, ys)
    if sliced is not None:
        return lambda proj_, p, h, c, ys: k.lstm_sliced(proj_, *sliced.arrays, p, clip, forget, h, c, ys)
    if isinstance(rd, SparseWeight):
        return lambda proj_, p, h, c, ys: k.lstm_csr(proj_, rd.row_ptr, rd.cols, rd.symbols, rd.codebook, p, clip,
                                                     forget, h, c, ys)
    if isinstance(rd, TableRows):
        return lambda proj_, p, h, c, ys: k.lstm_slots(proj_, *rd.arrays, p, clip, forget, h, c, ys)
    return None


@register("GRU", weights=(1, 2))
def gru(attrs: Attrs, x: np.ndarray, w: Any, r: Any, b: Optional[np.ndarray] = None,
        seq_lens: Optional[np.ndarray] = None, h0: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
    """GRU with gates ``z, r, h``; ``linear_before_reset`` applies the reset after ``R_h``."""
    plain = seq_lens is None and h0 is None
    outputs = _prepared_call(attrs, x, w, r, b) if plain else None
    if outputs is not None:
        return outputs
    rec = _Recurrence(attrs, x, w, seq_lens, 3)
    if rec.batch == 0:
        return rec.empty(1)
    hsz = rec.hidden
    funcs = _activations(attrs, ("Sigmoid", "Tanh"), rec.directions)
    before_reset = bool(attrs.get("linear_before_reset", 0))
    if plain and rec.directions == 1 and not rec.batch_major and not rec.direction_is_reverse(0):
        outputs = _first_plain_call(attrs, x, w, r, b, _compiled(rec, funcs[0], _DEFAULT_GRU),
                                    lambda k, clip: _plain_gru_run(k, clip, before_reset, hsz))
        if outputs is not None:
            return outputs
    hs = rec.initial(h0)
    ys, h_last = [], []
    for d in range(rec.directions):
        f, g = funcs[d]
        proj = kernels.matmul_t(rec.inputs(d), w[d])  # [T, B, 3H]
        wb = b[d, :3 * hsz] if b is not None else np.zeros(3 * hsz, dtype=rec.dtype)
        rb = b[d, 3 * hsz:] if b is not None else np.zeros(3 * hsz, dtype=rec.dtype)
        proj = proj + wb
        rd = r[d]
        fast = _compiled_gru(rec, funcs[d], rd, before_reset, proj.shape[1])
        if fast is not None:
            h = np.array(hs[d], np.float32)
            ys_d = np.empty(proj.shape[:2] + (hsz,), np.float32)
            fast(np.ascontiguousarray(proj, np.float32), np.ascontiguousarray(rb, np.float32), h, ys_d)
            ys.append(ys_d[::-1] if rec.direction_is_reverse(d) else ys_d)
            h_last.append(h)
            continue
        r_zr, r_h = (rd, None) if before_reset else (rd[:2 * hsz], rd[2 * hsz:])
        h = hs[d]
        out = []
        recurrent, recurrent_h = _step_product(r_zr, rec.batch), None if before_reset else _step_product(r_h, rec.batch)
        for t in range(rec.steps):
            rec_zr = recurrent(h)  # [B, 3H] or [B, 2H]
            zr = f(rec.clipped(proj[t, :, :2 * hsz] + rec_zr[:, :2 * hsz] + rb[:2 * hsz]))    # one call for both
            z, reset = zr[:, :hsz], zr[:, hsz:]
            if before_reset:
                cand = proj[t, :, 2 * hsz:] + reset * (rec_zr[:, 2 * hsz:] + rb[2 * hsz:])
            else:
                cand = proj[t, :, 2 * hsz:] + recurrent_h(reset * h) + rb[2 * hsz:]
            h_new = (1 - z) * g(rec.clipped(cand)) + z * h
            h = _step(rec.active(t), h_new, h)
            out.append(h)
        ys.append(rec.finish(d, out))
        h_last.append(h)
    return rec.outputs(ys, [_stack(h_last)])


def _plain_gru_run(k: Any, clip: np.float32, before_reset: bool,
                   hsz: int) -> Callable[..., Optional[Tuple[np.ndarray, ...]]]:
    """:func:`_plain_run` for the GRU: ``run(x, w, r, b)``, the outputs or None. With R in slices and
    W as CSR or dense indices, one kernel takes the projection too (with the reset after R: before
    it, R's candidate rows are slices of their own, multiplying ``r * h``, and ``matmul_t`` projects)."""
    def run(x: np.ndarray, w: Any, r: Any, b: Optional[np.ndarray]) -> Optional[Tuple[np.ndarray, ...]]:
        steps, batch = x.shape[:2]
        wd, rd = w[0], r[0]
        sliced = _sliced(rd, batch, candidate_split(before_reset, hsz))
        projecting = None if sliced is None or not before_reset else _projecting(k, wd, "gru")
        if projecting is None:
            fast = _gru_kernel(k, clip, rd, sliced, before_reset, batch)
            if fast is None:
                return None
            proj = np.ascontiguousarray(kernels.matmul_t(x, wd, None if b is None else b[0, :3 * hsz]), np.float32)
        h, ys = np.zeros((batch, hsz), np.float32), np.empty((steps, batch, hsz), np.float32)
        if projecting is not None:
            both = np.zeros(6 * hsz, np.float32) if b is None else np.ascontiguousarray(b[0], np.float32)
            projecting(np.ascontiguousarray(x), *wd.arrays, both, *sliced.arrays, clip, h, ys)
        else:
            rb = np.zeros(3 * hsz, np.float32) if b is None else np.ascontiguousarray(b[0, 3 * hsz:], np.float32)
            fast(proj, rb, h, ys)
        return ys.reshape(steps, 1, batch, hsz), h.reshape(1, batch, hsz)
    return run


def _compiled_gru(rec: _Recurrence, funcs: Sequence[Activation], rd: Any, before_reset: bool,
                  batch: int) -> Optional[Callable[..., None]]:
    """As :func:`_lstm_kernel` for the GRU: ``run(proj, rb, h, ys)``, or None (the step loop above
    is its numpy twin). The GRU classifier (96 units, 16 steps), one core, batch 1: index mode 0.52 ->
    0.17 ms, dense 0.41 -> 0.075 ms (onnxruntime 0.042)."""
    ready = _compiled(rec, funcs, _DEFAULT_GRU)
    if ready is None:
        return None
    return _gru_kernel(*ready, rd, _sliced(rd, batch, candidate_split(before_reset, rec.hidden)), before_reset, batch)


def _gru_kernel(k: Any, clip: np.float32, rd: Any, sliced: Any, before_reset: bool,
                batch: int) -> Optional[Callable[..., None]]:
    """:func:`_lstm_kernel` for the GRU: ``run(proj, rb, h, ys)`` bound to ``rd`` as it is held, or None.
    ``sliced``: R's slices, or (the reset before R) those of its ``z, r`` rows and its candidate's."""
    tiled = _tiled(k, rd, batch, "gru")
    if tiled is not None:
        return lambda proj, rb, h, ys: k.gru_tiled(proj, tiled(), rb, clip, before_reset, h, ys)
    if isinstance(sliced, tuple):
        zr, cand = sliced
        return lambda proj, rb, h, ys: k.gru_sliced_before(proj, *zr.arrays, *cand.arrays[:4], rb, clip, h, ys)
    if sliced is not None:
        return lambda proj, rb, h, ys: k.gru_sliced(proj, *sliced.arrays, rb, clip, h, ys)
    if isinstance(rd, np.ndarray):
        r = np.ascontiguousarray(rd, np.float32)
        return lambda proj, rb, h, ys: k.gru_dense(proj, r, rb, clip, before_reset, h, ys)
    if isinstance(rd, IndexedWeight) and rd.indices.flags.c_contiguous:
        return lambda proj, rb, h, ys: k.gru_index(proj, rd.indices, rd.codebook, rb, clip, before_reset, h, ys)
    if isinstance(rd, SparseWeight):
        return lambda proj, rb, h, ys: k.gru_csr(proj, rd.row_ptr, rd.cols, rd.symbols, rd.codebook, rb, clip,
                                                 before_reset, h, ys)
    if isinstance(rd, TableRows):
        return lambda proj, rb, h, ys: k.gru_slots(proj, *rd.arrays, rb, clip, before_reset, h, ys)
    return None


_DEFAULT_GRU = (sigmoid, np.tanh)


@register("RNN", weights=(1, 2))
def rnn(attrs: Attrs, x: np.ndarray, w: Any, r: Any, b: Optional[np.ndarray] = None,
        seq_lens: Optional[np.ndarray] = None, h0: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
    """Simple recurrent layer ``H = f(X W^T + H R^T + Wb + Rb)`` (``f`` = Tanh)."""
    rec = _Recurrence(attrs, x, w, seq_lens, 1)
    if rec.batch == 0:
        return rec.empty(1)
    hsz = rec.hidden
    funcs = _activations(attrs, ("Tanh",), rec.directions)
    hs = rec.initial(h0)
    ys, h_last = [], []
    for d in range(rec.directions):
        (f,) = funcs[d]
        proj = kernels.matmul_t(rec.inputs(d), w[d], None if b is None else b[d, :hsz] + b[d, hsz:])
        recurrent = _step_product(r[d], rec.batch)
        h = hs[d]
        out = []
        for t in range(rec.steps):
            h = _step(rec.active(t), f(rec.clipped(proj[t] + recurrent(h))), h)
            out.append(h)
        ys.append(rec.finish(d, out))
        h_last.append(h)
    return rec.outputs(ys, [_stack(h_last)])
