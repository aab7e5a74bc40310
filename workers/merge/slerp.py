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


_CHUNK = 1 << 20  # elements per partial norm and dot (mergekit's grouping of the sums)


@merge_method("slerp", params=SlerpParams, needs_base=False, min_models=2, max_models=2)
def slerp(tensors: Sequence[torch.Tensor], p: SlerpParams) -> torch.Tensor:
    """sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1 with Ω the angle between the flattened tensors.

    Exactly two models. Falls back to linear interpolation when |cos Ω| > 0.9995 (parallel or
    antiparallel, where sin Ω → 0); zero tensors are treated as parallel to anything. The angle
    is computed over the whole tensor; vary ``t`` per tensor with a gradient or conditions.
    Arithmetic is float32 (float64 for float64 inputs) whatever the compute dtype, norms and
    dot products summed over 2^20-element pieces, as mergekit does, so results are equal.
    """
    v0, v1 = tensors
    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(work)
    b = v1.reshape(-1).to(work)
    t = torch.tensor(p.t, dtype=work)
    if a.numel() == 0:
        return v0.clone()
    pieces = range(0, a.numel(), _CHUNK)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[i:i + _CHUNK]) for i in pieces]))
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[i:i + _CHUNK]) for i in pieces]))
    norm_a = torch.where(norm_a > _NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _NORM_EPS, norm_b, 1)
    dot = torch.stack([((a[i:i + _CHUNK] / norm_a) * (b[i:i + _CHUNK] / norm_b)).sum()
                       for i in pieces]).sum().clamp(-1, 1)
    if dot.abs().item() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).to(v0.dtype).reshape(v0.shape)
