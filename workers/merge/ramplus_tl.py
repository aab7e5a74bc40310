"""RAM+ (tensor-local): RAM with each model's unique changes amplified by how much of its
change it shares with others, measured per tensor (arXiv:2601.13572)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.ram import contributions
from workers.merge.registry import merge_method, param


@dataclass(frozen=True)
class RamPlusParams:
    r: float = param(0.1, ge=0)  # amplification per unit of shared / unique ratio
    alpha: float = param(0.2, ge=0)  # cap of that ratio
    epsilon: float = param(1e-5, ge=0)  # |τ| above this counts as a change


@merge_method("ramplus_tl", params=RamPlusParams, needs_base=True)
def ramplus_tl(tensors: Sequence[torch.Tensor], p: RamPlusParams, *,
               base: torch.Tensor) -> torch.Tensor:
    """RAM, with model i's unique changes scaled by λ_i = 1 + r · min(ρ_i, α), ρ_i = (entries
    of this tensor model i changes together with others) / (entries it alone changes)."""
    deltas, changed, counts, unique, shared = contributions(tensors, base, p.epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=p.epsilon)
    amplify = 1 + p.r * rho.clamp(min=0, max=p.alpha)
    merged = (deltas * unique * amplify.unsqueeze(-1)
              + deltas * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
