"""DELLA: drop task-vector entries with probabilities ranked by magnitude, rescale, add
(Deep, Bhardwaj et al., 2024, arXiv:2406.11617); ``della`` adds TIES' sign election."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from workers.merge.dare_linear import RESCALES
from workers.merge.registry import merge_method, param, per_model
from workers.merge.task_vectors import combine, task_vectors

_L1_EPS = 1e-7


@dataclass(frozen=True)
class DellaParams:
    weight: tuple[float, ...] = per_model(1.0)
    density: tuple[float, ...] = per_model(0.5, ge=0, le=1)  # mean keep probability
    epsilon: tuple[float, ...] = per_model(0.15, ge=0, le=0.5)  # keep probability spread
    rescale: str = param("density", choices=RESCALES)
    scale: float = param(1.0)
    normalize: bool = param(False)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per entry, density − ε + 2ε · (rank of |τ| in its row, 0 smallest .. 1 largest): rows
    are the last dim of a matrix, a vector is one row. Ties in magnitude rank in index order."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 1 else delta.reshape(1, -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand_as(order))
    position = ranks.to(torch.float64) / (n - 1) if n > 1 else torch.zeros(rows.shape,
                                                                          dtype=torch.float64)
    return ((density - epsilon) + 2 * epsilon * position).reshape(delta.shape)


def drop_and_rescale(tensors: Sequence[torch.Tensor], p: DellaParams, base: torch.Tensor,
                     rng: Sequence[np.random.BitGenerator]) -> torch.Tensor:
    """Stacked task vectors, each entry kept with its ranked probability (one 16-bit keyed
    draw per entry, row-major) and rescaled: by 1/probability per entry (``density``, the
    paper's unbiased choice), to the L1 norm before dropping (``l1``, mergekit's
    ``rescale: true``) or not at all (``none``). density = 1 keeps a task vector whole."""
    deltas = task_vectors(tensors, base)
    for i, (density, epsilon, gen) in enumerate(zip(p.density, p.epsilon, rng)):
        if density >= 1:
            continue
        probs = keep_probabilities(deltas[i], density, epsilon).clamp(0, 1)
        draws = gen.random_raw((probs.numel() + 3) // 4).view(np.uint16)[:probs.numel()]
        keep = torch.from_numpy(draws.astype(np.int32)).reshape(probs.shape) < torch.round(
            probs * 2**16)
        kept = deltas[i] * keep.view(torch.uint8).to(deltas.dtype)
        if p.rescale == "density":
            kept = torch.where(keep, kept / probs.to(kept.dtype).clamp(min=2**-16), kept)
        elif p.rescale == "l1":
            before = deltas[i].abs().sum(dtype=torch.float64)
            after = kept.abs().sum(dtype=torch.float64)
            if before >= _L1_EPS and after >= _L1_EPS:
                kept *= float(before / after)
        deltas[i] = kept
    return deltas


@merge_method("della_linear", params=DellaParams, needs_base=True, uses_rng=True)
def della_linear(tensors: Sequence[torch.Tensor], p: DellaParams, *, base: torch.Tensor,
                 rng: Sequence[np.random.BitGenerator]) -> torch.Tensor:
    """Task arithmetic on DELLA-sparsified task vectors: within each row, larger entries are
    kept more often (probabilities from density − ε to density + ε by magnitude rank).
    Masks come from one generator per (seed, model, tensor); ε = 0 is DARE."""
    return combine(drop_and_rescale(tensors, p, base, rng), p.weight, base=base,
                   sign_consensus=False, normalize=p.normalize, scale=p.scale)
