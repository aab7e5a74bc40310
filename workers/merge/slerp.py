"""Spherical linear interpolation of two models, per tensor (Shoemake, 1985)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param

DOT_THRESHOLD = 0.9995  # |cos Ω| above this: the vectors are (anti)parallel, interpolate linearly
_NORM_EPS = 1e-8


@dataclass(frozen=True)
class SlerpParams:
    t: float = param(0.5, ge=0, le=1)  # 0 returns the first model, 1 the second


@merge_method("slerp", params=SlerpParams, needs_base=False, min_models=2, max_models=2)
def slerp(tensors: Sequence[torch.Tensor], p: SlerpParams) -> torch.Tensor:
    """sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1 with Ω the angle between the flattened tensors.

    Exactly two models. Falls back to linear interpolation when |cos Ω| > 0.9995 (parallel or
    antiparallel, where sin Ω → 0); zero tensors are treated as parallel to anything. The angle
    is computed over the whole tensor; vary ``t`` per tensor with ``merge.overrides``.
    Coefficients are computed in the compute dtype, as mergekit does.
    """
    v0, v1 = tensors
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    t = torch.tensor(p.t, dtype=v0.dtype)
    if a.shape[1] == 0:
        return v0.clone()
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > _NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _NORM_EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    if dot.abs().item() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)
