"""Task arithmetic (Ilharco et al., 2023, arXiv:2212.04089)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import ContinualStep, merge_method, param, per_model
from workers.merge.task_vectors import cast_inputs, combine, task_vectors, weight_sum


@dataclass(frozen=True)
class TaskArithmeticParams:
    weight: tuple[float, ...] = per_model(1.0)
    scale: float = param(1.0)  # λ; mergekit's `lambda`
    normalize: bool = param(False)


def _continual(params: dict, per_model: bool, held: int, state: dict) -> ContinualStep | None:
    """θ0 + λ Σ τ_i with one more model is the previous result plus λ τ_new."""
    if per_model or params.get("normalize", False) or "weight" in params:
        return None
    return ContinualStep({**params, "scale": 1.0}, previous={"weight": 1.0},
                         new={"weight": params.get("scale", 1.0)})


@merge_method("task_arithmetic", params=TaskArithmeticParams, needs_base=True,
              continual=_continual,
              elementwise=True, stored_inputs=True)
def task_arithmetic(tensors: Sequence[torch.Tensor], p: TaskArithmeticParams, *,
                    base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """θ0 + λ Σ w_i (θ_i − θ0); with ``normalize`` the sum is divided by Σ w_i.

    λ = 1/K with unit weights is exactly uniform averaging. Task vectors are formed in the
    compute dtype (fp32 by default), never in a bf16 storage dtype. With ``dtype`` the inputs
    come as stored: float32 arithmetic on bfloat16 or float32 inputs is one loop
    (``kernels.weighted_sum``, the same bits as the torch steps for up to 16 models).
    """
    from workers.merge import kernels

    fused = kernels.fused_inputs(tensors, base, dtype or base.dtype)
    if fused:
        divisor = float(weight_sum(p.weight, torch.float32)) if p.normalize else None
        return kernels.weighted_sum(fused, p.weight, has_base=True, fused_multiply=False,
                                    divisor=divisor, scale=p.scale).reshape(base.shape)
    tensors, base = cast_inputs(tensors, base, dtype)
    return combine(task_vectors(tensors, base), p.weight, base=base, sign_consensus=False,
                   normalize=p.normalize, scale=p.scale)
