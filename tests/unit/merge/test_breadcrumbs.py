import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.breadcrumbs import BreadcrumbsParams, breadcrumbs
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic


def test_full_density_no_gamma_is_task_arithmetic():
    """density 1, gamma 0: breadcrumbs = TA."""
    *xs, base = tensors(3)
    got = breadcrumbs(xs, params(BreadcrumbsParams, 2, density=1.0, gamma=0.0, scale=0.4),
                      base=base)
    assert torch.equal(got, task_arithmetic(xs, params(TaskArithmeticParams, 2, scale=0.4),
                                            base=base))


def test_outlier_removed_and_exact_count_kept():
    """A planted huge entry is dropped; exactly int(density * n) entries remain, and they are
    the largest remaining after the gamma fraction of outliers."""
    base = torch.zeros(100)
    x = torch.arange(1, 101, dtype=torch.float32)
    x[17] = 1e6
    got = breadcrumbs([x], params(BreadcrumbsParams, 1, density=0.5, gamma=0.02), base=base)
    assert got[17] == 0
    assert int((got != 0).sum()) == 50
    # |τ| ascending: 1..17, 19..100, 1e6; drop 48 smallest and the 2 largest (gamma = 2%)
    assert sorted(got[got != 0].tolist()) == [float(v) for v in range(50, 100)]


def test_matches_sorted_reference():
    """Drop the gamma largest, then the smallest down to density, against a sort."""
    x, base = tensors(2, shape=(10, 10))
    got = breadcrumbs([x], params(BreadcrumbsParams, 1, density=0.6, gamma=0.1), base=base)
    tau = (x - base).reshape(-1)
    order = torch.sort(tau.abs()).indices.tolist()
    keep = set(order[30:90])  # 100 - 60 - 10 smallest dropped, 60 kept, 10 largest dropped
    want = base.reshape(-1).clone()
    for j in keep:
        want[j] += tau[j]
    torch.testing.assert_close(got.reshape(-1), want)
