import dataclasses

import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.lines import LinesParams, lines
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic


def test_scale_grows_linearly_with_depth():
    """At depth d the result is θ0 + (α + β d) Σ w_i τ_i, checked entry by entry."""
    *xs, base = tensors(3)
    for depth in (0.0, 0.25, 1.0):
        p = params(LinesParams, 2, alpha=0.2, beta=0.6, weight=[1.0, 0.5], position=depth)
        want = base + (0.2 + 0.6 * depth) * ((xs[0] - base) + 0.5 * (xs[1] - base))
        torch.testing.assert_close(lines(xs, p, base=base), want)


def test_beta_zero_is_task_arithmetic():
    """β = 0: every depth gets task arithmetic with λ = α, bit for bit."""
    *xs, base = tensors(4)
    ta = task_arithmetic(xs, params(TaskArithmeticParams, 3, scale=0.4), base=base)
    for depth in (0.0, 0.5, 1.0):
        p = params(LinesParams, 3, alpha=0.4, beta=0.0, position=depth)
        assert torch.equal(lines(xs, p, base=base), ta)


def test_zero_scaling_returns_base_and_one_model_at_full_scale_returns_it():
    *xs, base = tensors(3)
    zero = params(LinesParams, 2, alpha=0.0, beta=0.0, position=0.7)
    assert torch.equal(lines(xs, zero, base=base), base)
    last = dataclasses.replace(params(LinesParams, 1, alpha=0.3, beta=0.7), position=1.0)
    torch.testing.assert_close(lines(xs[:1], last, base=base), xs[0], rtol=1e-6, atol=1e-7)
