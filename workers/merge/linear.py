"""Linear merge / model soup (Wortsman et al., 2022, arXiv:2203.05482)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import ContinualStep, merge_method, param, per_model
from workers.merge.task_vectors import cast_inputs


@dataclass(frozen=True)
class LinearParams:
    weight: tuple[float, ...] = per_model(1.0)
    normalize: bool = param(True)


def _continual(params: dict, per_model: bool, held: int, state: dict) -> ContinualStep | None:
    """A uniform soup of t models is (t − 1) parts of the previous soup and one of the new
    model: a running mean."""
    if per_model or not params.get("normalize", True) or "weight" in params:
        return None
    return ContinualStep(params, previous={"weight": float(held)}, new={"weight": 1.0})


@merge_method("linear", params=LinearParams, needs_base=False, elementwise=True,
              continual=_continual,
              stored_inputs=True)
def linear(tensors: Sequence[torch.Tensor], p: LinearParams, *,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted average Σ w_i θ_i, divided by Σ w_i when ``normalize`` (uniform soup by default).

    No base. Accumulates in model order, each term as a fused multiply-add, as mergekit's
    ``addcmul_`` does, in float32 (float64 for float64): a 16-bit compute dtype rounds the
    inputs to it, the sum once at the end (mergekit 0.1.5 under ``dtype: bfloat16``; a
    bfloat16 running sum would round after every model). With ``dtype`` the inputs come as
    stored: float32 arithmetic on bfloat16 or float32 inputs is one loop
    (``kernels.weighted_sum``).
    """
    from workers.merge import kernels

    compute = dtype or tensors[0].dtype
    work = torch.float64 if compute == torch.float64 else torch.float32
    if compute != work:
        tensors, _ = cast_inputs(tensors, None, compute)
    weights = torch.tensor(list(p.weight), dtype=work)
    divisor = weights.sum() if p.normalize else None
    fused = kernels.fused_inputs(tensors, None, work)
    if fused:
        return kernels.weighted_sum(fused, p.weight, has_base=False, fused_multiply=True,
                                    divisor=None if divisor is None else float(divisor)
                                    ).reshape(tensors[0].shape).to(compute)
    tensors, _ = cast_inputs(tensors, None, work)
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights.unbind(0)):
        out.addcmul_(t, w)
    if divisor is not None:
        out.div_(divisor)
    return out.to(compute)
