"""Fisher-weighted averaging (Matena & Raffel, 2022, arXiv:2111.09832)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.data_stats import FISHER, fisher_norms, model_stats
from workers.merge.registry import internal, merge_method, param, per_model


@dataclass(frozen=True)
class FisherParams:
    weight: tuple[float, ...] = per_model(1.0)  # λ_i
    epsilon: float = param(1e-6, ge=0)  # added to every Fisher entry (a floor)
    normalize: bool = param(True)  # divide each model's Fisher by its norm over the model
    statistics: str = internal("", "driver")  # the reduced Fishers (phases/statistics.py)


def fisher_average(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                   weights: Sequence[float], epsilon: float) -> torch.Tensor:
    """Σ λ_i (F_i + ε) θ_i / Σ λ_i (F_i + ε), entry by entry, in float64."""
    num = torch.zeros(tensors[0].shape, dtype=torch.float64)
    den = torch.zeros_like(num)
    for t, f, w in zip(tensors, fishers, weights):
        f = (f.double() + epsilon) * w
        num += f * t.double()
        den += f
    return (num / den).to(tensors[0].dtype)


@merge_method("fisher", params=FisherParams, needs_base=False, wants_name=True,
              statistics=FISHER)
def fisher(tensors: Sequence[torch.Tensor], p: FisherParams, *, name: str) -> torch.Tensor:
    """Average weighted entry by entry by each model's diagonal Fisher information.

    F_i is the mean over model i's own unlabelled data (``sources[].data``, else ``data``) of
    squared per-example gradients of log p(ŷ | x), ŷ drawn from the model. With equal Fishers
    this is the weighted average; a tensor no gradient reaches (F = 0) gets it too.
    """
    fishers = model_stats(p.statistics, name, len(tensors))
    if fishers is None:
        fishers = [torch.zeros(()) for _ in tensors]
    elif p.normalize:
        fishers = [f / n if n > 0 else f
                   for f, n in zip(fishers, fisher_norms(p.statistics, len(tensors)))]
    return fisher_average(tensors, fishers, p.weight, p.epsilon)
