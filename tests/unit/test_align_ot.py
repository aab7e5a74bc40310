"""OT fusion: the cost is the activations' mean squared difference; EMD on a permuted copy is
the permutation (the model comes back); the identity plan is plain averaging; Sinkhorn's plan
is soft with uniform marginals."""

import copy

import pytest
import torch

from tests.unit.test_align_match import _forward, _inputs
from tests.unit.test_align_spec import model_state
from workers.align import spec as specs
from workers.align.features import activation_stats
from workers.align.match import ActivationStats, _members_of
from workers.align.ot import fuse, ot_fusion, transport, transport_cost


def test_cost_is_the_mean_squared_activation_difference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=g, dtype=torch.float64) + 3
    b = torch.randn(200, 5, generator=g, dtype=torch.float64) - 1
    stats = ActivationStats(5)
    stats.update(a[:50], b[:50])
    stats.update(a[50:], b[50:])
    want = ((a[:, :, None] - b[:, None, :]) ** 2).mean(0)
    torch.testing.assert_close(transport_cost(stats), want)


def test_emd_on_a_permuted_copy_returns_the_model():
    for name in ("mlp", "vit"):
        model, a, spec = model_state(name)
        other = copy.deepcopy(model)
        perms = specs.random_permutations(spec, torch.Generator().manual_seed(5))
        other.load_state_dict(specs.apply(spec, perms, a))
        stats = activation_stats(spec, model, other, _inputs(name), _forward(name))
        plans, head_perms = ot_fusion(spec, stats, solver="emd")
        for plan in plans.values():  # a permutation, scaled by 1/n
            n = len(plan)
            assert torch.equal((plan * n).round(), plan * n) and (plan > 0).sum() == n
        touching = _members_of(spec)
        b = other.state_dict()
        for k in a:
            got = fuse(touching.get(k, []), [a[k], b[k]], [plans], [head_perms])
            torch.testing.assert_close(got.float(), a[k], rtol=1e-6, atol=1e-6, msg=k)


def test_identity_plan_is_averaging():
    model, a, spec = model_state("mlp")
    b = {k: v + 1 for k, v in a.items()}
    plans = {g.name: torch.eye(g.size, dtype=torch.float64) / g.size for g in spec.groups}
    touching = _members_of(spec)
    for k in a:
        got = fuse(touching.get(k, []), [a[k], b[k]], [plans], [{}])
        torch.testing.assert_close(got.float(), (a[k] + b[k]) / 2)


def test_sinkhorn_is_soft_with_uniform_marginals():
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(6, 6, generator=g, dtype=torch.float64)
    plan = transport(cost, "sinkhorn", reg=0.1)
    torch.testing.assert_close(plan.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(0), torch.full((6,), 1 / 6, dtype=torch.float64))
    assert (plan > 1e-6).sum() > 6  # not a permutation
    exact = transport(cost, "emd")
    assert (cost * exact).sum() <= (cost * plan).sum()  # EMD is the cheapest plan


def test_a_widened_copy_fuses_back_into_the_narrower_model():
    """B = A with every hidden unit duplicated (in shuffled order) and its outgoing weights
    halved (function-preserving, twice as wide): fused into A by EMD, A comes back, shapes
    A's."""
    from torch import nn

    from workers.align.spec import build

    model, a, spec = model_state("mlp")  # 6 -> 12 -> 10 -> 3
    g = torch.Generator().manual_seed(7)
    idx1 = torch.cat([torch.arange(12)] * 2)[torch.randperm(24, generator=g)]
    idx2 = torch.cat([torch.arange(10)] * 2)[torch.randperm(20, generator=g)]
    wide = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(),
                         nn.Linear(20, 3)).eval()
    b = {"0.weight": a["0.weight"][idx1], "0.bias": a["0.bias"][idx1],
         "2.weight": a["2.weight"][idx2][:, idx1] / 2, "2.bias": a["2.bias"][idx2],
         "4.weight": a["4.weight"][:, idx2] / 2, "4.bias": a["4.bias"]}
    wide.load_state_dict(b)
    x = torch.randn(5, 6)
    torch.testing.assert_close(wide(x), model(x), rtol=1e-5, atol=1e-6)
    spec_b = build({k: tuple(v.shape) for k, v in b.items()}, {})
    stats = activation_stats(spec, model, wide, _inputs("mlp"), _forward("mlp"), spec_b)
    plans, head_perms = ot_fusion(spec, stats, solver="emd")
    assert {k: tuple(v.shape) for k, v in plans.items()} == {"hidden.0": (12, 24),
                                                             "hidden.2": (10, 20)}
    touching = _members_of(spec)
    for k in a:
        got = fuse(touching.get(k, []), [a[k], b[k]], [plans], [head_perms])
        assert got.shape == a[k].shape
        torch.testing.assert_close(got.float(), a[k], rtol=1e-6, atol=1e-6, msg=k)


def test_attention_is_soft_inside_matched_heads_only():
    """Soft alignment through attention: a ViT's head groups get block plans (each A head's
    dims sent only to its matched B head's dims; Sinkhorn soft inside, uniform marginals);
    under rotary embeddings (Llama) heads are permuted only."""
    model, a, spec = model_state("vit")
    torch.manual_seed(3)
    other = copy.deepcopy(model)
    for p in other.parameters():
        p.data = torch.randn_like(p) * 0.2
    stats = activation_stats(spec, model, other, _inputs("vit"), _forward("vit"))
    plans, perms = ot_fusion(spec, stats, solver="sinkhorn", reg=0.1)
    attention = [g for g in spec.groups if g.head_dim is not None]
    assert attention and not perms
    for g in attention:
        plan, hd = plans[g.name], g.head_dim
        n = g.size
        torch.testing.assert_close(plan.sum(1), torch.full((n,), 1 / n, dtype=torch.float64))
        torch.testing.assert_close(plan.sum(0), torch.full((n,), 1 / n, dtype=torch.float64))
        blocks = plan.view(n // hd, hd, n // hd, hd).sum((1, 3))
        assert ((blocks > 0).sum(1) == 1).all() and ((blocks > 0).sum(0) == 1).all()
        inside = plan.view(n // hd, hd, n // hd, hd).permute(0, 2, 1, 3)[blocks > 0]
        assert ((inside > 1e-9).sum((1, 2)) > hd).all()  # soft, not a permutation
    model, a, spec = model_state("llama")
    other = copy.deepcopy(model)
    other.load_state_dict(specs.apply(spec, specs.random_permutations(
        spec, torch.Generator().manual_seed(2)), a))
    stats = activation_stats(spec, model, other, _inputs("llama"), _forward("llama"))
    plans, perms = ot_fusion(spec, stats, solver="sinkhorn", reg=0.1)
    assert {g.name for g in spec.groups if g.head_dim is not None} == set(perms)


@pytest.mark.parametrize("name", ["mlp", "vit", "bert", "llama"])
def test_weights_cost_recovers_a_permuted_copy_without_data(name):
    """cost: weights: the chain (residual from the embeddings, then each block's groups from
    rows that read it; an MLP layer by layer) sends a permuted copy back onto the model."""
    from workers.align.ot import weight_plans

    model, a, spec = model_state(name)
    b = specs.apply(spec, specs.random_permutations(spec, torch.Generator().manual_seed(4)), a)
    plans, perms = weight_plans(spec, a, b, solver="emd")
    assert set(plans) | set(perms) == {g.name for g in spec.groups}
    touching = _members_of(spec)
    for k in a:
        if a[k].is_floating_point():
            got = fuse(touching.get(k, []), [a[k], b[k]], [plans], [perms])
            torch.testing.assert_close(got.float(), a[k], rtol=1e-6, atol=1e-6, msg=k)
