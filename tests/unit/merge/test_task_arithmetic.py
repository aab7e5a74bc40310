import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.linear import LinearParams, linear
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic


def naive(xs, base, w, scale):
    out = base.clone()
    for idx in range(out.numel()):
        tau = sum(wi * (float(x.reshape(-1)[idx]) - float(base.reshape(-1)[idx]))
                  for x, wi in zip(xs, w))
        out.reshape(-1)[idx] = float(base.reshape(-1)[idx]) + scale * tau
    return out


def test_matches_naive_reference():
    """θ0 + λ Σ w_i τ_i against an element-by-element loop."""
    *xs, base = tensors(4)
    got = task_arithmetic(xs, params(TaskArithmeticParams, 3, weight=[1, 0.5, 2], scale=0.3),
                          base=base)
    torch.testing.assert_close(got, naive(xs, base, [1, 0.5, 2], 0.3))


def test_zero_scale_returns_base():
    """λ = 0 gives θ0 exactly."""
    *xs, base = tensors(3)
    assert torch.equal(task_arithmetic(xs, params(TaskArithmeticParams, 2, scale=0.0),
                                       base=base), base)


def test_single_model_scale_one_returns_it():
    """K = 1, λ = 1 gives θ1 (θ0 + (θ1 − θ0), one rounding)."""
    x, base = tensors(2)
    got = task_arithmetic([x], params(TaskArithmeticParams, 1), base=base)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-7)


def test_scale_one_over_k_is_uniform_average():
    """λ = 1/K with unit weights equals the uniform soup."""
    *xs, base = tensors(5)
    got = task_arithmetic(xs, params(TaskArithmeticParams, 4, scale=0.25), base=base)
    torch.testing.assert_close(got, linear(xs, params(LinearParams, 4)))


def test_two_copies_with_half_scale_return_the_model():
    """{θ1, θ1} with λ = 0.5 gives θ1."""
    x, base = tensors(2)
    got = task_arithmetic([x, x], params(TaskArithmeticParams, 2, scale=0.5), base=base)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-7)
