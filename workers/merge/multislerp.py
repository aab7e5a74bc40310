"""Multi-SLERP: weighted spherical interpolation of any number of models (barycentre on the
hypersphere through its tangent space; mergekit's community method, after Goddard's post)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param, per_model


@dataclass(frozen=True)
class MultislerpParams:
    weight: tuple[float, ...] = per_model(1.0)
    normalize: bool = param(True)  # divide the weights by their sum
    eps: float = param(1e-8, ge=0)


@merge_method("multislerp", params=MultislerpParams, needs_base=False, takes_base=True,
              min_models=1)
def multislerp(tensors: Sequence[torch.Tensor], p: MultislerpParams, *,
               base: torch.Tensor | None) -> torch.Tensor:
    """Project the (task) vectors onto the unit sphere, average them in the tangent space at
    their normalised weighted mean, map back, and scale by the weighted mean norm.

    With a base, works on task vectors θ_i − θ0 and adds θ0 back. When the weighted mean
    direction vanishes, two inputs (antipodal, balancing weights) or all-zero inputs (a tensor
    no fine-tune changed) fall back to the weighted linear combination; other cases are an
    error (no direction to interpolate around; mergekit raises for all-zero inputs too). One
    model returns that model."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked -= base
    flat = stacked.view(len(tensors), -1)
    weights = torch.tensor(p.weight, dtype=stacked.dtype)
    if p.normalize:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + p.eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < p.eps:
        if len(tensors) != 2 and bool(norms.any()):
            raise ValueError("multislerp: the weighted mean of the inputs' directions is zero "
                             "(antipodal inputs with balancing weights); change the weights")
        out = stacked[0] * weights[0]
        for x, w in zip(stacked[1:], weights[1:]):
            out = out + x * w
        return out + base if base is not None else out
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + p.eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return out + base if base is not None else out
