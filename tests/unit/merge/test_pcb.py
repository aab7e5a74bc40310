import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.pcb import PcbParams, pcb


def naive(xs, base, ratio, scale):
    """The reference algorithm with full sorts on the flattened task vectors."""
    t = torch.stack([(x - base).reshape(-1) for x in xs]).float()
    k, d = t.shape

    def clamp(x, min_ratio, max_ratio):
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1),
                           s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    def normalize(x):
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - lo) / (hi - lo)

    magnitude = clamp(t.abs(), 0.0001, 0.0001)
    clipped = torch.sign(t) * magnitude
    beta = torch.exp(normalize(magnitude) ** 2 * k) * torch.tanh(t * t.sum(0))
    weight = normalize(clamp(beta, 1 - ratio, 0))
    merged = (clipped * weight).sum(0) / weight.sum(0).clamp(min=1e-12)
    return base + (merged * scale).reshape(base.shape)


def test_matches_the_sorting_reference():
    *xs, base = tensors(4, shape=(60, 70))
    for ratio in (0.1, 0.3):
        got = pcb(xs, params(PcbParams, 3, ratio=ratio, scale=0.8), base=base)
        torch.testing.assert_close(got, naive(xs, base, ratio, 0.8))


def test_one_model_keeps_its_clipped_top_entries():
    """K = 1: the weights cancel where positive: the clipped τ_1 on its top-ratio entries."""
    x, base = tensors(2, shape=(40, 50))
    got = pcb([x], params(PcbParams, 1, ratio=0.2), base=base) - base
    kept = got != 0
    assert 0.15 < kept.float().mean() < 0.25
    tau = (x - base).reshape(-1)
    s = torch.sort(tau.abs()).values
    lo, hi = s[int(len(s) * 0.0001)], s[int(len(s) * (1 - 0.0001) - 1)]
    clipped = (torch.sign(tau) * tau.abs().clamp(lo, hi)).reshape(x.shape)
    assert hi < tau.abs().max()  # the largest entry is clipped
    torch.testing.assert_close(got[kept], clipped[kept], rtol=1e-6, atol=1e-6)


def test_model_order_does_not_matter():
    *xs, base = tensors(4, shape=(30, 30))
    p = params(PcbParams, 3)
    a = pcb(xs, p, base=base)
    b = pcb([xs[2], xs[0], xs[1]], p, base=base)
    torch.testing.assert_close(a, b)
