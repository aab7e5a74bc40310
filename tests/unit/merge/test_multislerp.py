import math

import pytest
import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.multislerp import MultislerpParams, multislerp
from workers.merge.slerp import SlerpParams, slerp

CLOSE = dict(rtol=1e-5, atol=1e-6)  # float32 results against float64 references


def naive(xs, w, base=None):
    """The tangent-space barycentre written out in float64 with Python loops."""
    vs = [(x - base if base is not None else x).double().reshape(-1) for x in xs]
    w = [wi / sum(w) for wi in w]
    norms = [float(v.norm()) for v in vs]
    units = [v / n for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - float(u @ mean) * mean) for wi, u in zip(w, units))
    tn = float(tangent.norm())
    out = (mean * math.cos(tn) + tangent * (math.sin(tn) / tn)) * sum(
        wi * n for wi, n in zip(w, norms))
    out = out.reshape(xs[0].shape)
    return out + base.double() if base is not None else out


def test_matches_naive_reference_with_and_without_base():
    xs = tensors(3, seed=1)
    base = tensors(1, seed=2)[0]
    w = [0.5, 1.0, 2.0]
    p = params(MultislerpParams, 3, weight=w)
    torch.testing.assert_close(multislerp(xs, p, base=None).double(), naive(xs, w), **CLOSE)
    torch.testing.assert_close(multislerp(xs, p, base=base).double(), naive(xs, w, base), **CLOSE)


def test_identical_models_return_the_model():
    x = tensors(1)[0]
    torch.testing.assert_close(multislerp([x, x, x], params(MultislerpParams, 3), base=None), x)


def test_one_hot_weights_pick_a_model():
    xs = tensors(3)
    got = multislerp(xs, params(MultislerpParams, 3, weight=[0, 1, 0]), base=None)
    torch.testing.assert_close(got, xs[1], **CLOSE)


def test_two_models_of_equal_norm_agree_with_slerp():
    """For two inputs of the same norm the tangent-space mean is the geodesic midpoint."""
    a, b = tensors(2)
    b = b * (a.norm() / b.norm())
    torch.testing.assert_close(multislerp([a, b], params(MultislerpParams, 2), base=None),
                               slerp([a, b], SlerpParams(t=0.5)), **CLOSE)


def test_antipodal_inputs():
    a = tensors(1)[0]
    got = multislerp([a, -a], params(MultislerpParams, 2), base=None)  # falls back to lerp
    assert torch.equal(got, torch.zeros_like(a))
    with pytest.raises(ValueError, match="antipodal"):
        multislerp([a, -a, a, -a], params(MultislerpParams, 4), base=None)
    # a tensor no fine-tune changed: the base, not an error
    assert torch.equal(multislerp([a, a, a], params(MultislerpParams, 3), base=a), a)
