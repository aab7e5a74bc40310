"""Karcher mean: the equal-weight Riemannian mean of the models' directions on the unit sphere,
scaled by their mean norm (mergekit's ``karcher``, arXiv:2603.04972)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param


@dataclass(frozen=True)
class KarcherParams:
    max_iter: int = param(10, ge=1)  # fixed-point iterations of the mean
    tol: float = param(1e-5, ge=0)  # stop when the tangent step is shorter than this


@merge_method("karcher", params=KarcherParams, needs_base=False, min_models=1)
def karcher(tensors: Sequence[torch.Tensor], p: KarcherParams) -> torch.Tensor:
    """Iterate m ← exp_m(Σ α_i log_m(u_i)) from the normalised linear mean of the unit
    directions u_i (α_i = 1/K), then scale m by Σ α_i ‖θ_i‖. Norms are float32 (float64 for
    float64 inputs). Inputs with norm ≤ tol take no part in the direction; all of them that
    small give zero."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(work)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype)
             for t, n in zip(tensors, norms)]
    kept = [i for i, n in enumerate(norms) if n.item() > p.tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in kept)
    weights = [alphas[i] / total for i in kept]
    directions = [units[i] for i in kept]
    mean = torch.zeros_like(directions[0])
    for a, u in zip(weights, directions):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = directions[0].clone() if mean_norm.item() < p.tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(p.max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, directions):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < p.tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(work))
        if step.item() < p.tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(work))
        if length.item() > p.tol:
            mean = (mean / length).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean
