"""TALL masks (Wang et al., 2024, "Localizing Task Information for Improved Model Merging and
Compression", arXiv:2405.07813)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, per_model
from workers.merge.task_vectors import task_masks, task_vectors


@dataclass(frozen=True)
class TallParams:
    weight: tuple[float, ...] = per_model(1.0)
    mask_lambda: tuple[float, ...] = per_model(0.6, ge=0)  # λ_t: larger, sparser mask


def _weighted(tensors: Sequence[torch.Tensor], p: TallParams,
              base: torch.Tensor) -> torch.Tensor:
    deltas = task_vectors(tensors, base)
    return deltas.mul_(torch.tensor(list(p.weight), dtype=deltas.dtype).reshape(
        -1, *([1] * base.dim())))


def tall_masks(tensors: Sequence[torch.Tensor], p: TallParams, *,
               base: torch.Tensor) -> torch.Tensor:
    """Task t's mask: |w_t τ_t| > λ_t |τ_MTL − w_t τ_t|."""
    deltas = _weighted(tensors, p, base)
    return task_masks(deltas, deltas.sum(dim=0), p.mask_lambda)


@merge_method("tall", params=TallParams, needs_base=True, elementwise=True, masks=tall_masks)
def tall(tensors: Sequence[torch.Tensor], p: TallParams, *,
         base: torch.Tensor) -> torch.Tensor:
    """Task-aware: the multi-task vector plus a 1-bit mask per task of where it matters.

    The output is θ0 + τ_MTL with τ_MTL = Σ w_i τ_i; task t's model θ0 + m_t ⊙ τ_MTL
    (``raymerge task-model``) keeps the entries where task t's own vector outweighs the others'
    (its TALL mask, in ``masks/``). For a task-agnostic merge from the same masks use
    ``consensus``.
    """
    return base + _weighted(tensors, p, base).sum(dim=0)
