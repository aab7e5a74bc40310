"""Alignment solvers: structured assignment, weight matching and activation matching recover a
permuted copy exactly, and merging a model with its permuted copy returns the model."""

import pytest
import torch

from tests.unit.test_align_spec import model_state, run
from workers.align import spec as specs
from workers.align.features import activation_stats
from workers.align.match import (
    ActivationStats,
    _members_of,
    _step,
    activation_matching,
    assign,
    average,
    colored_descent,
    colors,
    weight_matching,
)


def test_assign_recovers_free_and_head_permutations():
    g = torch.Generator().manual_seed(0)
    free = specs.Group("free", 6, ())
    truth = torch.randperm(6, generator=g)
    profit = torch.randn(6, 6, generator=g) * 0.1
    profit[torch.arange(6), truth] += 5
    assert torch.equal(assign(free, profit), truth)
    for within in (True, False):
        heads = specs.Group("heads", 12, (), head_dim=3, within=within)
        truth = specs.random_permutations(specs.Spec("x", (heads,), ()), g)["heads"]
        profit = torch.randn(12, 12, generator=g) * 0.1
        profit[torch.arange(12), truth] += 5
        got = assign(heads, profit)
        assert torch.equal(got, truth) and specs.is_valid(heads, got)
    # a profit that prefers crossing heads still yields a whole-head permutation
    assert specs.is_valid(specs.Group("h", 12, (), 3), assign(
        specs.Group("h", 12, (), 3), torch.randn(12, 12, generator=g)))


@pytest.mark.parametrize("name", ["mlp", "bert", "llama", "vit"])
def test_weight_matching_recovers_a_permuted_copy(name):
    model, a, spec = model_state(name)
    b = specs.apply(spec, specs.random_permutations(spec, torch.Generator().manual_seed(5)), a)
    perms, history = weight_matching(spec, a, b, seed=1)
    aligned = specs.apply(spec, perms, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    assert history == sorted(history)
    merged = average(spec, a, b, perms)
    assert all(torch.equal(merged[k], a[k]) for k in a)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_colored_weight_matching_recovers_a_permuted_copy_however_split(name):
    """The Jacobi-style schedule: classes share no tensor (a transformer: the residual
    stream, then all block groups together; an MLP: alternate hidden spaces); it recovers a
    permuted copy with a never-decreasing objective, and stepping a class's groups in any
    split or order (as workers do) gives the same permutations, bit for bit."""
    model, a, spec = model_state(name)
    classes = colors(spec)
    tensors = {g.name: {m.tensor for m in g.members} for g in spec.groups}
    for c in classes:
        assert all(not tensors[x] & tensors[y] for x in c for y in c if x != y)
    assert sorted(n for c in classes for n in c) == sorted(g.name for g in spec.groups)
    assert len(classes) == 2
    if name == "vit":
        assert classes[0] == ["residual"]
    b = specs.apply(spec, specs.random_permutations(spec, torch.Generator().manual_seed(5)), a)
    perms, history = weight_matching(spec, a, b, seed=1, schedule="colors")
    aligned = specs.apply(spec, perms, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    assert history == sorted(history)
    touching = _members_of(spec)
    other = torch.Generator().manual_seed(9)
    c = {k: v + 0.3 * torch.randn(v.shape, generator=other) if v.is_floating_point() else v
         for k, v in b.items()}  # a noisy copy: a non-trivial descent

    def reversed_halves(names, current):  # two "workers", each its half, last name first
        out = {}
        for part in (names[1::2], names[::2]):
            out.update({n: _step(spec.group(n), a, c, current, touching) for n in part[::-1]})
        return out

    want, _ = weight_matching(spec, a, c, seed=2, schedule="colors")
    got, _ = colored_descent(spec, reversed_halves, lambda _: 0.0, seed=2)
    assert all(torch.equal(want[k], got[k]) for k in want)


def _inputs(name):
    g = torch.Generator().manual_seed(3)
    if name == "mlp":
        return [torch.randn(64, 6, generator=g) for _ in range(2)]
    if name == "vit":
        return [torch.randn(8, 1, 8, 8, generator=g) for _ in range(2)]
    return [torch.randint(0, 40, (4, 7), generator=g) for _ in range(2)]


def _forward(name):
    if name == "mlp":
        return lambda model, x: model(x)
    if name == "vit":
        return lambda model, x: model(pixel_values=x)
    return lambda model, x: model(input_ids=x)


@pytest.mark.parametrize("name", ["mlp", "vit", "bert", "llama"])
def test_activation_matching_recovers_a_permuted_copy(name):
    import copy

    model, a, spec = model_state(name)
    perms_b = specs.random_permutations(spec, torch.Generator().manual_seed(6))
    other = copy.deepcopy(model)
    other.load_state_dict(specs.apply(spec, perms_b, a))
    stats = activation_stats(spec, model, other, _inputs(name), _forward(name))
    perms = activation_matching(spec, stats)
    aligned = specs.apply(spec, perms, other.state_dict())
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    other.load_state_dict(aligned)
    with torch.no_grad():
        torch.testing.assert_close(run(other, name), run(model, name))


def test_correlation_is_exact_with_large_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 3, generator=g, dtype=torch.float64)
    y = torch.cat([x[:, 1:2], -x[:, 0:1], x[:, 2:3] + 0.5 * torch.randn(5000, 1, generator=g,
                                                                       dtype=torch.float64)], 1)
    stats, halves = ActivationStats(3), [ActivationStats(3), ActivationStats(3)]
    stats.update(x + 1e4, y - 3e4)
    halves[0].update(x[:2500] + 1e4, y[:2500] - 3e4)
    halves[1].update(x[2500:] + 1e4, y[2500:] - 3e4)
    halves[0].add(halves[1])
    want = torch.corrcoef(torch.cat([x, y], 1).T)[:3, 3:]
    torch.testing.assert_close(stats.correlation(), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(halves[0].correlation(), want, rtol=1e-10, atol=1e-10)
