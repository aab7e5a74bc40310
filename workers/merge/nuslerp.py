"""NuSLERP: SLERP with weights instead of t, optionally of task vectors around a base, whole
tensor or row by row (mergekit's ``nuslerp``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param, per_model

_EPS = 1e-8  # |sin Ω| below this: colinear, interpolate linearly
_NORM_MIN = 1e-7


@dataclass(frozen=True)
class NuslerpParams:
    weight: tuple[float, ...] = per_model(1.0)  # t = w1 / (w0 + w1)
    flatten: bool = param(True)  # one angle for the whole tensor; false: one per vector
    row_wise: bool = param(False)  # without flatten: vectors along dim 0 (else the last dim)


@merge_method("nuslerp", params=NuslerpParams, needs_base=False, takes_base=True,
              min_models=2, max_models=2)
def nuslerp(tensors: Sequence[torch.Tensor], p: NuslerpParams, *,
            base: torch.Tensor | None) -> torch.Tensor:
    """SLERP of the two models (of their task vectors, base added back, when a base is given)
    at t = w1 / (w0 + w1) (0.5 when the weights sum to ~0), over the whole flattened tensor,
    or per vector along the last dim (dim 0 with ``row_wise``, mergekit's naming) with
    ``flatten: false``. Colinear vectors: linear interpolation."""
    total = sum(p.weight)
    t = 0.5 if abs(total) < 1e-6 else p.weight[1] / total
    v0, v1 = tensors
    if base is not None:
        return base + _slerp(t, v0 - base, v1 - base, p)
    return _slerp(t, v0, v1, p)


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, p: NuslerpParams) -> torch.Tensor:
    shape = v0.shape
    transpose = p.row_wise and not p.flatten
    if p.flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif transpose:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_MIN)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_MIN)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if transpose:
        out = out.transpose(0, -1)
    return out.reshape(shape)
