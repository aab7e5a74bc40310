"""Arcee Fusion: take a model's changes from the base only where they matter most (mergekit's
``arcee_fusion``: importance = |Δ| × the KL divergence of the rows' softmax, kept above an
outlier threshold)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method

_EPS = 1e-8
_QUARTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class ArceeFusionParams:
    pass


@merge_method("arcee_fusion", params=ArceeFusionParams, needs_base=True, min_models=1,
              max_models=1)
def arcee_fusion(tensors: Sequence[torch.Tensor], p: ArceeFusionParams, *,
                 base: torch.Tensor) -> torch.Tensor:
    """θ0 + (θ1 − θ0) · [s ≥ median(s) + 1.5 · IQR(s)] with importance s = |θ1 − θ0| · KL(
    softmax(θ1) ‖ softmax(θ0)) per row (the last dim). Quartiles are exact order statistics
    (mergekit samples 10^6 entries at random, unseeded, in tensors larger than that; it agrees
    bit for bit below that size)."""
    (model,) = tensors
    q = torch.softmax(base, dim=-1) + _EPS
    r = torch.softmax(model, dim=-1) + _EPS
    kl = torch.sum(r * torch.log(r / q), dim=-1, keepdim=True)
    importance = (model - base).abs() * kl
    flat = importance.reshape(-1)
    ranks = (torch.tensor(_QUARTILES) * (flat.numel() - 1)).long()
    q1, median, q3 = (torch.kthvalue(flat, int(k) + 1).values for k in ranks)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask
