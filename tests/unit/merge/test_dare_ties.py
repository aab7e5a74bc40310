import torch

from tests.unit.merge.helpers import params, tensors
from tests.unit.merge.test_dare_linear import rngs
from workers.merge.dare_linear import DareParams, drop_and_rescale
from workers.merge.dare_ties import dare_ties
from workers.merge.ties import TiesParams, ties


def test_zero_drop_is_ties_without_trim():
    """p = 0: DARE-TIES is TIES with nothing trimmed (sign election, disjoint sum)."""
    *xs, base = tensors(4)
    got = dare_ties(xs, params(DareParams, 3, density=1.0), base=base, rng=rngs(3))
    want = ties(xs, params(TiesParams, 3, density=1.0, trim_scope="tensor", normalize=False),
                base=base, stats=None)
    assert torch.equal(got, want)


def test_sign_election_on_dropped_vectors():
    """The elected sign comes from the DARE-sparsified vectors: reference built from the same
    keyed masks."""
    *xs, base = tensors(4)
    p = params(DareParams, 3, density=0.6)
    dropped = drop_and_rescale(xs, p, base, rngs(3))
    want = base.clone()
    for idx in range(base.numel()):
        col = [float(d.reshape(-1)[idx]) for d in dropped]
        sign = 1 if sum(col) >= 0 else -1
        want.reshape(-1)[idx] += sum(c for c in col if c != 0 and (c > 0) == (sign > 0))
    torch.testing.assert_close(dare_ties(xs, p, base=base, rng=rngs(3)), want)
