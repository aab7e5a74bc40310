"""Linear merge / model soup (Wortsman et al., 2022, arXiv:2203.05482)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param, per_model


@dataclass(frozen=True)
class LinearParams:
    weight: tuple[float, ...] = per_model(1.0)
    normalize: bool = param(True)


@merge_method("linear", params=LinearParams, needs_base=False, elementwise=True)
def linear(tensors: Sequence[torch.Tensor], p: LinearParams) -> torch.Tensor:
    """Weighted average Σ w_i θ_i, divided by Σ w_i when ``normalize`` (uniform soup by default).

    No base. Accumulates in the compute dtype in model order (same order as mergekit).
    """
    out = torch.zeros_like(tensors[0])
    weights = torch.tensor(list(p.weight), dtype=out.dtype)
    for t, w in zip(tensors, weights.unbind(0)):
        out.addcmul_(t, w)
    if p.normalize:
        out.div_(weights.sum())
    return out
