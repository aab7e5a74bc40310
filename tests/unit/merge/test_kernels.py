"""The fused loops return the same bits as the torch operations they replace."""

import pytest
import torch

from workers.merge import kernels, quantile
from workers.merge.task_vectors import as_float, combine


def torch_sign_merge(deltas, weights, base, normalize, scale):
    """TIES' sign election and disjoint merge as torch operations, in mergekit's order."""
    w = torch.tensor(weights, dtype=deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    deltas = deltas * w
    majority = as_float(deltas.sum(dim=0) >= 0, deltas.dtype) * 2 - 1
    agree = as_float(deltas * majority > 0, deltas.dtype)
    mixed = (deltas * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return base + mixed


def deltas_with_zeros_and_ties(k, shape, dtype, seed=0):
    """bf16-rounded task vectors (many exact ties), whole zero columns, a NaN and infinities."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16).to(dtype)
    tuned = [(base + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16).to(dtype)
             for _ in range(k)]
    deltas = torch.stack([t - base for t in tuned])
    deltas[:, 3] = 0
    deltas[1, 5] = float("nan")
    deltas[0, 7], deltas[2, 7] = float("inf"), -float("inf")
    return deltas, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights,normalize,scale", [
    ([1.0, 1.0, 1.0, 1.0], True, 1.0),
    ([0.3, 1.0, 0.7, 1.9], True, 0.37),
    ([0.3, 1.0, 0.7, 1.9], False, 1.0),
    ([1.0, 1.0, 1.0, 1.0], False, 2.5),
])
def test_sign_merge_equals_torch_bit_for_bit(dtype, weights, normalize, scale):
    deltas, base = deltas_with_zeros_and_ties(4, (1000, 3), dtype)  # 3000 > one block
    got = combine(deltas.clone(), weights, base=base, sign_consensus=True,
                  normalize=normalize, scale=scale)
    want = torch_sign_merge(deltas, weights, base, normalize, scale)
    assert got.dtype == dtype and got.shape == base.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_combine_keeps_torch_for_other_dtypes():
    """bf16 arithmetic (mergekit's ``dtype: bfloat16``) is not compiled: torch computes it."""
    deltas, base = deltas_with_zeros_and_ties(3, (500,), torch.bfloat16)
    deltas[1, 5] = 0  # no NaN: compare plainly
    deltas[:, 7] = 0
    got = combine(deltas.clone(), [1.0, 0.5, 2.0], base=base, sign_consensus=True,
                  normalize=True, scale=1.0)
    assert torch.equal(got, torch_sign_merge(deltas, [1.0, 0.5, 2.0], base, True, 1.0))


def torch_trim(delta, threshold, quota):
    """Keep |x| > threshold and the first ``quota`` entries equal to it (torch, in place)."""
    magnitude = delta.abs().float()
    keep = magnitude > threshold
    tied = (magnitude == threshold).nonzero()[:, 0]
    keep[tied[:quota]] = True
    delta *= as_float(keep, delta.dtype)
    return max(0, quota - len(tied))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trim_consumes_the_tie_quota_in_index_order_across_chunks(dtype):
    deltas, _ = deltas_with_zeros_and_ties(3, (4000,), dtype)
    row = deltas[1]  # holds a NaN
    row[9] = -float("inf")
    mags = row.abs().float()
    threshold = float(torch.sort(mags[mags.isfinite()]).values[3000])
    ties = int((mags == threshold).sum())
    assert ties > 3  # the bf16 rounding makes ties
    for quota in (0, 2, ties, ties + 5):
        got, want = row.clone(), row.clone()
        q_got = q_want = quota
        for c in range(0, 4000, 1000):  # chunk by chunk, as the kernel sees them
            q_got = kernels.trim(got[c:c + 1000], threshold, q_got)
            q_want = torch_trim(want[c:c + 1000], threshold, q_want)
        assert q_got == q_want
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
        assert torch.equal(got.signbit(), want.signbit())  # x * 0 keeps the sign, as torch


def test_histograms_equal_the_torch_radix_passes():
    deltas, _ = deltas_with_zeros_and_ties(3, (5000,), torch.float32)
    deltas[2] = 0
    high = kernels.magnitude_histograms(deltas)
    for i in range(3):
        assert torch.equal(high[i], quantile.high_histogram(quantile.magnitude_bits(deltas[i])))
    bins = [int(torch.argmax(high[0])), 0x3C00, -1]
    low = kernels.magnitude_histograms(deltas, bins)
    for i, b in enumerate(bins[:2]):
        assert torch.equal(low[i], quantile.low_histogram(quantile.magnitude_bits(deltas[i]), b))
    assert int(low[2].sum()) == 0


def stored_inputs(k, n, dtype, seed=1):
    """``[k + 1, n]`` rows as a checkpoint stores them (the last one the base): bf16-rounded
    fine-tunes, so that many task-vector entries tie."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    rows = [base + 0.01 * torch.randn(n, generator=g) for _ in range(k)] + [base]
    return torch.stack([r.to(torch.bfloat16).to(dtype) for r in rows])


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_fused_ties_equals_the_torch_steps(stored):
    """Read as stored, converted block by block: the same bits as cast, subtract, trim (quota
    consumed in index order across blocks and calls), sign election and disjoint merge."""
    rows = stored_inputs(3, 5000, stored)
    deltas = (rows[:-1].float() - rows[-1].float())
    threshold = float(torch.sort(deltas[0].abs()).values[3500])
    ties = int((deltas[0].abs() == threshold).sum())
    states = [[threshold, ties // 2], None, [0.0, 10 ** 9]]
    weights = [1.0, 0.5, 2.0]
    want_states = [list(s) if s else s for s in states]
    got_states = [list(s) if s else s for s in states]
    got, want = [], []
    for c in range(0, 5000, 2000):  # three calls, as windows come
        part = rows[:, c:c + 2000]
        fused = kernels.fused_inputs(part[:-1], part[-1], torch.float32)
        assert fused is not None
        got.append(kernels.ties_merge(fused, got_states, weights, unit=False, normalize=True,
                                      scale=0.8))
        d = part[:-1].float() - part[-1].float()
        for i, s in enumerate(want_states):
            if s is None:
                d[i].zero_()
            else:
                s[1] = torch_trim(d[i], s[0], s[1])
        want.append(torch_sign_merge(d, weights, part[-1].float(), True, 0.8))
    assert got_states == want_states
    assert torch.equal(torch.cat(got), torch.cat(want))


def test_fused_inputs_read_rows_where_they_are():
    """Rows of a read window, or separate tensors (views of mapped files), are read in place;
    only a non-contiguous input is copied."""
    rows = stored_inputs(2, 300, torch.bfloat16)
    in_place = kernels.fused_inputs(rows[:-1], rows[-1], torch.float32)
    assert in_place.addrs.tolist() == [r.data_ptr() for r in rows]
    separate = [r.clone() for r in rows]
    apart = kernels.fused_inputs(separate[:-1], separate[-1], torch.float32)
    assert apart.addrs.tolist() == [r.data_ptr() for r in separate]
    strided = torch.stack([rows[0], rows[0]], dim=1)[:, 0]
    assert not strided.is_contiguous()
    copied = kernels.fused_inputs([strided, rows[1]], rows[2], torch.float32)
    assert copied.addrs[0] != strided.data_ptr()
    for fused in (in_place, apart, copied):
        for i in range(3):
            row = fused.owners[i]
            assert row.data_ptr() == fused.addrs[i] and torch.equal(row, rows[i])
    with pytest.raises(ValueError, match="differing sizes"):
        kernels.fused_inputs([rows[0][:10]], rows[1], torch.float32)
    assert kernels.fused_inputs(rows[:-1], rows[-1], torch.float64) is None  # cast instead
    assert kernels.fused_inputs(rows[:-1].half(), rows[-1].half(), torch.float32) is None
    assert kernels.fused_inputs(rows[:-1], rows[-1].float(), torch.float32) is None


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_fused_histograms_equal_those_of_the_cast_task_vectors(stored):
    rows = stored_inputs(3, 3000, stored)
    fused = kernels.fused_inputs(rows[:-1], rows[-1], torch.float32)
    deltas = rows[:-1].float() - rows[-1].float()
    high = kernels.histograms(fused)
    assert torch.equal(high, kernels.magnitude_histograms(deltas))
    bins = [int(torch.argmax(high[0])), int(torch.argmax(high[1])) - 1, -1]
    assert torch.equal(kernels.histograms(fused, bins),
                       kernels.magnitude_histograms(deltas, bins))


@pytest.mark.parametrize("rescale", ["density", "l1", "none"])
def test_fused_dare_ties_equals_the_torch_steps(rescale):
    """Keyed draws, drop, rescale, sign election: the same bits as ``drop_and_rescale`` and
    ``combine``; the L1 statistics agree to float64 rounding (another summation order)."""
    import numpy as np

    from workers.merge.dare_linear import DareParams, L1Rescale, drop_and_rescale
    from workers.merge.dare_ties import dare_ties

    rows = stored_inputs(3, 3000, torch.bfloat16)
    p = DareParams(weight=(1.0, 0.5, 2.0), density=(0.3, 1.0, 0.0), rescale=rescale,
                   scale=1.0, normalize=True)

    def rng():
        return [np.random.SFC64(7 + i) for i in range(3)]

    factors = None
    if rescale == "l1":
        fused_sums = L1Rescale().collect(0, rows[:-1], p, base=rows[-1], state=None, rng=rng(),
                                         dtype=torch.float32)
        torch_sums = L1Rescale().collect(0, list(rows[:-1].double()), p,
                                         base=rows[-1].double(), state=None, rng=rng())
        torch.testing.assert_close(fused_sums, torch_sums, rtol=1e-12, atol=0)
        assert fused_sums[1].tolist() == [0.0, 0.0]  # density 1 keeps all: no statistics
        factors = L1Rescale().reduce(0, fused_sums, p, None)
    got = dare_ties(rows[:-1], p, base=rows[-1], rng=rng(), tensor_stats=factors,
                    dtype=torch.float32)
    base = rows[-1].float()
    want = torch_sign_merge(drop_and_rescale(list(rows[:-1].float()), p, base, rng(), factors),
                            list(p.weight), base, True, 1.0)
    assert torch.equal(got, want)


def test_fused_inputs_without_a_base():
    rows = stored_inputs(3, 300, torch.bfloat16)
    fused = kernels.fused_inputs(rows[:-1], None, torch.float32)
    assert fused.addrs.tolist() == [r.data_ptr() for r in rows[:-1]] and fused.k == 3


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_linear_loop_equals_mergekit_addcmul(stored, k):
    """Σ w_i x_i as fused multiply-adds in model order, then / Σ w: torch's ``addcmul_``
    (mergekit's linear) bit for bit, for entries in whole vectors and in the tail."""
    from workers.merge.linear import LinearParams, linear

    rows = stored_inputs(k, 4099, stored)[:-1]
    weights = [0.3 + 0.7 * i for i in range(k)]
    want = torch.zeros(rows.shape[1])
    for t, w in zip(rows.float(), torch.tensor(weights).unbind(0)):
        want.addcmul_(t, w)
    want /= torch.tensor(weights).sum()
    assert torch.equal(linear(rows, LinearParams(tuple(weights)), dtype=torch.float32), want)
    assert torch.equal(linear(list(rows.float()), LinearParams(tuple(weights))), want)
    unnormalized = linear(rows, LinearParams(tuple(weights), normalize=False),
                          dtype=torch.float32)
    assert not torch.equal(unnormalized, want)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_loop_equals_the_torch_steps(normalize):
    """(x_i − base) · w_i rounded, summed in model order, / Σ w, · λ, + base: ``combine``'s
    torch steps bit for bit (vector lengths, so that torch's sum adds in model order too)."""
    from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic

    rows = stored_inputs(8, 4096, torch.bfloat16)
    p = TaskArithmeticParams(weight=tuple(0.2 + 0.1 * i for i in range(8)), scale=0.7,
                             normalize=normalize)
    base = rows[-1].float()
    want = combine(torch.stack([r - base for r in rows[:-1].float()]), p.weight, base=base,
                   sign_consensus=False, normalize=normalize, scale=0.7)
    got = task_arithmetic(rows[:-1], p, base=rows[-1], dtype=torch.float32)
    assert torch.equal(got, want)


def test_inline_sfc64_draws_are_numpys():
    """The loops' own SFC64 steps give ``random_raw``'s numbers and leave the generator as
    it was; a non-SFC64 generator is refused by name."""
    import numpy as np

    g = np.random.SFC64(42)
    states = kernels.sfc64_states([g])
    plan = kernels.dare_plan(states, np.array([1 << 15]), np.array([1]), np.ones(1))
    rows = torch.stack([torch.ones(1001), torch.zeros(1001)])  # τ = 1: kept entries stay 1
    kept = kernels.dare_ties_merge(kernels.fused_inputs(rows[:1], rows[1], torch.float32),
                                   plan, [1.0], unit=True, normalize=False, scale=1.0)
    draws = np.random.SFC64(42).random_raw(251).view(np.uint16)[:1001]
    assert torch.equal(kept, torch.from_numpy((draws < (1 << 15)).astype(np.float32)))
    assert (kernels.sfc64_states([g]) == states).all()  # not advanced
    # the loops draw for all models of a block at once, two generators stepped together
    gens = [np.random.SFC64(s) for s in (1, 2, 3, 4)]
    raw = np.zeros((4, 251), dtype=np.uint64)
    kernels._draw(kernels.sfc64_states(gens), np.array([0, 2, 3]), raw, 251)
    for i in (0, 2, 3):  # a pair and one alone
        assert (raw[i] == gens[i].random_raw(251)).all()
    assert not raw[1].any()  # density 1 draws nothing
    with pytest.raises(TypeError, match="SFC64"):
        kernels.sfc64_states([np.random.PCG64(1)])
