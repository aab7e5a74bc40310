import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.linear import LinearParams, linear


def naive(xs, w, normalize):
    out = torch.zeros_like(xs[0])
    for idx in range(out.numel()):
        s = sum(float(wi) * float(x.reshape(-1)[idx]) for x, wi in zip(xs, w))
        out.reshape(-1)[idx] = s / sum(w) if normalize else s
    return out


def test_matches_naive_reference():
    """Weighted average and weighted sum against an element-by-element loop."""
    xs = tensors(3)
    for normalize in (True, False):
        got = linear(xs, params(LinearParams, 3, weight=[0.2, 0.5, 1.3], normalize=normalize))
        torch.testing.assert_close(got, naive(xs, [0.2, 0.5, 1.3], normalize))


def test_copies_return_the_model():
    """Merging K copies of x returns x (up to the rounding of Σ w)."""
    x = tensors(1)[0]
    torch.testing.assert_close(linear([x] * 4, params(LinearParams, 4)), x, rtol=1e-6, atol=0)
    assert torch.equal(linear([x, x], params(LinearParams, 2)), x)


def test_one_hot_weights_pick_a_model():
    """Weights (0, 1, 0) return model 1 exactly."""
    xs = tensors(3)
    assert torch.equal(linear(xs, params(LinearParams, 3, weight=[0, 1, 0])), xs[1])


def test_model_order_does_not_matter():
    """Reordering models together with their weights leaves the result unchanged."""
    xs, w = tensors(3), [0.1, 0.3, 0.6]
    a = linear(xs, params(LinearParams, 3, weight=w))
    b = linear(xs[::-1], params(LinearParams, 3, weight=w[::-1]))
    torch.testing.assert_close(a, b)
