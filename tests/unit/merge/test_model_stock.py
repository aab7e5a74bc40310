import torch

from tests.unit.merge.helpers import tensors
from workers.merge.model_stock import ModelStockParams, model_stock


def test_identical_offsets_return_the_finetune():
    """All offsets equal: cos = 1, t = 1, the result is θ1."""
    x, base = tensors(2)
    torch.testing.assert_close(model_stock([x, x, x], ModelStockParams(), base=base), x)


def test_orthogonal_offsets_return_the_base():
    """Orthogonal offsets: cos = 0, t = 0, the result is θ0."""
    base = torch.ones(4)
    xs = [base + torch.tensor([1.0, 0, 0, 0]), base + torch.tensor([0, 2.0, 0, 0])]
    assert torch.equal(model_stock(xs, ModelStockParams(), base=base), base)


def test_ratio_formula():
    """t = k cos / (1 + (k − 1) cos) applied between base and average."""
    base = torch.zeros(2)
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    cos = 1 / 2 ** 0.5
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(model_stock(xs, ModelStockParams(), base=base),
                               t * torch.tensor([1.0, 0.5]))


def test_negative_cosine_is_clamped_to_base():
    """Opposed offsets (cos = −1) are clamped to cos = 0: the base, no blow-up."""
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, 2, 3]), torch.tensor([-1.0, -2, -3])]
    assert torch.equal(model_stock(xs, ModelStockParams(), base=base), base)


def test_filter_wise_uses_one_ratio_per_row():
    """filter_wise: row 0 with identical offsets returns the fine-tune, row 1 with orthogonal
    offsets returns the base."""
    base = torch.zeros(2, 2)
    xs = [torch.tensor([[1.0, 1], [1, 0]]), torch.tensor([[1.0, 1], [0, 1]])]
    got = model_stock(xs, ModelStockParams(filter_wise=True), base=base)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1], [0, 0]]))
