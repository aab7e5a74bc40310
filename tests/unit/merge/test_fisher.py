import pytest
import torch
from torch import nn

from tests.unit.merge.helpers import tensors
from workers.data_stats import fisher_sums
from workers.merge.fisher import fisher_average


def test_equal_fishers_give_the_weighted_average():
    xs = tensors(3)
    f = torch.rand(4, 6)
    got = fisher_average(xs, [f, f, f], [1.0, 2.0, 1.0], 1e-6)
    torch.testing.assert_close(got, (xs[0] + 2 * xs[1] + xs[2]) / 4)


def test_a_dominant_fisher_takes_the_coordinate():
    xs = tensors(2)
    small, big = torch.full((4, 6), 1e-3), torch.full((4, 6), 1e-3)
    big[1, 2] = 1e6
    got = fisher_average(xs, [small, big], [1.0, 1.0], 1e-6)
    torch.testing.assert_close(got[1, 2], xs[1][1, 2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0, 0], (xs[0][0, 0] + xs[1][0, 0]) / 2)


class Classifier(nn.Module):
    """Takes ``pixel_values`` and returns logits, as transformers models do (as a tensor)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def forward(self, pixel_values):
        return self.body(pixel_values)


def test_fisher_squares_per_example_gradients():
    """Against a loop of single-example backward passes with the same label draws; and it
    is not the square of the batch gradient (the classic mistake)."""
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(6, 5)
    got = fisher_sums(model, x, "pixel_values", torch.Generator().manual_seed(3))
    assert float(got["__count__"]) == 6
    gen = torch.Generator().manual_seed(3)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batch_grad = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xi in x:
        model.zero_grad()
        logp = torch.log_softmax(model(xi[None]), -1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        logp.gather(1, y).sum().backward()
        for n, p in model.named_parameters():
            want[n] += p.grad.square()
            batch_grad[n] += p.grad
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    assert not torch.allclose(got["body.0.weight"], batch_grad["body.0.weight"].square())


def test_a_model_without_logits_is_named():
    class Encoder(nn.Module):
        def forward(self, pixel_values):
            return {"hidden": pixel_values}

    with pytest.raises(ValueError, match="fisher needs a model that returns logits"):
        fisher_sums(Encoder(), torch.randn(2, 3), "pixel_values", torch.Generator())
