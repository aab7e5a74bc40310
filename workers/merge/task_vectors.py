"""Task vectors (model minus base): sparsifiers and the sign-consensus combiner.

Shared by task_arithmetic, ties, dare_linear, dare_ties and breadcrumbs. The combiner follows
the TIES paper's "elect sign, disjoint merge" with per-model weights, in the same operation
order as mergekit's generalized task arithmetic so that outputs agree bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Stacked deltas ``[K, *shape]`` of each model from the base."""
    out = base.new_empty((len(tensors), *base.shape))
    for i, t in enumerate(tensors):
        torch.sub(t, base, out=out[i])
    return out


def cast_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
                dtype: torch.dtype | None) -> tuple[Sequence[torch.Tensor], torch.Tensor | None]:
    """Inputs (and base) as stored cast to the compute ``dtype``; None: they already are."""
    if dtype is None:
        return tensors, base
    return [t.to(dtype) for t in tensors], None if base is None else base.to(dtype)


def combine(
    deltas: torch.Tensor,
    weights: Sequence[float],
    *,
    base: torch.Tensor,
    sign_consensus: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """``base + scale * Σ w_i τ_i`` (divided by Σ w_i when ``normalize``).

    With ``sign_consensus`` only entries whose sign agrees with the sign of ``Σ w_i τ_i`` are
    summed and the divisor counts only their weights (TIES' disjoint mean); a zero sum elects
    the positive sign. ``deltas`` may be modified in place. Float32 and float64 take the fused loop
    of ``kernels.sign_merge`` (the same bits, one pass instead of about ten).
    """
    from workers.merge import kernels

    unit = all(x == 1 for x in weights)  # x * 1 == x: skip the multiplications
    if sign_consensus and kernels.fused(deltas):
        return kernels.sign_merge(deltas, list(weights), base, unit=unit, normalize=normalize,
                                  scale=scale)
    w = torch.tensor(list(weights), dtype=deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    if not unit:
        deltas.mul_(w)
    if sign_consensus:
        majority = as_float(deltas.sum(dim=0) >= 0, deltas.dtype) * 2 - 1
        agree = as_float(deltas * majority > 0, deltas.dtype)  # zeros never agree
        mixed = deltas.mul_(agree).sum(dim=0)
        divisor = agree.sum(dim=0, dtype=deltas.dtype) if unit else (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weight_sum(weights, deltas.dtype)
    if normalize:
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return base + mixed


def weight_sum(weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ w_i in ``dtype``, the divisor of a normalised sum; 1 where it is about 0."""
    total = torch.tensor(list(weights), dtype=dtype).sum()
    return torch.where(total.abs() < 1e-8, torch.ones((), dtype=dtype), total)


def as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in ``dtype``, through uint8: torch converts bool (and multiplies by
    it) several times slower than uint8."""
    return mask.view(torch.uint8).to(dtype)


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * n)`` (at least one) largest-magnitude entries."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:k]] = 1
    return delta * mask.reshape(delta.shape)


def keep_middle(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction largest entries (outliers), then the
    smallest, so that ``int(density * n)`` entries remain. Fewer outliers are dropped when
    needed to reach the density. ``density >= 1`` keeps everything, whatever ``gamma``."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    drop_small = max(0, n - keep - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[drop_small:drop_small + keep]] = 1
    return delta * mask.reshape(delta.shape)


def task_masks(deltas: torch.Tensor, total: torch.Tensor,
               lambdas: Sequence[float]) -> torch.Tensor:
    """TALL masks ``[K, *shape]`` (bool): entry p is task i's when its own contribution
    outweighs the others', ``|τ_i| > λ_i |τ_MTL − τ_i|`` (strict), where ``total`` is τ_MTL
    and ``deltas`` the stacked τ_i that add up to it."""
    lam = torch.tensor(list(lambdas), dtype=deltas.dtype).reshape(
        -1, *([1] * (deltas.dim() - 1)))
    return deltas.abs() > (total - deltas).abs() * lam
