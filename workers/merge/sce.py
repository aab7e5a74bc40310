"""SCE: Select, Calculate, Erase (Wan et al., 2024, FuseChat, arXiv:2408.07990)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param
from workers.merge.task_vectors import task_vectors

_MIN_SUM = 1e-6


@dataclass(frozen=True)
class SceParams:
    select_topk: float = param(1.0, ge=0, le=1)  # fraction of entries kept, by variance


@merge_method("sce", params=SceParams, needs_base=True, min_models=1)
def sce(tensors: Sequence[torch.Tensor], p: SceParams, *, base: torch.Tensor) -> torch.Tensor:
    """θ0 + Σ w_i m_i τ_i / Σ w_i m_i over the task vectors τ_i = θ_i − θ0.

    Select: keep the ``select_topk`` fraction of entries (of those that vary at all) where
    the task vectors vary most across models, zero the rest. Calculate: w_i = mean(τ_i²) / Σ_j
    mean(τ_j²) over the tensor (uniform when that sum is ~0). Erase: m_i keeps only entries
    whose sign agrees with the sign of Σ τ_i (zeros elect +; zero entries never agree). The
    per-tensor top-k is a full ``torch.topk``, as in mergekit, so ties are broken the same."""
    deltas = task_vectors(tensors, base)
    if p.select_topk < 1:
        deltas = deltas * _select(deltas, p.select_topk).unsqueeze(0)
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = deltas.sign() == majority
    weights = _weights(deltas)
    weights = weights.reshape(-1, *([1] * (deltas.dim() - 1))) * agree
    merged = (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=_MIN_SUM)
    return base + merged


def _select(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """0/1 mask of the ``int(fraction * nonzero)`` entries of largest variance across models."""
    mask = torch.zeros(deltas.shape[1:], dtype=deltas.dtype)
    if fraction <= 0:
        return mask
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def _weights(deltas: torch.Tensor) -> torch.Tensor:
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < _MIN_SUM:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total
