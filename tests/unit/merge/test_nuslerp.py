import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.nuslerp import NuslerpParams, nuslerp
from workers.merge.slerp import SlerpParams, slerp

CLOSE = dict(rtol=1e-5, atol=1e-6)  # float32 results against float64 references


def naive_vector_slerp(t, a, b):
    a, b = a.double(), b.double()
    cos = float((a / a.norm()) @ (b / b.norm()))
    th = torch.arccos(torch.tensor(cos, dtype=torch.float64))
    return (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / torch.sin(th)


def test_flattened_equals_slerp_at_weight_ratio():
    a, b = tensors(2)
    got = nuslerp([a, b], params(NuslerpParams, 2, weight=[1.0, 3.0]), base=None)
    torch.testing.assert_close(got, slerp([a, b], SlerpParams(t=0.75)), **CLOSE)


def test_per_vector_matches_naive_reference():
    """flatten false: one angle per vector along the last dim; row_wise: along dim 0."""
    a, b = tensors(2)
    p = params(NuslerpParams, 2, weight=[2.0, 1.0], flatten=False)
    want = torch.stack([naive_vector_slerp(1 / 3, a[i], b[i]) for i in range(a.shape[0])])
    torch.testing.assert_close(nuslerp([a, b], p, base=None).double(), want, **CLOSE)
    p = params(NuslerpParams, 2, weight=[2.0, 1.0], flatten=False, row_wise=True)
    want = torch.stack([naive_vector_slerp(1 / 3, a[:, j], b[:, j]) for j in range(a.shape[1])],
                       dim=1)
    torch.testing.assert_close(nuslerp([a, b], p, base=None).double(), want, **CLOSE)


def test_base_interpolates_task_vectors():
    a, b, base = tensors(3)
    p = params(NuslerpParams, 2, weight=[1.0, 1.0])
    want = base.double() + naive_vector_slerp(0.5, (a - base).reshape(-1),
                                              (b - base).reshape(-1)).reshape(a.shape)
    torch.testing.assert_close(nuslerp([a, b], p, base=base).double(), want, **CLOSE)


def test_ends_and_identical_models():
    a, b = tensors(2)
    torch.testing.assert_close(nuslerp([a, b], params(NuslerpParams, 2, weight=[1, 0]),
                                       base=None), a, **CLOSE)
    torch.testing.assert_close(nuslerp([a, a], params(NuslerpParams, 2), base=None), a)
