"""Consensus merging (Wang et al., 2024, "Localizing Task Information for Improved Model
Merging and Compression", arXiv:2405.07813), on task arithmetic's multi-task vector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param, per_model
from workers.merge.task_vectors import as_float, task_masks, task_vectors


@dataclass(frozen=True)
class ConsensusParams:
    weight: tuple[float, ...] = per_model(1.0)
    mask_lambda: tuple[float, ...] = per_model(0.6, ge=0)  # λ_t of each task's TALL mask
    k: int = param(2, ge=0)  # keep entries that at least k tasks' masks hold
    scale: float = param(1.0)  # λ of the merged task vector


@merge_method("consensus", params=ConsensusParams, needs_base=True, elementwise=True)
def consensus(tensors: Sequence[torch.Tensor], p: ConsensusParams, *,
              base: torch.Tensor) -> torch.Tensor:
    """Task arithmetic restricted to the entries that at least ``k`` tasks find useful.

    With τ_MTL = Σ w_i τ_i, task i's TALL mask holds the entries where its own contribution
    outweighs the rest, |w_i τ_i| > λ_i |τ_MTL − w_i τ_i|; entries held by fewer than k masks
    ("selfish" ones, held by one task, and "catastrophic" ones, held by none, for k = 2) are
    dropped: θ0 + λ (m_cons ⊙ τ_MTL). k = 0 is task arithmetic.
    """
    deltas = task_vectors(tensors, base)
    w = torch.tensor(list(p.weight), dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    total = deltas.sum(dim=0)
    votes = as_float(task_masks(deltas, total, p.mask_lambda), deltas.dtype).sum(dim=0)
    kept = total * as_float(votes >= p.k, total.dtype)
    return base + kept * p.scale if p.scale != 1 else base + kept
