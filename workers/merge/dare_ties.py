"""DARE-TIES: DARE sparsification with TIES sign election (Yu et al., 2024)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workers.merge.dare_linear import DareParams, L1Rescale, drop_and_rescale, fused_plan
from workers.merge.registry import merge_method
from workers.merge.task_vectors import cast_inputs, combine


@merge_method("dare_ties", params=DareParams, needs_base=True, uses_rng=True,
              elementwise=True, tensor_stats=L1Rescale(), stored_inputs=True)
def dare_ties(tensors: Sequence[torch.Tensor], p: DareParams, *, base: torch.Tensor,
              rng: Sequence[np.random.BitGenerator],
              tensor_stats: list[float] | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """DARE-sparsified task vectors merged with TIES' sign election and disjoint sum.

    Same keyed masks as ``dare_linear``; with ``normalize`` the sum becomes the disjoint mean.
    With ``dtype`` the inputs come as stored: float32 arithmetic on bfloat16 or float32 inputs
    runs as one fused loop (``kernels.dare_ties_merge``), anything else is cast first.
    """
    from workers.merge import kernels

    fused = kernels.fused_inputs(tensors, base, dtype or base.dtype)
    if fused:
        plan = fused_plan(p, rng, tensor_stats)
        if p.rescale == "l1" and tensor_stats is None:  # a whole tensor, outside the engine
            plan[3][:] = L1Rescale().reduce(0, kernels.dare_l1(fused, plan), p, None)
        return kernels.dare_ties_merge(fused, plan, p.weight, unit=all(w == 1 for w in p.weight),
                                       normalize=p.normalize, scale=p.scale).reshape(base.shape)
    tensors, base = cast_inputs(tensors, base, dtype)
    return combine(drop_and_rescale(tensors, p, base, rng, tensor_stats), p.weight, base=base,
                   sign_consensus=True, normalize=p.normalize, scale=p.scale)
