"""NearSwap: keep the base where a second model is close to it, take the other model where
it is far (mergekit's community method, after alchemonaut's QuartetAnemoi merge)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, param

_MIN_DIFF = 1e-6


@dataclass(frozen=True)
class NearswapParams:
    t: float = param(0.0001, ge=0)  # distance below which an entry moves fully to the model


@merge_method("nearswap", params=NearswapParams, needs_base=True, min_models=1, max_models=1,
              elementwise=True)
def nearswap(tensors: Sequence[torch.Tensor], p: NearswapParams, *,
             base: torch.Tensor) -> torch.Tensor:
    """w · θ1 + (1 − w) · θ0 per entry, with w = clamp(t / max(|θ1 − θ0|, 1e-6), 0, 1).

    One model and the base. Entries within ``t`` of the base take the model's value, entries
    far from it stay near the base; t = 0 returns the base."""
    (other,) = tensors
    weight = (p.t / (base - other).abs().clamp(min=_MIN_DIFF)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base
