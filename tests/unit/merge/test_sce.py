import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.sce import SceParams, sce


def naive(xs, base, fraction):
    """Select / calculate / erase written entry by entry in float64."""
    tv = [(x - base).double().reshape(-1).tolist() for x in xs]
    n, k_models = len(tv[0]), len(tv)
    var = []
    for j in range(n):
        col = [t[j] for t in tv]
        mean = sum(col) / k_models
        var.append(sum((c - mean) ** 2 for c in col) / k_models)
    if fraction < 1:
        k = int(sum(v != 0 for v in var) * fraction)
        keep = set(sorted(range(n), key=lambda j: -var[j])[:k])
        tv = [[t[j] if j in keep else 0.0 for j in range(n)] for t in tv]
    energy = [sum(v * v for v in t) / n for t in tv]
    w = [e / sum(energy) for e in energy]
    out = []
    for j in range(n):
        s = sum(t[j] for t in tv)
        sign = 1.0 if s >= 0 else -1.0
        agree = [i for i in range(k_models) if tv[i][j] != 0 and (tv[i][j] > 0) == (sign > 0)]
        den = max(sum(w[i] for i in agree), 1e-6)
        out.append(sum(w[i] * tv[i][j] for i in agree) / den)
    return base.double() + torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def test_matches_naive_reference():
    base = tensors(1, seed=5)[0]
    xs = [base + d for d in tensors(3, seed=6, scale=0.1)]
    for fraction in (1.0, 0.5, 0.2):
        got = sce(xs, params(SceParams, 3, select_topk=fraction), base=base)
        torch.testing.assert_close(got.double(), naive(xs, base, fraction), rtol=1e-5,
                                   atol=1e-6)


def test_identical_and_single_models_return_the_model():
    base = tensors(1, seed=1)[0]
    x = base + tensors(1, seed=2, scale=0.1)[0]
    torch.testing.assert_close(sce([x, x, x], params(SceParams, 3), base=base), x)
    torch.testing.assert_close(sce([x], params(SceParams, 1), base=base), x)


def test_select_keeps_the_requested_fraction_of_varying_entries():
    """At select_topk = 0.25 exactly a quarter of the entries move away from the base: at each
    selected entry the larger of the two deltas agrees with the elected sign."""
    base = torch.zeros(8, 8)
    xs = tensors(2, shape=(8, 8), seed=3)
    got = sce(xs, params(SceParams, 2, select_topk=0.25), base=base)
    assert int((got != 0).sum()) == 16
