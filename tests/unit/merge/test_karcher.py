import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.karcher import KarcherParams, karcher


def riemannian_mean(xs, iters=200):
    """Reference: many float64 fixed-point steps of the Karcher mean of the unit directions."""
    vs = [x.double().reshape(-1) for x in xs]
    norms = [float(v.norm()) for v in vs]
    us = [v / n for v, n in zip(vs, norms)]
    m = sum(us) / len(us)
    m = m / m.norm()
    for _ in range(iters):
        tangent = torch.zeros_like(m)
        for u in us:
            d = float((m @ u).clamp(-1, 1))
            th = torch.arccos(torch.tensor(d, dtype=torch.float64))
            if th > 1e-12:
                tangent += (th / torch.sin(th)) * (u - d * m) / len(us)
        s = tangent.norm()
        if s < 1e-14:
            break
        m = torch.cos(s) * m + torch.sin(s) * tangent / s
        m = m / m.norm()
    return (m * sum(norms) / len(norms)).reshape(xs[0].shape)


def test_converges_to_the_karcher_mean():
    xs = tensors(4, seed=3)
    got = karcher(xs, params(KarcherParams, 4, max_iter=100, tol=1e-9))
    torch.testing.assert_close(got.double(), riemannian_mean(xs), rtol=1e-4, atol=1e-5)


def test_invariants():
    """Identical models return the model; one model is returned as is; all-zero gives zero;
    the result's direction has zero mean log-map (the first-order condition)."""
    x = tensors(1)[0]
    torch.testing.assert_close(karcher([x, x, x], params(KarcherParams, 3)), x)
    assert karcher([x], params(KarcherParams, 1)) is x
    z = torch.zeros(3, 4)
    assert torch.equal(karcher([z, z], params(KarcherParams, 2)), z)
