"""DARE-TIES: DARE sparsification with TIES sign election (Yu et al., 2024)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workers.merge.dare_linear import DareParams, L1Rescale, drop_and_rescale
from workers.merge.registry import merge_method
from workers.merge.task_vectors import combine


@merge_method("dare_ties", params=DareParams, needs_base=True, uses_rng=True,
              elementwise=True, tensor_stats=L1Rescale())
def dare_ties(tensors: Sequence[torch.Tensor], p: DareParams, *, base: torch.Tensor,
              rng: Sequence[np.random.BitGenerator],
              tensor_stats: list[float] | None = None) -> torch.Tensor:
    """DARE-sparsified task vectors merged with TIES' sign election and disjoint sum.

    Same keyed masks as ``dare_linear``; with ``normalize`` the sum becomes the disjoint mean.
    """
    return combine(drop_and_rescale(tensors, p, base, rng, tensor_stats), p.weight, base=base,
                   sign_consensus=True, normalize=p.normalize, scale=p.scale)
