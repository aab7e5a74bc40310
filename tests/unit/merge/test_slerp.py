import torch

from tests.unit.merge.helpers import tensors
from workers.merge.slerp import SlerpParams, slerp


def test_endpoints():
    """t = 0 returns v0, t = 1 returns v1."""
    a, b = tensors(2)
    torch.testing.assert_close(slerp([a, b], SlerpParams(t=0.0)), a)
    torch.testing.assert_close(slerp([a, b], SlerpParams(t=1.0)), b)


def test_parallel_vectors_fall_back_to_lerp_without_nan():
    """v1 = 2 v0 is parallel: linear interpolation, no NaN."""
    a = tensors(1)[0]
    got = slerp([a, 2 * a], SlerpParams(t=0.25))
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, 0.75 * a + 0.25 * 2 * a)


def test_equal_norms_are_preserved():
    """With ‖v0‖ = ‖v1‖ every interpolant has the same norm."""
    a, b = tensors(2, shape=(50,))
    b = b * a.norm() / b.norm()
    for t in (0.1, 0.5, 0.8):
        torch.testing.assert_close(slerp([a, b], SlerpParams(t=t)).norm(), a.norm())


def test_symmetry():
    """slerp(v0, v1, t) = slerp(v1, v0, 1 − t)."""
    a, b = tensors(2)
    torch.testing.assert_close(slerp([a, b], SlerpParams(t=0.3)),
                               slerp([b, a], SlerpParams(t=0.7)))


def test_matches_formula():
    """Against the closed form computed in float64."""
    a, b = tensors(2, shape=(30,))
    t = 0.35
    a64, b64 = a.double(), b.double()
    omega = torch.acos(torch.dot(a64 / a64.norm(), b64 / b64.norm()))
    want = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    torch.testing.assert_close(slerp([a, b], SlerpParams(t=t)), want.float())
