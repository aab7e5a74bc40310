import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.breadcrumbs import BreadcrumbsParams
from workers.merge.breadcrumbs_ties import breadcrumbs_ties
from workers.merge.ties import TiesParams, ties


def test_full_density_is_untrimmed_ties():
    """density 1 (nothing dropped): TIES' sign election and disjoint mean, nothing else."""
    base, *xs = tensors(4, seed=2)
    p = params(BreadcrumbsParams, 3, density=1.0, weight=[0.5, 1.0, 0.2], normalize=True)
    want = ties(xs, params(TiesParams, 3, density=1.0, weight=[0.5, 1.0, 0.2],
                           trim_scope="tensor"), base=base, stats=None)
    torch.testing.assert_close(breadcrumbs_ties(xs, p, base=base), want)


def test_outliers_are_removed_before_the_election():
    """A planted huge entry in one model is dropped (gamma), so it neither wins the sign
    election nor reaches the output."""
    base = torch.zeros(10, 10)
    a, b = tensors(2, shape=(10, 10), seed=3, scale=0.1)
    a[0, 0], b[0, 0] = 100.0, -0.05
    p = params(BreadcrumbsParams, 2, density=0.9, gamma=0.01, normalize=True)
    out = breadcrumbs_ties([a, b], p, base=base)
    assert out[0, 0] != 100.0 and abs(float(out[0, 0])) < 1.0
