import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.nearswap import NearswapParams, nearswap


def naive(base, other, t):
    out = torch.empty_like(base)
    for i, (a, b) in enumerate(zip(base.reshape(-1).tolist(), other.reshape(-1).tolist())):
        w = min(max(t / max(abs(a - b), 1e-6), 0.0), 1.0)
        out.reshape(-1)[i] = w * b + (1 - w) * a
    return out


def test_matches_naive_reference():
    base, other = tensors(2)
    other[0, :3] = base[0, :3] + 1e-3  # some entries close to the base
    for t in (0.0, 0.01, 0.5, 10.0):
        got = nearswap([other], params(NearswapParams, 1, t=t), base=base)
        torch.testing.assert_close(got, naive(base, other, t))


def test_limits():
    """t = 0 keeps the base; t larger than every distance takes the model; identical inputs
    return the model."""
    base, other = tensors(2)
    assert torch.equal(nearswap([other], params(NearswapParams, 1, t=0.0), base=base), base)
    torch.testing.assert_close(nearswap([other], params(NearswapParams, 1, t=1e3), base=base),
                               other)
    assert torch.equal(nearswap([base], params(NearswapParams, 1, t=0.3), base=base), base)
