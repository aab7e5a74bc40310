"""ZipIt!: zipping a model with itself or a permuted copy returns the model; M averages,
U is a membership; beta = 0 forbids within-model fusions."""

import copy

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
    zips, perms = zipit(spec, stats, groups=[])
    for i, (state, model) in enumerate(((a, a_model), (b, b_model))):
        own = head(spec, state, i, list(state), zips, perms)
        assert all(torch.equal(own[k], state[k]) for k in state)
    zips, perms = zipit(spec, stats, groups=["hidden.0"])
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
