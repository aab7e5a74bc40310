import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.registry import single_pass_stats
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic
from workers.merge.ties import GlobalTrim, TensorTrim, TiesParams, ties


def naive_ties(xs, base, density, w, scale, normalize, thresholds=None):
    """Loop reference: trim (top-k per tensor, or |τ| >= threshold), elect, disjoint merge."""
    taus = []
    for i, x in enumerate(xs):
        tau = (x - base).reshape(-1).tolist()
        if thresholds is None:
            k = max(1, int(density * len(tau)))
            keep = sorted(range(len(tau)), key=lambda j: -abs(tau[j]))[:k]
            tau = [t if j in keep else 0.0 for j, t in enumerate(tau)]
        else:
            tau = [t if abs(t) >= thresholds[i] else 0.0 for t in tau]
        taus.append([w[i] * t for t in tau])
    out = []
    for j in range(len(taus[0])):
        col = [t[j] for t in taus]
        sign = 1.0 if sum(col) >= 0 else -1.0
        agree = [i for i, t in enumerate(col) if t != 0 and (t > 0) == (sign > 0)]
        s = sum(col[i] for i in agree)
        d = sum(w[i] for i in agree) or 1.0
        out.append(scale * (s / d if normalize else s))
    return base + torch.tensor(out).reshape(base.shape)


def test_per_tensor_matches_naive_reference():
    """Per-tensor trim, sign election and disjoint mean/sum against a loop."""
    *xs, base = tensors(4)
    for normalize in (True, False):
        p = params(TiesParams, 3, density=0.4, weight=[1, 0.7, 1.2], scale=0.9,
                   trim_scope="tensor", normalize=normalize)
        torch.testing.assert_close(ties(xs, p, base=base, stats=None),
                                   naive_ties(xs, base, 0.4, [1, 0.7, 1.2], 0.9, normalize))


def test_sign_election_hand_example():
    """τ = (+3, −1, −1): the sum is +1, so only +3 survives and the disjoint mean is 3."""
    base = torch.zeros(1)
    xs = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    p = params(TiesParams, 3, density=1.0, trim_scope="tensor")
    assert ties(xs, p, base=base, stats=None).item() == 3.0


def test_full_density_single_model_is_task_arithmetic():
    """k = 100%, K = 1, disjoint mean: TIES = TA with the same λ."""
    x, base = tensors(2)
    p = params(TiesParams, 1, density=1.0, scale=0.7, trim_scope="tensor")
    ta = task_arithmetic([x], params(TaskArithmeticParams, 1, scale=0.7), base=base)
    torch.testing.assert_close(ties([x], p, base=base, stats=None), ta)


def test_full_density_same_signs_sum_is_task_arithmetic():
    """k = 100% and every τ_i of one sign everywhere: TIES-sum = TA."""
    base = torch.zeros(4, 6)
    xs = [t.abs() for t in tensors(3)]
    p = params(TiesParams, 3, density=1.0, normalize=False, trim_scope="tensor")
    ta = task_arithmetic(xs, params(TaskArithmeticParams, 3), base=base)
    torch.testing.assert_close(ties(xs, p, base=base, stats=None), ta)


def test_per_tensor_trim_keeps_exactly_k():
    """Exactly int(density * n) entries of a single model's task vector survive."""
    x, base = tensors(2, shape=(10, 10))
    p = params(TiesParams, 1, density=0.37, trim_scope="tensor")
    assert int((ties([x], p, base=base, stats=None) != base).sum()) == 37


def run_global(tensors, density, k):
    """Collect/reduce over the tensors of a group ((tensors, base) each, in plan order) as the
    driver does; returns the params, the thresholds and each tensor's stats."""
    stats = GlobalTrim()
    p = params(TiesParams, k, density=density)
    state = None
    for pass_index in range(stats.passes):
        parts = [stats.collect(pass_index, xs, p, base=b, state=state) for xs, b in tensors]
        total = parts if pass_index in stats.tensor_passes else sum(parts)
        state = stats.reduce(pass_index, total, p, state)
    thresholds = [None if t is None else t[0] for t in state[0]]
    return p, thresholds, [stats.for_tensor(state, slot) for slot in range(len(tensors))]


def test_global_threshold_is_exact_kth_largest_for_any_split():
    """The global threshold equals the k-th largest |τ| of the whole model, whatever the order
    in which the tensors' partials are summed."""
    shapes = [(7, 5), (13,), (3, 4, 2), (50,)]
    base = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in
            enumerate(shapes)]
    models = [[b + torch.randn(b.shape) * (1 + 10 * j) for j, b in enumerate(base)]
              for _ in range(2)]
    tensors_per = [([m[j] for m in models], base[j]) for j in range(len(shapes))]
    for split in ([tensors_per], [tensors_per[:1], tensors_per[1:]],
                  [[t] for t in tensors_per]):
        units = [u for part in split for u in part]
        _, thresholds, _ = run_global(units, 0.3, 2)
        for i in range(2):
            flat = torch.cat([(m - b).abs().reshape(-1) for m, b in
                              zip([mm[i] for mm, _ in tensors_per], base)])
            k = int(0.3 * flat.numel())
            assert thresholds[i] == float(torch.sort(flat, descending=True).values[k - 1])


def test_global_merge_matches_naive_reference():
    """Global trim with the reduced thresholds against the loop reference."""
    *xs, base = tensors(3, shape=(6, 6))
    p, thresholds, (stats,) = run_global([(xs, base)], 0.25, 2)
    torch.testing.assert_close(ties(xs, p, base=base, stats=stats),
                               naive_ties(xs, base, None, [1, 1], 1.0, True, thresholds))


def test_global_and_per_tensor_trim_differ_on_scaled_tensors():
    """A model whose tensors have different scales is trimmed differently globally (the big
    tensor keeps more) than per tensor: regression test for the trim scope."""
    small, big = torch.zeros(20), torch.zeros(20)
    g = torch.Generator().manual_seed(3)
    xs_small, xs_big = [torch.randn(20, generator=g)], [100 * torch.randn(20, generator=g)]
    p, _, (stats_small, _) = run_global([(xs_small, small), (xs_big, big)], 0.5, 1)
    global_small = ties(xs_small, p, base=small, stats=stats_small)
    per_tensor = params(TiesParams, 1, density=0.5, trim_scope="tensor")
    assert int((global_small != 0).sum()) == 0
    assert int((ties(xs_small, per_tensor, base=small, stats=None) != 0).sum()) == 10


def test_zero_density_keeps_nothing():
    """density 0 trims every entry: the result is the base."""
    *xs, base = tensors(3)
    p, thresholds, (stats,) = run_global([(xs, base)], 0.0, 2)
    assert thresholds == [None, None] and stats == [None, None]
    assert torch.equal(ties(xs, p, base=base, stats=stats), base)


def test_per_tensor_trim_ties_index_and_sort():
    """With many tied magnitudes (a coarse grid, like bf16 deltas), both tie rules keep exactly
    k entries: everything above the k-th largest |τ|, and tied ones in index order (``index``)
    or in argsort order (``sort``); chunk by chunk gives the same as whole."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(50, 40)
    x = (torch.randn(50, 40, generator=g) * 4).round() / 4
    k = int(0.3 * x.numel())
    out = {}
    for mode in ("index", "sort"):
        p = params(TiesParams, 1, density=0.3, trim_scope="tensor", trim_ties=mode)
        out[mode] = ties([x], p, base=base, stats=None)
    threshold = x.abs().reshape(-1).sort(descending=True).values[k - 1]
    for got in out.values():
        assert int((got != 0).sum()) == k
        assert ((got != 0) >= (x.abs() > threshold)).all()
    tied = (x.abs() == threshold).reshape(-1).nonzero()[:, 0]
    quota = k - int((x.abs() > threshold).sum())
    want = (x.abs() > threshold).reshape(-1)
    want[tied[:quota]] = True
    assert torch.equal(out["index"].reshape(-1) != 0, want)

    p = params(TiesParams, 1, density=0.3, trim_scope="tensor")
    state = single_pass_stats(TensorTrim(), [x], p, base)
    flat, b = x.reshape(-1), base.reshape(-1)
    pieces = [ties([flat[c:c + 128]], p, base=b[c:c + 128], stats=None, tensor_stats=state)
              for c in range(0, flat.numel(), 128)]
    assert torch.equal(torch.cat(pieces), out["index"].reshape(-1))


def test_global_trim_keeps_exactly_k_with_ties_across_tensors():
    """Magnitudes on a coarse grid tie across tensors: global trim keeps exactly k entries of
    the model, the tied ones taken in tensor order, then index order."""
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(s, generator=g) * 4).round() / 4 for s in ((30, 20), (400,), (9, 9))]
    bases = [torch.zeros_like(x) for x in xs]
    p, thresholds, stats = run_global([([x], b) for x, b in zip(xs, bases)], 0.3, 1)
    flat = torch.cat([x.reshape(-1) for x in xs]).abs()
    k = int(0.3 * flat.numel())
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    got = torch.cat([(ties([x], p, base=b, stats=s) != 0).reshape(-1)
                     for x, b, s in zip(xs, bases, stats)])
    assert int((flat == thresholds[0]).sum()) > int(want[flat == thresholds[0]].sum())  # ties
    assert torch.equal(got, want)
