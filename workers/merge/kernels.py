"""Fused loops for the hot paths of the weighted sums (linear, task arithmetic) and the
sign-consensus merges (TIES, DARE-TIES), compiled with numba.

Each torch operation of TIES' trim and sign election is a separate pass over K x chunk floats
(about ten of them), with a temporary each; these loops make one pass, block by block, and do
the same float32 (or float64) operations in the same order, so they return the same bits as the
torch code they replace (``tests/unit/merge/test_kernels.py`` holds both side by side). Compiled
code is cached next to this file (numba's on-disk cache) so that a worker process loads it instead
of compiling it again. The loops on stacked task vectors take float32 and float64, those that
read stored inputs compute in float32; other dtypes keep the torch path.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

FUSED_DTYPES = (torch.float32, torch.float64)
_BLOCK = 512  # elements whose per-entry sums stay in registers / L1 while K rows stream by


def fused(t: torch.Tensor) -> bool:
    """Whether the fused loops take tensors of ``t``'s dtype."""
    return t.dtype in FUSED_DTYPES


def sign_merge(deltas: torch.Tensor, weights: Sequence[float], base: torch.Tensor, *,
               unit: bool, normalize: bool, scale: float) -> torch.Tensor:
    """TIES' elect-sign-and-disjoint-merge of stacked task vectors ``[K, *shape]``:
    ``base + scale * Σ_agree w_i τ_i`` (divided by Σ_agree w_i when ``normalize``), as
    ``task_vectors.combine`` computes it with torch."""
    flat = deltas.reshape(len(deltas), -1).contiguous()
    dt = flat.numpy().dtype
    out = torch.empty(base.shape, dtype=base.dtype)
    _sign_merge(flat.numpy(), base.contiguous().reshape(-1).numpy(),
                np.asarray(weights, dtype=dt), unit, normalize, dt.type(scale),
                out.reshape(-1).numpy())
    return out


@njit(cache=True, nogil=True, boundscheck=False)
def _sign_merge(deltas, base, w, unit, normalize, scale, out):  # pragma: no cover (compiled)
    k, n = deltas.shape
    block = np.empty((k, _BLOCK), w.dtype)
    sums = np.empty((3, _BLOCK), w.dtype)
    for start in range(0, n, _BLOCK):
        m = min(n, start + _BLOCK) - start
        for i in range(k):
            row = deltas[i, start:start + m]
            for j in range(m):
                block[i, j] = row[j]
        _merge_block(block, m, w, unit, normalize, scale, base[start:start + m],
                     out[start:start + m], sums)


@njit(cache=True, nogil=True, boundscheck=False)
def _merge_block(d, m, w, unit, normalize, scale, base, out,
                 sums):  # pragma: no cover (compiled)
    """Sign election and disjoint merge of the first ``m`` columns of ``d`` ``[K, _BLOCK]``:
    the per-entry sums of a block (``sums``, scratch ``[3, _BLOCK]``) stay in L1 while the K
    rows stream by."""
    zero, one = w.dtype.type(0), w.dtype.type(1)
    total, mixed, divisor = sums[0], sums[1], sums[2]
    sums[:, :m] = zero
    for i in range(d.shape[0]):  # the weighted sum elects the sign
        wi = w[i]
        for j in range(m):
            total[j] += d[i, j] if unit else d[i, j] * wi
    for i in range(d.shape[0]):  # entries agreeing with it (zeros never do) and their weights
        wi = w[i]
        for j in range(m):
            x = d[i, j] if unit else d[i, j] * wi
            sign = one if total[j] >= zero else -one
            agree = one if x * sign > zero else zero
            mixed[j] += x * agree
            divisor[j] += wi * agree
    for j in range(m):
        r = mixed[j]
        if normalize:
            r = r / (one if divisor[j] == zero else divisor[j])
        if scale != one:
            r = r * scale
        out[j] = base[j] + r


class Stored(NamedTuple):
    """Inputs then the base, as stored, for the loops: row ``i`` is ``n`` bit patterns at byte
    address ``addrs[i]`` (uint16 for bfloat16, shifted up ``shift`` = 16 bits; uint32 for
    float32, as ``like``'s dtype says), which the loops read block by block (contiguous, so
    they vectorise) and convert to float32. ``owners`` keeps the memory behind the addresses
    alive (the tensors the rows are read from, e.g. views of mapped files)."""

    like: np.ndarray
    addrs: np.ndarray
    n: int
    shift: int
    owners: tuple

    @property
    def k(self) -> int:
        """Rows, the base included."""
        return len(self.addrs)

    def args(self) -> tuple:
        """What the compiled loops take."""
        return self.like, self.addrs, self.n, self.shift


def fused_inputs(tensors, base: torch.Tensor | None, dtype: torch.dtype) -> Stored | None:
    """``Stored`` inputs (then the base, if any) for the loops here, read where they are (a
    read window's rows, mapped files; only non-contiguous ones are copied). None where the
    loops do not apply (compute dtype other than float32, inputs of other or differing
    dtypes): the caller casts and uses torch."""
    if dtype != torch.float32 or not len(tensors):
        return None
    rows = list(tensors) + ([] if base is None else [base])
    stored = {t.dtype for t in rows}
    if len(stored) != 1 or stored.isdisjoint(_STORED):
        return None
    n = rows[0].numel()
    if any(t.numel() != n for t in rows):
        raise ValueError(f"inputs of differing sizes: {[t.numel() for t in rows]}")
    rows = [t if t.is_contiguous() else t.contiguous() for t in rows]
    return Stored(np.empty(0, _STORED[rows[0].dtype][0]),
                  np.array([t.data_ptr() for t in rows], dtype=np.int64), n,
                  _STORED[rows[0].dtype][1], tuple(rows))


_STORED = {torch.bfloat16: (np.uint16, 16), torch.float32: (np.uint32, 0)}


@intrinsic
def _pointer(typingctx, address):  # pragma: no cover (compiled)
    """The integer ``address`` as a pointer (for ``carray``)."""
    return types.voidptr(types.int64), lambda context, builder, signature, args: \
        builder.inttoptr(args[0], cgutils.voidptr_t)


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _load(like, at, m, shift, out_bits):  # pragma: no cover (compiled)
    """``m`` stored values (``like``'s dtype) from byte address ``at``, as float32 bits."""
    row = carray(_pointer(at), m, like.dtype)
    for j in range(m):
        out_bits[j] = np.uint32(row[j]) << shift


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _task_vector(like, at, m, shift, base, x_bits, out):  # pragma: no cover (compiled)
    """``out[:m]`` = x − base in float32, for the ``m`` stored inputs from ``at``."""
    _load(like, at, m, shift, x_bits)
    x = x_bits.view(np.float32)
    for j in range(m):
        out[j] = x[j] - base[j]


def weighted_sum(inputs: Stored, weights: Sequence[float], *, has_base: bool,
                 fused_multiply: bool, divisor: float | None, scale: float = 1) -> torch.Tensor:
    """Σ w_i x_i over ``fused_inputs`` (linear), or with ``has_base`` base + scale · Σ w_i τ_i,
    τ_i = x_i − base (task arithmetic), in float32: the sum starts from 0 and adds model by
    model, each term as one fused multiply-add with ``fused_multiply`` (torch's ``addcmul_``),
    else rounded before it is added (torch's ``mul_`` then ``sum(dim=0)``); ``divisor``, if
    any, divides the sum. The same bits as those torch steps (where torch sums in model order:
    up to 16 models on this CPU; more are summed pairwise in blocks)."""
    out = np.empty(inputs.n, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    _weighted_sum(*inputs.args(), has_base, w, fused_multiply, bool(np.all(w == 1)),
                  divisor is not None, np.float32(divisor or 1), np.float32(scale), out)
    return torch.from_numpy(out)


@intrinsic
def _fma(typingctx, a, b, c):  # pragma: no cover (compiled)
    """a · b + c rounded once (LLVM's fma intrinsic: an instruction where the CPU has one)."""
    return a(a, b, c), lambda context, builder, signature, args: builder.fma(*args)


@njit(cache=True, nogil=True, boundscheck=False)
def _weighted_sum(like, addrs, n, shift, has_base, w, fused_multiply, unit, divide, divisor,
                  scale, out):  # pragma: no cover (compiled)
    k = len(addrs) - 1 if has_base else len(addrs)
    base_bits = np.empty(_BLOCK, np.uint32)
    x_bits = np.empty(_BLOCK, np.uint32)
    base, x = base_bits.view(np.float32), x_bits.view(np.float32)
    acc = np.empty(_BLOCK, np.float32)
    for start in range(0, n, _BLOCK):
        m = min(n, start + _BLOCK) - start
        at = start * like.itemsize  # bytes into each row
        acc[:m] = np.float32(0)
        if has_base:
            _load(like, addrs[k] + at, m, shift, base_bits)
        for i in range(k):
            if has_base:
                _task_vector(like, addrs[i] + at, m, shift, base, x_bits, x)
            else:
                _load(like, addrs[i] + at, m, shift, x_bits)
            wi = w[i]
            if fused_multiply:
                for j in range(m):
                    acc[j] = _fma(x[j], wi, acc[j])
            elif unit:
                for j in range(m):
                    acc[j] += x[j]
            else:
                for j in range(m):
                    acc[j] += x[j] * wi
        part = out[start:start + m]
        for j in range(m):
            r = acc[j] / divisor if divide else acc[j]
            if scale != np.float32(1):
                r = r * scale
            part[j] = base[j] + r if has_base else r


def ties_merge(inputs: Stored, states: list[list | None], weights,
               *, unit: bool, normalize: bool, scale: float) -> torch.Tensor:
    """TIES on ``fused_inputs``: τ_i = x_i − base in float32, trimmed by ``states`` (per model
    None, or ``[threshold, quota]`` as ``ties._keep_quota`` takes it; quotas are consumed),
    then ``sign_merge``: the same bits as those torch steps, in one pass with no temporaries."""
    k = inputs.k - 1
    keep = np.array([s is not None for s in states])
    thresholds = np.array([0 if s is None else s[0] for s in states], dtype=np.float32)
    quotas = np.array([0 if s is None else s[1] for s in states], dtype=np.int64)
    untouched = dare_plan(np.zeros((k, 4), np.uint64), np.zeros(k), np.zeros(k), np.ones(k))
    out = _stored_merge(inputs, (keep, thresholds, quotas), untouched, weights, unit,
                        normalize, scale)
    for i in range(k):
        if states[i] is not None:
            states[i][1] = int(quotas[i])
    return out


def _stored_merge(inputs: Stored, trims: tuple, plan: tuple, weights, unit: bool,
                  normalize: bool, scale: float) -> torch.Tensor:
    out = np.empty(inputs.n, dtype=np.float32)
    _sparse_sign_merge(*inputs.args(), *trims, *plan, np.asarray(weights, dtype=np.float32), unit,
                       normalize, np.float32(scale), out)
    return torch.from_numpy(out)


@njit(cache=True, nogil=True, boundscheck=False)
def _sparse_sign_merge(like, addrs, n, shift, keep, thresholds, quotas, states, cuts, modes,
                       factors, w, unit, normalize, scale, out):  # pragma: no cover (compiled)
    """τ_i of stored inputs, trimmed (TIES: ``keep``, ``thresholds``, ``quotas``) and dropped
    and rescaled (DARE: ``states`` ... ``factors``, mode 0 leaves τ_i), then the sign merge."""
    k = len(addrs) - 1
    states = states.copy()
    drawn = np.flatnonzero(modes != 0)
    raw = np.empty((k, _BLOCK // 4), np.uint64)
    draws = raw.view(np.uint16)
    base_bits = np.empty(_BLOCK, np.uint32)
    base = base_bits.view(np.float32)
    x_bits = np.empty(_BLOCK, np.uint32)
    d = np.empty((k, _BLOCK), np.float32)
    sums = np.empty((3, _BLOCK), np.float32)
    for start in range(0, n, _BLOCK):
        m = min(n, start + _BLOCK) - start
        at = start * like.itemsize  # bytes into each row
        _load(like, addrs[k] + at, m, shift, base_bits)
        _draw(states, drawn, raw, (m + 3) // 4)
        for i in range(k):
            _task_vector(like, addrs[i] + at, m, shift, base, x_bits, d[i])
            if not keep[i]:  # keep nothing (zero_, as ties._keep_quota)
                for j in range(m):
                    d[i, j] = np.float32(0)
            elif thresholds[i] > 0 or quotas[i] > 0:  # else the trim would change nothing
                quotas[i] = _trim_block(d[i], m, thresholds[i], quotas[i])
            if modes[i] != 0:
                _drop_and_rescale(d[i], m, draws[i], cuts[i], modes[i], factors[i])
        _merge_block(d, m, w, unit, normalize, scale, base, out[start:start + m], sums)


def dare_plan(states: np.ndarray, cuts: np.ndarray, modes: np.ndarray,
              factors: np.ndarray) -> tuple[np.ndarray, ...]:
    """DARE's per-model drop and rescale for ``dare_ties_merge`` and ``dare_l1``: ``states``
    ``[K, 4]``, each model's SFC64 generator (``sfc64_states``) whose 16-bit draws, one per
    entry, keep an entry when below ``cuts[i]``; ``modes[i]`` 0 keeps
    the task vector as it is (density 1), 1 drops only, 2 drops then divides by
    ``factors[i]`` (the density), 3 drops then multiplies by it (the L1 factor)."""
    return (states, cuts.astype(np.uint32), modes.astype(np.int64), factors.astype(np.float32))


def sfc64_states(rng: Sequence[np.random.SFC64]) -> np.ndarray:
    """``[K, 4]`` uint64: each generator's state (a, b, c, counter). The loops draw from copies
    of it the same numbers as ``rng[i].random_raw``, and leave the generators as they are."""
    states = np.zeros((len(rng), 4), dtype=np.uint64)
    for i, g in enumerate(rng):
        if not isinstance(g, np.random.SFC64):
            raise TypeError(f"the fused DARE loops draw from SFC64 generators, got {type(g)}")
        states[i] = g.state["state"]["state"]
    return states


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _sfc64_step(a, b, c, w):  # pragma: no cover (compiled)
    """One step of numpy's SFC64 from state (a, b, c, counter w): (output, next state)."""
    out = a + b + w
    return (out, b ^ (b >> np.uint64(11)), c + (c << np.uint64(3)),
            ((c << np.uint64(24)) | (c >> np.uint64(40))) + out, w + np.uint64(1))


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _sfc64(state, raw, count):  # pragma: no cover (compiled)
    """The next ``count`` outputs of numpy's SFC64 generator from ``state``, into ``raw``
    (its 16-bit halves, little-endian, are ``random_raw(...).view(np.uint16)``)."""
    a, b, c, w = state[0], state[1], state[2], state[3]
    for s in range(count):
        raw[s], a, b, c, w = _sfc64_step(a, b, c, w)
    state[0], state[1], state[2], state[3] = a, b, c, w


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _draw(states, drawn, raw, count):  # pragma: no cover (compiled)
    """``raw[i, :count]`` = the next ``count`` outputs of generator ``i`` for each ``i`` in
    ``drawn``, two generators stepped together (one chain alone waits on its own latency:
    1.7x slower)."""
    pairs = len(drawn) // 2 * 2
    for p in range(0, pairs, 2):
        _sfc64_pair(states[drawn[p]], states[drawn[p + 1]], raw[drawn[p]], raw[drawn[p + 1]],
                    count)
    if pairs < len(drawn):
        _sfc64(states[drawn[pairs]], raw[drawn[pairs]], count)


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _sfc64_pair(s0, s1, raw0, raw1, count):  # pragma: no cover (compiled)
    """``_sfc64`` of two generators, interleaved."""
    a0, b0, c0, w0 = s0[0], s0[1], s0[2], s0[3]
    a1, b1, c1, w1 = s1[0], s1[1], s1[2], s1[3]
    for s in range(count):
        raw0[s], a0, b0, c0, w0 = _sfc64_step(a0, b0, c0, w0)
        raw1[s], a1, b1, c1, w1 = _sfc64_step(a1, b1, c1, w1)
    s0[0], s0[1], s0[2], s0[3] = a0, b0, c0, w0
    s1[0], s1[1], s1[2], s1[3] = a1, b1, c1, w1


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _drop_and_rescale(tau, m, draws, cut, mode, factor):  # pragma: no cover (compiled)
    """``tau[:m]`` dropped and rescaled in place as ``dare_linear.drop_and_rescale`` does it
    (one loop per mode: a branch inside keeps it from vectorising)."""
    one, zero = np.float32(1), np.float32(0)
    if mode == 1:
        for j in range(m):
            tau[j] = tau[j] * (one if np.uint32(draws[j]) < cut else zero)
    elif mode == 2:
        for j in range(m):
            tau[j] = tau[j] * (one if np.uint32(draws[j]) < cut else zero) / factor
    elif mode == 3:
        for j in range(m):
            tau[j] = tau[j] * (one if np.uint32(draws[j]) < cut else zero) * factor


def dare_ties_merge(inputs: Stored, plan: tuple[np.ndarray, ...], weights, *, unit: bool,
                    normalize: bool, scale: float) -> torch.Tensor:
    """DARE-TIES on ``fused_inputs``: each τ_i dropped and rescaled by ``plan``
    (``dare_plan``), then ``sign_merge``; the same bits as those torch steps."""
    k = inputs.k - 1
    untrimmed = (np.ones(k, dtype=np.bool_), np.zeros(k, np.float32), np.zeros(k, np.int64))
    return _stored_merge(inputs, untrimmed, plan, weights, unit, normalize, scale)


def dare_l1(inputs: Stored, plan: tuple[np.ndarray, ...]) -> torch.Tensor:
    """Per model ``[Σ|τ|, Σ|τ kept|]`` in float64 (0 for models that keep everything):
    ``dare_linear.L1Rescale``'s statistics on ``fused_inputs``. A fixed order that vectorises
    (one float64 chain would cost a cycle per add): each block of ``_BLOCK`` entries is summed
    by halving (entry j + entry j + w, w = 256, 128, ..., 8) into 8 lanes, added to 8 running
    lanes, which are added at the end."""
    lanes = np.zeros((inputs.k - 1, 2, _LANES), dtype=np.float64)
    _dare_l1(*inputs.args(), plan[0], plan[1], plan[2], lanes)
    return torch.from_numpy(lanes.sum(axis=2))


_LANES = 8


@njit(cache=True, nogil=True, boundscheck=False)
def _dare_l1(like, addrs, n, shift, states, cuts, modes, lanes):  # pragma: no cover (compiled)
    k = len(addrs) - 1
    states = states.copy()
    drawn = np.flatnonzero(modes != 0)
    raw = np.empty((k, _BLOCK // 4), np.uint64)
    draws = raw.view(np.uint16)
    base_bits = np.empty(_BLOCK, np.uint32)
    x_bits = np.empty(_BLOCK, np.uint32)
    base, x = base_bits.view(np.float32), x_bits.view(np.float32)
    before, after = np.zeros(_BLOCK, np.float64), np.zeros(_BLOCK, np.float64)
    for start in range(0, n, _BLOCK):
        m = min(n, start + _BLOCK) - start
        at = start * like.itemsize  # bytes into each row
        _load(like, addrs[k] + at, m, shift, base_bits)
        _draw(states, drawn, raw, (m + 3) // 4)
        for i in drawn:
            _load(like, addrs[i] + at, m, shift, x_bits)
            kept = draws[i]
            cut = cuts[i]
            for j in range(m):
                t = np.float64(abs(x[j] - base[j]))
                before[j] = t
                after[j] = t if np.uint32(kept[j]) < cut else 0.0
            if m < _BLOCK:  # the last block: zeros add nothing
                before[m:] = 0.0
                after[m:] = 0.0
            _halve(before, lanes[i, 0])
            _halve(after, lanes[i, 1])


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _halve(t, lanes):  # pragma: no cover (compiled)
    """``lanes`` += ``t`` (``_BLOCK`` entries) summed by halving down to ``len(lanes)``."""
    w = len(t) // 2
    while w >= len(lanes):
        for j in range(w):
            t[j] += t[j + w]
        w //= 2
    for j in range(len(lanes)):
        lanes[j] += t[j]


def histograms(inputs: Stored, high: list[int] | None = None) -> torch.Tensor:
    """``magnitude_histograms`` of the task vectors of ``fused_inputs``, computed on the fly."""
    hist = np.zeros((inputs.k - 1, 1 << 16), dtype=np.int64)
    if high is None:
        _high_hist_raw(*inputs.args(), hist)
    else:
        _low_hist_raw(*inputs.args(), np.asarray(high, dtype=np.int64), hist)
    return torch.from_numpy(hist)


@njit(cache=True, nogil=True, boundscheck=False)
def _task_vector_bits(like, at, m, shift, base_bits, x_bits):  # pragma: no cover (compiled)
    """|x − base| as float32 bit patterns, in ``x_bits``, for the ``m`` inputs from ``at``."""
    x = x_bits.view(np.float32)
    _task_vector(like, at, m, shift, base_bits.view(np.float32), x_bits, x)
    for j in range(m):
        x_bits[j] &= 0x7FFFFFFF


@njit(cache=True, nogil=True, boundscheck=False)
def _high_hist_raw(like, addrs, n, shift, hist):  # pragma: no cover (compiled)
    k = len(addrs) - 1
    base_bits = np.empty(_BLOCK, np.uint32)
    x_bits = np.empty(_BLOCK, np.uint32)
    for start in range(0, n, _BLOCK):
        m = min(n, start + _BLOCK) - start
        at = start * like.itemsize  # bytes into each row
        _load(like, addrs[k] + at, m, shift, base_bits)
        for i in range(k):
            _task_vector_bits(like, addrs[i] + at, m, shift, base_bits, x_bits)
            for j in range(m):
                hist[i, x_bits[j] >> 16] += 1


@njit(cache=True, nogil=True, boundscheck=False)
def _low_hist_raw(like, addrs, n, shift, high, hist):  # pragma: no cover (compiled)
    k = len(addrs) - 1
    base_bits = np.empty(_BLOCK, np.uint32)
    x_bits = np.empty(_BLOCK, np.uint32)
    # A threshold bin of bf16-rounded deltas can hold a fifth of the entries: a branch on "in
    # the bin" mispredicts, so every entry is counted, out-of-bin ones in a spare bin 0, in four
    # interleaved histograms (one would serialise on the spare bin's counter).
    sub = np.zeros((k, 4, (1 << 16) + 1), np.int64)
    for start in range(0, n, _BLOCK):
        m = min(n, start + _BLOCK) - start
        at = start * like.itemsize  # bytes into each row
        _load(like, addrs[k] + at, m, shift, base_bits)
        for i in range(k):
            if high[i] < 0:
                continue
            low = np.uint32(high[i]) << 16
            _task_vector_bits(like, addrs[i] + at, m, shift, base_bits, x_bits)
            for j in range(m):
                v = np.int64(x_bits[j]) - low
                inside = (v >= 0) & (v < (1 << 16))
                sub[i, j & 3, v + 1 if inside else 0] += 1
    for i in range(k):
        for b in range(1 << 16):
            hist[i, b] = sub[i, 0, b + 1] + sub[i, 1, b + 1] + sub[i, 2, b + 1] + sub[i, 3, b + 1]


def trim(delta: torch.Tensor, threshold: float, quota: int) -> int:
    """Zero the entries of ``delta`` (contiguous, in place) whose magnitude as float32 is below
    ``threshold``, and those equal to it past the first ``quota`` in index order; returns the
    quota left for the next chunk."""
    row = delta.reshape(-1).numpy()
    return int(_trim_block(row, len(row), np.float32(threshold), quota))


@njit(cache=True, nogil=True, boundscheck=False)
def _trim_block(row, m, threshold, quota):  # pragma: no cover (compiled)
    """``trim`` of ``row[:m]``."""
    zero = row.dtype.type(0)
    if quota == 0:  # the common case once the quota is spent: keep > threshold, branch-free
        for j in range(m):
            row[j] = row[j] * row.dtype.type(np.float32(abs(row[j])) > threshold)
        return 0
    tied = 0
    for j in range(m):  # keep >= threshold, count the ties
        v = np.float32(abs(row[j]))
        row[j] = row[j] * row.dtype.type(v >= threshold)  # x * 0, as torch's mask does
        tied += np.int64(v == threshold)
    if tied <= quota:
        return quota - tied
    for j in range(m):  # more ties than the quota: drop those past it
        if np.float32(abs(row[j])) == threshold:
            if quota > 0:
                quota -= 1
            else:
                row[j] = row[j] * zero
    return 0


def magnitude_histograms(deltas: torch.Tensor, high: np.ndarray | None = None) -> torch.Tensor:
    """Per row of ``deltas`` ``[K, ...]``, the radix histogram (``quantile.BINS`` bins) of the
    float32 bit patterns of its magnitudes: of the high 16 bits, or, with ``high`` (per row a
    high half, or -1 for an all-zero row), of the low 16 bits of the entries in that bin. The
    ``histograms`` loops, with the deltas as float32 inputs and a zero base (x − 0 is x)."""
    rows = deltas.reshape(len(deltas), -1).float()
    inputs = fused_inputs(rows, torch.zeros(rows.shape[1]), torch.float32)
    return histograms(inputs, high)


# the exponent bits of each float format: a value is NaN or ±Inf exactly when all are set
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000),
             torch.float64: (torch.int64, 0x7FF0000000000000)}


def count_nonfinite(values: torch.Tensor) -> int:
    """How many entries of a floating tensor are NaN or ±Inf (0 for other dtypes): one pass
    over its bits, about 0.07 ns per entry (torch.isfinite takes 3-4 ns)."""
    exponent = _EXPONENT.get(values.dtype)
    if exponent is None or not values.numel():
        return 0
    bits, mask = exponent
    flat = values.reshape(-1)
    return int(_count_exponent(flat.contiguous().view(bits).numpy(), mask))


@njit(cache=True, nogil=True, boundscheck=False)
def _count_exponent(bits, mask):  # pragma: no cover (compiled)
    count = 0
    for i in range(bits.size):
        count += (bits[i] & mask) == mask
    return count
