"""RAM: Reinforced Agent Merging (arXiv:2601.13572): an entry changed by one model takes that
model's change whole; an entry changed by several takes their mean change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param
from workers.merge.task_vectors import task_vectors


@dataclass(frozen=True)
class RamParams:
    epsilon: float = param(1e-5, ge=0)  # |τ| above this counts as a change


def contributions(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float):
    """Flat task vectors zeroed where |τ| ≤ ε, which entries each model changed, and per entry
    the masks of changes made by exactly one model and by several."""
    deltas = task_vectors(tensors, base).view(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas * changed, changed, counts, counts == 1, counts > 1


@merge_method("ram", params=RamParams, needs_base=True, elementwise=True)
def ram(tensors: Sequence[torch.Tensor], p: RamParams, *, base: torch.Tensor) -> torch.Tensor:
    """θ0 + Σ_i τ_i · (1 if model i alone changed the entry, else 1 / #models that did)."""
    deltas, _, counts, unique, shared = contributions(tensors, base, p.epsilon)
    merged = (deltas * unique + deltas * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
