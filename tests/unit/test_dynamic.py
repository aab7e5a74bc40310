"""The dynamic runtimes' building blocks: a fresh router gives λ0 for any input, a routed MLP
at λ computes the MLP with θ0 + Σ λ_k τ_k (per sample), layer similarity is the mean pairwise
cosine, and training adds per-task gradients in task order (the same for any split)."""

import torch
from torch import nn

from workers.dynamic_runtime import Gate, RoutedMLP, Router, fit, layer_similarity, task_gradients


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, h):
        return self.fc2(torch.relu(self.fc1(h)))


def test_fresh_router_gives_the_initial_lambda_for_any_input():
    router = Router(4, 3, 0.3)
    lam = router(torch.randn(5, 7, 4))
    torch.testing.assert_close(lam, torch.full((5, 3), 0.3))


def test_routed_mlp_uses_per_sample_weights():
    torch.manual_seed(0)
    mlp = Mlp()
    base = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    taus = {n: torch.randn(2, *p.shape) for n, p in mlp.named_parameters()}
    router = Router(4, 2, 0.0)
    with torch.no_grad():
        router.fc2.bias.copy_(torch.tensor([0.5, -1.0]))
    routed = RoutedMLP(mlp, base, taus, router)
    h = torch.randn(3, 5, 4)
    reference = Mlp()
    reference.load_state_dict({n: base[n] + 0.5 * taus[n][0] - taus[n][1] for n in base})
    torch.testing.assert_close(routed(h), reference(h), rtol=1e-5, atol=1e-6)


def test_layer_similarity_is_the_mean_pairwise_cosine():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    sims = layer_similarity({"blocks.0.w": [a, a, b], "blocks.1.w": [a, a, a],
                             "head.w": [a, -a, a]})
    assert sims["blocks.0"] == (1 + 0 + 0) / 3
    assert sims["blocks.1"] == 1.0
    assert sims["other"] == (-1 + 1 - 1) / 3


def test_gate_training_learns_which_task_an_input_came_from():
    """Per-task gradients added in task order: the same values whether one worker computes
    every task or each task is computed alone (two workers)."""
    class Shell(nn.Module):
        kind, tasks = "gating", ["a", "b"]

        def __init__(self):
            super().__init__()
            self.gate = Gate(3, 2, hidden=8)

        def trainable(self):
            return list(self.gate.parameters())

    torch.manual_seed(0)
    shell = Shell()
    data = [torch.randn(40, 3) - 2, torch.randn(40, 3) + 2]
    args = dict(batch_size=16, seed=0, objective="gate")
    start = [p.detach().clone() for p in shell.trainable()]

    def together(values, step):
        return task_gradients(shell, [0, 1], data, values, step, **args)

    def apart(values, step):
        return {**task_gradients(shell, [1], data, values, step, **args),
                **task_gradients(shell, [0], data, values, step, **args)}

    values, losses = fit(start, together, tasks=2, steps=60, lr=1e-2)
    again, _ = fit(start, apart, tasks=2, steps=60, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(values, again))
    assert losses[-1] < losses[0] / 4
    with torch.no_grad():
        for p, v in zip(shell.trainable(), values):
            p.copy_(v)
        assert (shell.gate(data[1]).argmax(1) == 1).float().mean() > 0.95
