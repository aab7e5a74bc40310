"""Model Breadcrumbs with TIES' sign election (mergekit's ``breadcrumbs_ties``)."""

from __future__ import annotations

from typing import Sequence

import torch

from workers.merge.breadcrumbs import BreadcrumbsParams
from workers.merge.registry import merge_method
from workers.merge.task_vectors import combine, keep_middle, task_vectors


@merge_method("breadcrumbs_ties", params=BreadcrumbsParams, needs_base=True)
def breadcrumbs_ties(tensors: Sequence[torch.Tensor], p: BreadcrumbsParams, *,
                     base: torch.Tensor) -> torch.Tensor:
    """Breadcrumbs' task vectors (outliers and small entries removed) merged with TIES' sign
    election and disjoint sum (the disjoint mean with ``normalize``)."""
    deltas = task_vectors(tensors, base)
    for i in range(len(tensors)):
        deltas[i] = keep_middle(deltas[i], p.density[i], p.gamma[i])
    return combine(deltas, p.weight, base=base, sign_consensus=True, normalize=p.normalize,
                   scale=p.scale)
