"""Linear merge / model soup (Wortsman et al., 2022, arXiv:2203.05482)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param, per_model
from workers.merge.task_vectors import cast_inputs


@dataclass(frozen=True)
class LinearParams:
    weight: tuple[float, ...] = per_model(1.0)
    normalize: bool = param(True)


@merge_method("linear", params=LinearParams, needs_base=False, elementwise=True,
              stored_inputs=True)
def linear(tensors: Sequence[torch.Tensor], p: LinearParams, *,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted average Σ w_i θ_i, divided by Σ w_i when ``normalize`` (uniform soup by default).

    No base. Accumulates in the compute dtype in model order, each term as a fused
    multiply-add, as mergekit's ``addcmul_`` does. With ``dtype`` the inputs come as stored:
    float32 arithmetic on bfloat16 or float32 inputs is one loop (``kernels.weighted_sum``).
    """
    from workers.merge import kernels

    weights = torch.tensor(list(p.weight), dtype=dtype or tensors[0].dtype)
    divisor = weights.sum() if p.normalize else None
    fused = kernels.fused_inputs(tensors, None, dtype or tensors[0].dtype)
    if fused:
        return kernels.weighted_sum(fused, p.weight, has_base=False, fused_multiply=True,
                                    divisor=None if divisor is None else float(divisor)
                                    ).reshape(tensors[0].shape)
    tensors, _ = cast_inputs(tensors, None, dtype)
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights.unbind(0)):
        out.addcmul_(t, w)
    if divisor is not None:
        out.div_(divisor)
    return out
