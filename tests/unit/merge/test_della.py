import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.della import della
from workers.merge.della_linear import DellaParams, della_linear, keep_probabilities
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic
from workers.merge.ties import TiesParams, ties
from workers.tasks import keyed_generator


def gens(k, tensor="t"):
    return [keyed_generator(7, f"m{i}", tensor) for i in range(k)]


def test_keep_probabilities_rank_each_row():
    """Per row: density − ε for the smallest |τ|, density + ε for the largest, linear in rank
    between; ties in index order."""
    delta = torch.tensor([[0.1, -3.0, 0.5, 0.0], [2.0, 2.0, -1.0, 4.0]])
    got = keep_probabilities(delta, 0.5, 0.3)
    step = 0.6 / 3
    want = torch.tensor([[0.2 + step, 0.8, 0.2 + 2 * step, 0.2],
                         [0.2 + step, 0.2 + 2 * step, 0.2, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(keep_probabilities(torch.tensor([1.0, -2.0]), 0.5, 0.1),
                               torch.tensor([0.4, 0.6], dtype=torch.float64))


def test_density_one_is_task_arithmetic():
    base, *xs = tensors(3)
    got = della_linear(xs, params(DellaParams, 2, density=1.0, weight=[0.3, 0.9]), base=base,
                       rng=gens(2))
    want = task_arithmetic(xs, params(TaskArithmeticParams, 2, weight=[0.3, 0.9]), base=base)
    assert torch.equal(got, want)


def test_larger_entries_are_kept_more_often_and_unbiased_on_average():
    """On a 64 x 1024 task vector, kept fractions of the bottom and top halves of each row sit
    near density ∓ ε/2; with rescale: density the merged task vector is unbiased."""
    base = torch.zeros(64, 1024)
    x = tensors(1, shape=(64, 1024), seed=4)[0]
    p = params(DellaParams, 1, density=0.5, epsilon=0.2, rescale="none")
    kept = della_linear([x], p, base=base, rng=gens(1)) != 0
    rank = x.abs().argsort(dim=1).argsort(dim=1)
    low, high = kept[rank < 512].float().mean(), kept[rank >= 512].float().mean()
    assert abs(float(low) - 0.4) < 0.01 and abs(float(high) - 0.6) < 0.01
    p = params(DellaParams, 1, density=0.5, epsilon=0.2)
    runs = torch.stack([della_linear([x], p, base=base, rng=[keyed_generator(s, "m", "t")])
                        for s in range(200)])
    torch.testing.assert_close(runs.mean(0).mean(), x.mean(), atol=2e-3, rtol=0)
    assert float((runs.mean(0) - x).abs().mean()) < 0.1 * float(x.abs().mean())


def test_keyed_masks_and_sign_election():
    """Same keys, same masks; at density 1 della is TIES without trimming (sign election and
    disjoint mean)."""
    base, *xs = tensors(3, seed=9)
    p = params(DellaParams, 2, density=0.5, epsilon=0.1, rescale="none")
    a = della(xs, p, base=base, rng=gens(2))
    assert torch.equal(a, della(xs, p, base=base, rng=gens(2)))
    assert not torch.equal(a, della(xs, p, base=base, rng=gens(2, "other")))
    same = [x.clone() for x in (xs[0], xs[0])]
    out = della(same, params(DellaParams, 2, density=1.0, normalize=True), base=base,
                rng=gens(2))
    torch.testing.assert_close(out, xs[0])
    untrimmed = params(TiesParams, 2, density=1.0, weight=[0.4, 0.8], trim_scope="tensor")
    torch.testing.assert_close(
        della(xs, params(DellaParams, 2, density=1.0, weight=[0.4, 0.8], normalize=True),
              base=base, rng=gens(2)),
        ties(xs, untrimmed, base=base, stats=None))
