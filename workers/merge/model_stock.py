"""Model Stock (Jang et al., 2024, arXiv:2403.19522)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = param(False)  # one ratio per output row instead of per tensor


@merge_method("model_stock", params=ModelStockParams, needs_base=True, min_models=2)
def model_stock(tensors: Sequence[torch.Tensor], p: ModelStockParams, *,
                base: torch.Tensor) -> torch.Tensor:
    """Interpolate between the base and the fine-tunes' average by their offsets' agreement.

    t · mean(θ_i) + (1 − t) · θ0 with t = k cos / (1 + (k − 1) cos), cos the mean pairwise
    cosine between the k ≥ 2 offsets θ_i − θ0.

    Identical offsets give t = 1 (the fine-tune), orthogonal ones t = 0 (the base). A negative
    mean cosine is clamped to 0, so the result stays between base and average (mergekit instead
    extrapolates, and keeps the base only where the denominator vanishes).
    """
    shape = base.shape
    if p.filter_wise and base.dim() > 0:
        rows = base.reshape(shape[0], -1)
        fts = [t.reshape(shape[0], -1) for t in tensors]
    else:
        rows = base.reshape(1, -1)
        fts = [t.reshape(1, -1) for t in tensors]
    offsets = [t - rows for t in fts]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = [
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6))
        for i in range(len(offsets)) for j in range(i + 1, len(offsets))
    ]
    cos = torch.stack(cosines).mean(dim=0).clamp(0, 1).unsqueeze(-1)
    k = len(fts)
    t = k * cos / (1 + (k - 1) * cos)
    average = sum(fts) / k
    return (t * average + (1 - t) * rows).reshape(shape)
