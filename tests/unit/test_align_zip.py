"""ZipIt!: zipping a model with itself or a permuted copy returns the model; M averages,
U is a membership; beta = 0 forbids within-model fusions."""

import copy

import pytest
import torch

from tests.unit.test_align_match import _forward, _inputs
from tests.unit.test_align_spec import model_state
from workers.align import spec as specs
from workers.align.features import activation_stats
from workers.align.zip import head, merge, zip_features, zipit


def test_zip_matrices_average_members_and_cover_every_unit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    corr = torch.corrcoef(x.T)
    m, u = zip_features(corr, 4, alpha=0.3, beta=0.5)
    assert m.shape == (4, 8) and u.shape == (8, 4)
    torch.testing.assert_close(m.sum(1), torch.ones(4, dtype=torch.float64))
    assert set(u.unique().tolist()) <= {0.0, 1.0} and torch.equal(u.sum(1), torch.ones(8,
                                                                                      dtype=u.dtype))
    torch.testing.assert_close(m, (u / u.sum(0)).T)


def test_beta_zero_pairs_one_unit_of_each_model():
    g = torch.Generator().manual_seed(1)
    corr = torch.corrcoef(torch.randn(300, 12, generator=g, dtype=torch.float64).T)
    _, u = zip_features(corr, 6, alpha=0, beta=0)
    for c in range(6):
        members = u[:, c].nonzero().flatten().tolist()
        assert len(members) == 2 and members[0] < 6 <= members[1]


def test_zipping_a_model_with_a_permuted_copy_returns_it():
    for name in ("mlp", "vit"):
        model, a, spec = model_state(name)
        other = copy.deepcopy(model)
        perms = specs.random_permutations(spec, torch.Generator().manual_seed(4))
        other.load_state_dict(specs.apply(spec, perms, a))
        stats = activation_stats(spec, model, other, _inputs(name), _forward(name))
        zips, head_perms = zipit(spec, stats, alpha=0.3, beta=0.125)
        merged = merge(spec, a, other.state_dict(), zips, head_perms)
        for k in a:
            torch.testing.assert_close(merged[k], a[k], rtol=1e-6, atol=1e-7)


def test_partial_zip_ends_between_ensemble_and_full_zip():
    """Zipping no group gives each model back (the ensemble, exactly); zipping the first
    group only leaves the later layers each model's own, reading the zipped features through
    its unmerge: outputs then come from the zipped trunk."""
    torch.manual_seed(0)
    a_model, a, spec = model_state("mlp")
    b_model = copy.deepcopy(a_model)
    for p in b_model.parameters():
        p.data = torch.randn_like(p) * 0.3
    b = b_model.state_dict()
    stats = activation_stats(spec, a_model, b_model, _inputs("mlp"), _forward("mlp"))
    x = torch.randn(7, 6)
    solved, kept = specs.partial(spec, 0)
    zips, perms = zipit(spec, stats, solved=solved)
    assert sorted(kept) == sorted(a)
    for i, (state, model) in enumerate(((a, a_model), (b, b_model))):
        own = head(spec, state, i, kept, zips, perms)
        assert all(torch.equal(own[k], state[k]) for k in state)
    solved, kept = specs.partial(spec, 1)
    assert sorted(kept) == ["2.bias", "2.weight", "4.bias", "4.weight"]
    zips, perms = zipit(spec, stats, solved=solved)
    assert set(zips) == {"hidden.0"} and not perms
    trunk = merge(spec, a, b, zips, perms)
    for i, (state, model) in enumerate(((a, a_model), (b, b_model))):
        suffix = head(spec, state, i, ["2.weight", "2.bias", "4.weight", "4.bias"], zips, perms)
        net = copy.deepcopy(model)
        net.load_state_dict({**{k: trunk[k] for k in ("0.weight", "0.bias")}, **suffix})
        unmerge = zips["hidden.0"][1][i * 12:(i + 1) * 12].float()  # model i's 12 units
        with torch.no_grad():
            shared = torch.relu(net[0](x))  # the zipped trunk's features
            torch.testing.assert_close(net(x), model[2:](shared @ unmerge.T))


@pytest.mark.parametrize("name", ["vit", "bert", "llama"])
def test_partial_zip_of_a_permuted_copy_gives_each_model_back(name):
    """Transformers: the stem and first layer merged, the residual stream permuted (it runs
    through the kept layers too); each model's kept layers moved into the merged spaces
    compute that model's function."""
    model, a, spec = model_state(name)
    other = copy.deepcopy(model)
    b = specs.apply(spec, specs.random_permutations(spec, torch.Generator().manual_seed(5)), a)
    other.load_state_dict(b)
    stats = activation_stats(spec, model, other, _inputs(name), _forward(name))
    solved, kept = specs.partial(spec, 1)
    assert solved["residual"] == "perm" and "mlp.0" in solved and "mlp.1" not in solved
    zips, perms = zipit(spec, stats, solved=solved)
    assert "residual" in perms and "residual" not in zips
    trunk = merge(spec, a, b, zips, perms)
    x = _inputs(name)[0]
    with torch.no_grad():
        expected = _forward(name)(model, x).logits
        for i, state in enumerate((a, b)):
            net = copy.deepcopy(model)
            net.load_state_dict({**trunk, **head(spec, state, i, kept, zips, perms)})
            torch.testing.assert_close(_forward(name)(net, x).logits, expected, rtol=1e-4,
                                       atol=1e-5)


def test_joint_zip_of_three_permuted_copies_returns_the_model():
    """K-model zip: every unit fuses with its two copies (alpha 1 keeps a fused pair's
    similarity to the third), each model's rows of U select one feature, and the merge of
    the three is the model; K = 2 zips are the same function with ``models=2``."""
    model, a, spec = model_state("mlp")
    states = [a] + [specs.apply(spec, specs.random_permutations(
        spec, torch.Generator().manual_seed(s)), a) for s in (7, 8)]
    nets = []
    for state in states:
        net = copy.deepcopy(model)
        net.load_state_dict(state)
        nets.append(net)
    from workers.align.features import joint_stats
    from workers.align.match import _members_of
    from workers.align.zip import merge_tensor

    stats = joint_stats(spec, nets, _inputs("mlp"), _forward("mlp"))
    zips = {g.name: zip_features(stats[g.name].joint_correlation(), g.size, alpha=1.0,
                                 beta=0.0, models=3) for g in spec.groups}
    for g in spec.groups:
        merge_m, unmerge_m = zips[g.name]
        assert merge_m.shape == (g.size, 3 * g.size)
        assert torch.equal(unmerge_m.sum(0), torch.full((g.size,), 3, dtype=unmerge_m.dtype))
    touching = _members_of(spec)
    for name, value in a.items():
        out = merge_tensor([s[name] for s in states], touching.get(name, []), zips, [{}, {}])
        torch.testing.assert_close(out.float(), value, rtol=1e-5, atol=1e-6)
