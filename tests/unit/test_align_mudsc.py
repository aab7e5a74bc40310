"""MuDSC: f = 0 is activation matching / ZipIt! exactly; a permuted copy comes back for any f;
head groups stay whole."""

import copy

import pytest
import torch

from tests.unit.test_align_match import _forward, _inputs
from tests.unit.test_align_spec import model_state
from workers.align import spec as specs
from workers.align.features import activation_stats
from workers.align.match import activation_matching
from workers.align.mudsc import mudsc_perm, mudsc_zip
from workers.align.zip import merge, zipit


def _pair(name, seed, permuted=True):
    model, a, spec = model_state(name)
    other = copy.deepcopy(model)
    if permuted:
        other.load_state_dict(specs.apply(spec, specs.random_permutations(
            spec, torch.Generator().manual_seed(seed)), a))
    else:
        torch.manual_seed(seed)
        for p in other.parameters():
            p.data = torch.randn_like(p) * 0.2
    stats = activation_stats(spec, model, other, _inputs(name), _forward(name))
    return spec, a, other.state_dict(), stats


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_f_zero_is_activation_matching_and_zipit(name):
    spec, a, b, stats = _pair(name, 7, permuted=False)
    perms = mudsc_perm(spec, a, b, stats, f=0)
    want = activation_matching(spec, stats)
    assert all(torch.equal(perms[k], want[k]) for k in want)
    zips, heads = mudsc_zip(spec, a, b, stats, f=0, alpha=0.3, beta=0.125)
    want_zips, want_heads = zipit(spec, stats, alpha=0.3, beta=0.125)
    assert all(torch.equal(zips[k][0], want_zips[k][0]) and torch.equal(zips[k][1],
                                                                          want_zips[k][1])
               for k in want_zips)
    assert all(torch.equal(heads[k], want_heads[k]) for k in want_heads)


@pytest.mark.parametrize("name", ["mlp", "vit"])
@pytest.mark.parametrize("f", [0.3, 1.0])
def test_permuted_copy_comes_back_for_any_balance(name, f):
    spec, a, b, stats = _pair(name, 8)
    perms = mudsc_perm(spec, a, b, stats, f=f)
    assert all(specs.is_valid(spec.group(k), p) for k, p in perms.items())
    aligned = specs.apply(spec, perms, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    zips, heads = mudsc_zip(spec, a, b, stats, f=f)
    merged = merge(spec, a, b, zips, heads)
    for k in a:
        torch.testing.assert_close(merged[k], a[k], rtol=1e-6, atol=1e-7)
