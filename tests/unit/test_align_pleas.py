"""PLeaS on two small MLPs: partial matching spans widths n..2n; at 2n the fit is the ensemble;
two identical models at width n give the model back; least squares fits the targets at least as
well as averaging the matched weights."""

import copy

import torch
from torch import nn

from workers.align.pleas import _solve, _targets, partial_matching, pleas


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def correlations(a, b, x):
    """Pearson correlation of the two models' hidden units (A rows, B columns), per space."""
    out, ha, hb = [], x, x
    with torch.no_grad():
        for la, lb in ((a[0], b[0]), (a[2], b[2])):
            ha, hb = torch.relu(la(ha)), torch.relu(lb(hb))
            joint = torch.corrcoef(torch.cat([ha, hb], 1).T.double())
            out.append(torch.nan_to_num(joint[:8, 8:]))
    return out


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def run(hidden, head, x):
    for w, b in hidden:
        x = torch.relu(x @ w.T + b)
    return x @ head[0].T + head[1]


def test_partial_matching_spans_n_to_2n():
    corr = torch.eye(4) + 0.01 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    a_to, b_to = partial_matching(corr, 4)
    assert torch.equal(a_to, b_to) and sorted(a_to.tolist()) == [0, 1, 2, 3]
    a_to, b_to = partial_matching(corr, 8)
    assert sorted(a_to.tolist() + b_to.tolist()) == list(range(8))
    a_to, b_to = partial_matching(corr, 6)  # two pairs merged, two units of each kept
    assert len(set(a_to.tolist()) & set(b_to.tolist())) == 2


def test_width_2n_is_the_ensemble():
    a, b = mlp(0), mlp(1)
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(2))
    hidden, heads = pleas(linears(a), linears(b), correlations(a, b, x), [16, 16], x,
                          ridge=1e-12)
    for model, head in zip((a, b), heads):
        with torch.no_grad():
            torch.testing.assert_close(run(hidden, head, x), model(x), rtol=1e-4, atol=1e-4)


def test_a_model_merged_with_itself_at_width_n_comes_back():
    a = mlp(0)
    b = copy.deepcopy(a)
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(3))
    hidden, heads = pleas(linears(a), linears(b), correlations(a, b, x), [8, 8], x,
                          ridge=1e-12)
    with torch.no_grad():
        for head in heads:
            torch.testing.assert_close(run(hidden, head, x), a(x), rtol=1e-4, atol=1e-4)


def test_least_squares_fits_at_least_as_well_as_averaging():
    a, b = mlp(0), mlp(1)
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(4))
    corr = correlations(a, b, x)[0]
    a_to, b_to = partial_matching(corr, 8)
    with torch.no_grad():
        y = _targets(a[0](x), b[0](x), a_to, b_to, 8)
        w, bias = _solve(x, y, 0.0)
        fitted = ((x.double() @ w.T + bias - y) ** 2).sum()
        order = torch.argsort(b_to)  # B's unit for each merged unit
        avg_w = (a[0].weight[torch.argsort(a_to)] + b[0].weight[order]) / 2
        avg_b = (a[0].bias[torch.argsort(a_to)] + b[0].bias[order]) / 2
        averaged = ((x @ avg_w.T + avg_b).double() - y).square().sum()
    assert fitted <= averaged


def test_least_squares_from_sums_is_least_squares():
    """solve_gram on summed [x 1]ᵀ[x 1] and [x 1]ᵀ y (what PLeaS' rounds add up across
    batches) gives the least-squares fit, with and without a bias column."""
    from workers.align.pleas import solve_gram, with_ones

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)  # batches x tokens x features
    w, b = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, generator=g,
                                                                            dtype=torch.float64)
    y = x @ w.T + b
    parts = [with_ones(x[i]) for i in range(3)]
    gram = sum(p.T @ p for p in parts)
    cross = sum(p.T @ y[i].reshape(-1, 4) for i, p in enumerate(parts))
    got_w, got_b = solve_gram(gram, cross, 0.0)
    torch.testing.assert_close(got_w, w)
    torch.testing.assert_close(got_b, b)
    got_w, none = solve_gram(gram, cross, 0.0, bias=False)
    want = torch.linalg.lstsq(x.reshape(-1, 5), y.reshape(-1, 4)).solution.T
    assert none is None
    torch.testing.assert_close(got_w, want)
