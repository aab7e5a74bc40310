import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.passthrough import PassthroughParams, passthrough


def test_returns_the_model_unchanged_by_default():
    x = tensors(1)[0]
    assert passthrough([x], params(PassthroughParams, 1)) is x


def test_scale_matches_naive_product():
    x = tensors(1)[0]
    got = passthrough([x], params(PassthroughParams, 1, scale=0.25))
    naive = torch.tensor([[0.25 * float(v) for v in row] for row in x.tolist()])
    torch.testing.assert_close(got, naive)
