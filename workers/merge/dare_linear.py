"""DARE: drop and rescale task vectors, then add (Yu et al., 2024, arXiv:2311.03099)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param, per_model
from workers.merge.task_vectors import combine, keep_random, task_vectors

RESCALES = ("density", "l1", "none")


@dataclass(frozen=True)
class DareParams:
    weight: tuple[float, ...] = per_model(1.0)
    density: tuple[float, ...] = per_model(0.5, ge=0, le=1)  # keep probability, 1 - p
    rescale: str = param("density", choices=RESCALES)
    scale: float = param(1.0)
    normalize: bool = param(False)


def drop_and_rescale(tensors: Sequence[torch.Tensor], p: DareParams, base: torch.Tensor,
                     rng: Sequence[torch.Generator]) -> torch.Tensor:
    """Stacked task vectors, each with entries dropped with probability 1 − density."""
    deltas = task_vectors(tensors, base)
    for i in range(len(tensors)):
        deltas[i] = keep_random(deltas[i], p.density[i], p.rescale, rng[i])
    return deltas


@merge_method("dare_linear", params=DareParams, needs_base=True, uses_rng=True)
def dare_linear(tensors: Sequence[torch.Tensor], p: DareParams, *, base: torch.Tensor,
                rng: Sequence[torch.Generator]) -> torch.Tensor:
    """Task arithmetic on DARE-sparsified task vectors.

    Each entry of τ_i is kept with probability ``density`` and rescaled (by 1/density by
    default, so E[τ̃_i] = τ_i). Masks come from one generator per (seed, model, tensor), so
    the result does not depend on how many workers ran. density = 1 is task arithmetic.
    """
    return combine(drop_and_rescale(tensors, p, base, rng), p.weight, base=base,
                   sign_consensus=False, normalize=p.normalize, scale=p.scale)
