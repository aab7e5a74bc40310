"""DARE: drop and rescale task vectors, then add (Yu et al., 2024, arXiv:2311.03099)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from workers.merge.registry import merge_method, param, per_model
from workers.merge.task_vectors import cast_inputs, combine, task_vectors

RESCALES = ("density", "l1", "none")
_L1_EPS = 1e-7


@dataclass(frozen=True)
class DareParams:
    weight: tuple[float, ...] = per_model(1.0)
    density: tuple[float, ...] = per_model(0.5, ge=0, le=1)  # keep probability, 1 - p
    rescale: str = param("density", choices=RESCALES)
    scale: float = param(1.0)
    normalize: bool = param(False)


def keep_mask(shape: torch.Size, density: float, rng: np.random.BitGenerator,
              dtype: torch.dtype) -> torch.Tensor:
    """1 where an entry survives, else 0: one 16-bit draw per entry, kept when below
    ``round(density * 2^16)``, so the keep probability is the density to within 2^-17
    (integer draws are several times faster than ``torch.rand``)."""
    keep = _draws(math.prod(shape), rng) < _cut(density)
    return torch.from_numpy(keep).view(torch.uint8).to(dtype).reshape(shape)


def _draws(n: int, rng: np.random.BitGenerator) -> np.ndarray:
    return rng.random_raw((n + 3) // 4).view(np.uint16)[:n]


def _cut(density: float) -> np.uint32:
    return np.uint32(round(density * 2**16))


def keep_masks(shape: torch.Size, p: DareParams, rng: Sequence[np.random.BitGenerator],
               dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Per model, its keep mask; None where density >= 1 keeps every entry."""
    return [None if d >= 1 else keep_mask(shape, d, g, dtype) for d, g in zip(p.density, rng)]


def fused_plan(p: DareParams, rng: Sequence[np.random.SFC64],
               l1_factors: list[float] | None = None) -> tuple[np.ndarray, ...]:
    """``kernels.dare_plan`` of ``drop_and_rescale``: the same draws, cuts and rescaling
    (L1 factors 1 until given)."""
    from workers.merge import kernels

    modes, factors = zip(*_rescaling(p, l1_factors or [1.0] * len(p.density)))
    return kernels.dare_plan(kernels.sfc64_states(rng), np.array([_cut(d) for d in p.density]),
                             np.array(modes), np.array(factors))


def _rescaling(p: DareParams, l1_factors: list[float] | None) -> list[tuple[int, float]]:
    """Per model ``(mode, factor)`` of its drop and rescale, as ``kernels.dare_plan`` takes them
    (0: τ untouched, 1: drop, 2: drop and divide by the density, 3: drop and multiply by the L1
    factor)."""
    return [(0, 1.0) if d >= 1 else
            (2, d) if p.rescale == "density" and d > 0 else
            (3, l1_factors[i]) if p.rescale == "l1" else (1, 1.0)
            for i, d in enumerate(p.density)]


class L1Rescale:
    """``rescale: l1`` (mergekit's ``rescale: true``): per model, Σ|τ| and Σ|kept τ| over the
    whole tensor, summed in float64 chunk by chunk; the state is each model's factor."""

    passes = 1

    def needed(self, p: DareParams) -> bool:
        return p.rescale == "l1"

    def collect(self, pass_index: int, tensors: Sequence[torch.Tensor], p: DareParams, *,
                base: torch.Tensor, state: Any, rng: Sequence[np.random.BitGenerator],
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """Inputs as stored with ``dtype`` (the compute dtype), else already cast."""
        from workers.merge import kernels

        fused = kernels.fused_inputs(tensors, base, dtype or base.dtype)
        if fused:  # the fused sums add by halving blocks, torch's in its own order
            return kernels.dare_l1(fused, fused_plan(p, rng))
        tensors, base = cast_inputs(tensors, base, dtype)
        return _l1_sums(task_vectors(tensors, base), keep_masks(base.shape, p, rng, base.dtype))

    def reduce(self, pass_index: int, total: torch.Tensor, p: DareParams,
               state: Any) -> list[float]:
        return [1.0 if before < _L1_EPS or after < _L1_EPS else float(before / after)
                for before, after in total.tolist()]


def _l1_sums(deltas: torch.Tensor, masks: list[torch.Tensor | None]) -> torch.Tensor:
    sums = torch.zeros(len(masks), 2, dtype=torch.float64)
    for i, keep in enumerate(masks):
        if keep is not None:
            magnitude = deltas[i].abs().reshape(-1)
            sums[i, 0] = magnitude.sum(dtype=torch.float64)
            sums[i, 1] = torch.dot(magnitude, keep.reshape(-1)).double()
    return sums


def drop_and_rescale(tensors: Sequence[torch.Tensor], p: DareParams, base: torch.Tensor,
                     rng: Sequence[np.random.BitGenerator],
                     l1_factors: list[float] | None = None) -> torch.Tensor:
    """Stacked task vectors, each with entries dropped with probability 1 − density, then
    rescaled: by 1/density (``density``, unbiased), to the L1 norm before dropping (``l1``),
    or not at all (``none``). density = 1 leaves a task vector untouched."""
    deltas = task_vectors(tensors, base)
    masks = keep_masks(base.shape, p, rng, base.dtype)
    if p.rescale == "l1" and l1_factors is None:
        l1_factors = L1Rescale().reduce(0, _l1_sums(deltas, masks), p, None)
    for i, (keep, (mode, factor)) in enumerate(zip(masks, _rescaling(p, l1_factors))):
        if keep is None:
            continue
        deltas[i] *= keep
        if mode == 2:
            deltas[i] /= factor
        elif mode == 3:
            deltas[i] *= factor
    return deltas


@merge_method("dare_linear", params=DareParams, needs_base=True, uses_rng=True,
              elementwise=True, tensor_stats=L1Rescale())
def dare_linear(tensors: Sequence[torch.Tensor], p: DareParams, *, base: torch.Tensor,
                rng: Sequence[np.random.BitGenerator],
                tensor_stats: list[float] | None = None) -> torch.Tensor:
    """Task arithmetic on DARE-sparsified task vectors.

    Each entry of τ_i is kept with probability ``density`` and rescaled (by 1/density by
    default, so E[τ̃_i] = τ_i). Masks come from one generator per (seed, model, tensor, chunk),
    so the result does not depend on how many workers ran. density = 1 is task arithmetic.
    """
    return combine(drop_and_rescale(tensors, p, base, rng, tensor_stats), p.weight, base=base,
                   sign_consensus=False, normalize=p.normalize, scale=p.scale)
