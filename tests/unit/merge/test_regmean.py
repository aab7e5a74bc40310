import torch

from tests.unit.merge.helpers import tensors
from tests.unit.merge.test_fisher import Classifier
from workers.data_stats import gram_sums
from workers.merge.regmean import regmean_solve


def grams(*xs):
    return [x.double().T @ x.double() / len(x) for x in xs]


def test_one_model_comes_back():
    (w,) = tensors(1, shape=(3, 5))
    (g,) = grams(torch.randn(40, 5))
    torch.testing.assert_close(regmean_solve([w], [g], 0.95, 0.0), w, rtol=1e-5, atol=1e-6)


def test_identical_grams_give_the_average():
    ws = tensors(3, shape=(3, 5))
    g = grams(torch.randn(40, 5))[0]
    torch.testing.assert_close(regmean_solve(ws, [g] * 3, 1.0, 0.0), sum(ws) / 3,
                               rtol=1e-5, atol=1e-6)


def test_disjoint_input_subspaces_reproduce_each_model():
    """Model 1 sees inputs in dims 0-2, model 2 in dims 3-5: the merge matches each on its own
    inputs (α = 1: the full Grams)."""
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.zeros(30, 6), torch.zeros(30, 6)
    x1[:, :3] = torch.randn(30, 3, generator=gen)
    x2[:, 3:] = torch.randn(30, 3, generator=gen)
    w1, w2 = tensors(2, shape=(4, 6), seed=2)
    merged = regmean_solve([w1, w2], grams(x1, x2), 1.0, 0.0)
    torch.testing.assert_close(x1 @ merged.T, x1 @ w1.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x2 @ merged.T, x2 @ w2.T, rtol=1e-4, atol=1e-5)


def test_least_squares_beats_averaging():
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(50, 6, generator=gen) * torch.rand(6, generator=gen) for _ in range(3)]
    ws = tensors(3, shape=(4, 6), seed=5)

    def residual(w):
        return sum(float(((x @ w.T - x @ wi.T) ** 2).sum()) for x, wi in zip(xs, ws))

    merged = regmean_solve(ws, grams(*xs), 1.0, 0.0)
    assert residual(merged) <= residual(sum(ws) / 3)


def test_singular_grams_stay_finite_with_the_ridge():
    """A dead input (always zero) makes Σ G singular; the ridge keeps the solve finite."""
    x = torch.randn(20, 5)
    x[:, 2] = 0
    ws = tensors(2, shape=(3, 5))
    got = regmean_solve(ws, grams(x, x), 1.0, 1e-4)
    assert torch.isfinite(got).all()


def test_gram_sums_are_the_inputs_of_every_linear():
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(8, 5)
    got = gram_sums(model, x, "pixel_values")
    torch.testing.assert_close(got["body.0.weight"], x.double().T @ x.double())
    hidden = torch.tanh(model.body[0](x)).detach().double()
    torch.testing.assert_close(got["body.2.weight"], hidden.T @ hidden)
    assert float(got["body.0.weight/__count__"]) == 8
