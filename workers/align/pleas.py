"""PLeaS: permutations, then layer-by-layer least squares (Nasery et al., 2024,
arXiv:2407.02447), for sequential MLPs of two models from different inits.

Step 1 (partial matching): in each hidden space the two models' units are paired by activation
correlation (a linear assignment); only the ``2n − n'`` most correlated pairs are merged, the
other units stay separate, so the merged width n' is a budget between n and 2n. Step 2 (least
squares): layer by layer, the merged layer's weights are fitted so that, fed the *merged
prefix's* activations, it reproduces the original models' pre-activations (a merged unit: the
mean of its pair; a separate unit: its own model's), ridge-regularised; each model's head is
then fitted to that model's own logits on the merged features: a multi-head model. At budget 2n
nothing is merged and the fit reproduces both models' features, i.e. the ensemble.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from scipy.optimize import linear_sum_assignment


def partial_matching(corr: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's unit -> its merged unit, for a merged width ``width`` in [n, 2n]: the
    ``2n − width`` best-correlated pairs of the optimal assignment share a unit (first, in A's
    order), then A's other units, then B's."""
    n = corr.shape[0]
    if not n <= width <= 2 * n:
        raise ValueError(f"PLeaS width {width} outside [{n}, {2 * n}]")
    cols = torch.from_numpy(linear_sum_assignment(corr.double().numpy(), maximize=True)[1])
    score = corr.double()[torch.arange(n), cols]
    merged = sorted(torch.argsort(score, descending=True, stable=True)[:2 * n - width].tolist())
    a_to, b_to = torch.full((n,), -1), torch.full((n,), -1)
    for slot, i in enumerate(merged):
        a_to[i], b_to[cols[i]] = slot, slot
    slot = len(merged)
    for units in (a_to, b_to):
        for i in range(n):
            if units[i] < 0:
                units[i] = slot
                slot += 1
    return a_to, b_to


def _targets(ya: torch.Tensor, yb: torch.Tensor, a_to: torch.Tensor, b_to: torch.Tensor,
             width: int) -> torch.Tensor:
    """[samples, width]: each merged unit's target, the mean of the model units it holds."""
    out = torch.zeros(len(ya), width, dtype=torch.float64)
    count = torch.zeros(width, dtype=torch.float64)
    out.index_add_(1, a_to, ya.double())
    out.index_add_(1, b_to, yb.double())
    count.index_add_(0, a_to, torch.ones(len(a_to), dtype=torch.float64))
    count.index_add_(0, b_to, torch.ones(len(b_to), dtype=torch.float64))
    return out / count


def _solve(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with a bias column: (W [out, in], b [out]) minimising ‖[x 1] [W b]ᵀ − y‖²
    + ridge · mean(diag) ‖[W b]‖², in float64."""
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    gram = xa.T @ xa
    gram += torch.eye(len(gram), dtype=torch.float64) * ridge * float(gram.diagonal().mean())
    wb = torch.linalg.solve(gram, xa.T @ y.double()).T
    return wb[:, :-1], wb[:, -1]


def pleas(layers_a: Sequence[torch.nn.Linear], layers_b: Sequence[torch.nn.Linear],
          corrs: Sequence[torch.Tensor], widths: Sequence[int], x: torch.Tensor, *,
          activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
          ridge: float = 1e-6) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                        list[tuple[torch.Tensor, torch.Tensor]]]:
    """Merge two MLPs ``Linear -> act -> ... -> Linear -> act -> head`` (their Linear layers,
    the last being each model's head) on inputs ``x``: ``corrs`` the A x B activation
    correlation of each hidden space, ``widths`` its merged width. Returns the merged hidden
    layers' (W, b) and each model's refitted head (W, b)."""
    with torch.no_grad():
        merged_in, inputs_a, inputs_b = x.double(), x, x
        hidden = []
        for la, lb, corr, width in zip(layers_a[:-1], layers_b[:-1], corrs, widths):
            ya, yb = la(inputs_a), lb(inputs_b)  # the original models' pre-activations
            a_to, b_to = partial_matching(corr, width)
            w, b = _solve(merged_in, _targets(ya, yb, a_to, b_to, width), ridge)
            hidden.append((w.float(), b.float()))
            merged_in = activation(merged_in @ w.T + b)
            inputs_a, inputs_b = activation(ya), activation(yb)
        heads = [_solve(merged_in, head(inputs), ridge)
                 for head, inputs in ((layers_a[-1], inputs_a), (layers_b[-1], inputs_b))]
    return hidden, [(w.float(), b.float()) for w, b in heads]
