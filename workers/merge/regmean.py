"""RegMean: merging by regression mean (Jin et al., 2023, arXiv:2212.09849)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.data_stats import GRAMS, model_stats
from workers.merge.registry import internal, merge_method, param


@dataclass(frozen=True)
class RegMeanParams:
    alpha: float = param(0.95, ge=0, le=1)  # share of each Gram's off-diagonal kept
    ridge: float = param(1e-4, ge=0)  # + ridge · mean(diag) · I: singular Grams stay solvable
    statistics: str = internal("", "driver")  # the reduced Grams (phases/statistics.py)


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                  alpha: float, ridge: float) -> torch.Tensor:
    """``W*ᵀ = (Σ G̃_i + ρ I)⁻¹ Σ G̃_i W_iᵀ`` with ``G̃ = α G + (1 − α) diag(G)``, float64.
    ``weights`` are ``[out, in]``, ``grams`` ``[in, in]``."""
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float64)
    for w, g in zip(weights, grams):
        g = g.double()
        shrunk = g * alpha + torch.diag(torch.diagonal(g)) * (1 - alpha)
        total += shrunk
        rhs += shrunk @ w.double().T
    scale = float(torch.diagonal(total).mean())
    total += torch.eye(len(total), dtype=torch.float64) * (ridge * (scale if scale > 0 else 1))
    return torch.linalg.solve(total, rhs).T.to(weights[0].dtype)


@merge_method("regmean", params=RegMeanParams, needs_base=False, wants_name=True,
              statistics=GRAMS)
def regmean(tensors: Sequence[torch.Tensor], p: RegMeanParams, *, name: str) -> torch.Tensor:
    """Per linear layer, the weight that best fits every model's outputs on its own inputs.

    Each model's Gram matrix G_i = X_iᵀX_i / n of the layer's inputs on its own unlabelled data
    (``sources[].data``, else ``data``) weighs a least-squares fit: W* minimises Σ_i
    ‖X_i Wᵀ − X_i W_iᵀ‖², off-diagonals shrunk by α, with a small ridge. Tensors outside any
    ``nn.Linear`` weight (biases, norms, embeddings) are averaged.
    """
    grams = model_stats(p.statistics, name, len(tensors)) if tensors[0].dim() == 2 else None
    if grams is None:
        return (torch.stack([t.double() for t in tensors]).mean(dim=0)).to(tensors[0].dtype)
    return regmean_solve(tensors, grams, p.alpha, p.ridge)
