"""LiNeS: layer-increasing network scaling (Wang et al., 2025, arXiv:2410.17146)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import internal, merge_method, param, per_model
from workers.merge.task_vectors import combine, task_vectors


@dataclass(frozen=True)
class LinesParams:
    weight: tuple[float, ...] = per_model(1.0)
    alpha: float = param(0.3)  # scale of the first layer's (and of non-layer tensors') τ
    beta: float = param(0.7)  # added to the scale from the first layer to the last
    normalize: bool = param(False)
    position: float = internal(0.0, "position")  # the tensor's layer depth, 0 (first) to 1


@merge_method("lines", params=LinesParams, needs_base=True, elementwise=True)
def lines(tensors: Sequence[torch.Tensor], p: LinesParams, *,
          base: torch.Tensor) -> torch.Tensor:
    """Task arithmetic whose scale grows with depth: θ0 + (α + β·ℓ/(L−1)) Σ w_i τ_i.

    Layer ℓ of a stack of L layers (``layers.ℓ.``, ``layer.ℓ.``, ``h.ℓ.`` …) is scaled by
    α + β ℓ/(L − 1), so shallow layers stay near the base and deep ones keep the tasks'
    changes; tensors outside the stack (embeddings, final norms, heads) get α (set another
    scale for them with ``merge.overrides``). β = 0 is task arithmetic with λ = α. The same
    depth scaling on another combiner is a gradient: e.g. ties with ``scale: [α, α + β]``.
    """
    scale = p.alpha + p.beta * p.position
    return combine(task_vectors(tensors, base), p.weight, base=base, sign_consensus=False,
                   normalize=p.normalize, scale=scale)
