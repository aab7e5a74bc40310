"""Model Breadcrumbs (Davari & Belilovsky, 2023, arXiv:2312.06795)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param, per_model
from workers.merge.task_vectors import combine, keep_middle, task_vectors


@dataclass(frozen=True)
class BreadcrumbsParams:
    weight: tuple[float, ...] = per_model(1.0)
    density: tuple[float, ...] = per_model(0.9, ge=0, le=1)  # fraction kept
    gamma: tuple[float, ...] = per_model(0.01, ge=0, le=1)  # largest fraction dropped
    scale: float = param(1.0)
    normalize: bool = param(False)


@merge_method("breadcrumbs", params=BreadcrumbsParams, needs_base=True)
def breadcrumbs(tensors: Sequence[torch.Tensor], p: BreadcrumbsParams, *,
                base: torch.Tensor) -> torch.Tensor:
    """Task arithmetic on task vectors with outliers and small entries removed, per tensor.

    Per model, the ``gamma`` fraction of largest-|τ| entries is dropped, then the smallest so
    that ``density`` remains (mergekit's parameterisation; the paper's β is 1 − density − γ).
    density = 1 is plain task arithmetic.
    """
    deltas = task_vectors(tensors, base)
    for i in range(len(tensors)):
        deltas[i] = keep_middle(deltas[i], p.density[i], p.gamma[i])
    return combine(deltas, p.weight, base=base, sign_consensus=False, normalize=p.normalize,
                   scale=p.scale)
