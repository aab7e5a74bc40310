import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.dare_linear import DareParams, dare_linear
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic
from workers.tasks import keyed_generator


def rngs(k, seed=0, tensor="w"):
    return [keyed_generator(seed, f"m{i}", tensor) for i in range(k)]


def test_zero_drop_is_task_arithmetic():
    """p = 0 (density 1) gives exactly task arithmetic."""
    *xs, base = tensors(4)
    ta = task_arithmetic(xs, params(TaskArithmeticParams, 3, scale=0.5), base=base)
    got = dare_linear(xs, params(DareParams, 3, density=1.0, scale=0.5), base=base, rng=rngs(3))
    assert torch.equal(got, ta)


def test_kept_fraction_and_rescale():
    """About density of the entries survive, each rescaled by 1/density."""
    x, base = torch.ones(100, 100), torch.zeros(100, 100)
    got = dare_linear([x], params(DareParams, 1, density=0.3), base=base, rng=rngs(1))
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(got[kept], torch.full_like(got[kept], 1 / 0.3))


def test_mean_over_seeds_is_task_arithmetic():
    """E[DARE] = TA: averaging many seeds converges to task arithmetic (Monte Carlo)."""
    *xs, base = tensors(3)
    p = params(DareParams, 2, density=0.5)
    mean = sum(dare_linear(xs, p, base=base, rng=rngs(2, seed=s)) for s in range(2000)) / 2000
    ta = task_arithmetic(xs, params(TaskArithmeticParams, 2), base=base)
    torch.testing.assert_close(mean, ta, atol=0.15, rtol=0)


def test_masks_are_keyed_not_streamed():
    """The same (seed, model, tensor) gives the same result whatever ran before; another
    tensor name or seed gives another mask."""
    *xs, base = tensors(3)
    p = params(DareParams, 2, density=0.5)
    a = dare_linear(xs, p, base=base, rng=rngs(2))
    keyed_generator(0, "m0", "w").random_raw(10)  # unrelated draws in between
    assert torch.equal(a, dare_linear(xs, p, base=base, rng=rngs(2)))
    assert not torch.equal(a, dare_linear(xs, p, base=base, rng=rngs(2, tensor="v")))
    assert not torch.equal(a, dare_linear(xs, p, base=base, rng=rngs(2, seed=1)))


def test_l1_rescale_restores_norm():
    """rescale: l1 (mergekit's rescale: true) keeps the L1 norm of each task vector."""
    x, base = tensors(2, shape=(20, 20))
    got = dare_linear([x], params(DareParams, 1, density=0.4, rescale="l1"), base=base,
                      rng=rngs(1))
    torch.testing.assert_close((got - base).abs().sum(), (x - base).abs().sum())
