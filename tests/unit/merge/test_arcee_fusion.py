import math

import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.arcee_fusion import ArceeFusionParams, arcee_fusion


def naive(model, base):
    """Importance, quartiles by sorting, and the outlier threshold, with Python lists."""
    m, b = model.double().tolist(), base.double().tolist()
    scores = []
    for row_m, row_b in zip(m, b):
        em, eb = [math.exp(v) for v in row_m], [math.exp(v) for v in row_b]
        pm = [v / sum(em) + 1e-8 for v in em]
        pb = [v / sum(eb) + 1e-8 for v in eb]
        kl = sum(x * math.log(x / y) for x, y in zip(pm, pb))
        scores.append([abs(x - y) * kl for x, y in zip(row_m, row_b)])
    flat = sorted(v for row in scores for v in row)
    q1, med, q3 = (flat[int(q * (len(flat) - 1))] for q in (0.25, 0.5, 0.75))
    keep = [[s >= med + 1.5 * (q3 - q1) for s in row] for row in scores]
    return torch.tensor([[x if k else y for x, y, k in zip(rm, rb, rk)]
                         for rm, rb, rk in zip(m, b, keep)], dtype=torch.float64)


def test_matches_naive_reference():
    base = tensors(1, shape=(16, 12), seed=1)[0]
    delta = tensors(1, shape=(16, 12), seed=2, scale=0.05)[0]
    delta[3, 4] = 2.0  # an outlier that must be kept
    model = base + delta
    got = arcee_fusion([model], params(ArceeFusionParams, 1), base=base)
    torch.testing.assert_close(got.double(), naive(model, base), rtol=1e-6, atol=1e-6)
    assert got[3, 4] == model[3, 4]
    assert 0 < int((got != base).sum()) < delta.numel() // 2  # only the outliers move


def test_identical_model_returns_the_base():
    base = tensors(1)[0]
    assert torch.equal(arcee_fusion([base.clone()], params(ArceeFusionParams, 1), base=base),
                       base)
