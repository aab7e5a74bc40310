"""Passthrough: one model's tensor, optionally scaled; with slices, stacks layer ranges of
different models ("frankenmerges", as in mergekit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import merge_method, per_model


@dataclass(frozen=True)
class PassthroughParams:
    scale: tuple[float, ...] = per_model(1.0)


@merge_method("passthrough", params=PassthroughParams, needs_base=False, max_models=1,
              elementwise=True)
def passthrough(tensors: Sequence[torch.Tensor], p: PassthroughParams) -> torch.Tensor:
    """The single input tensor times ``scale`` (default 1: unchanged).

    Takes exactly one model per tensor: list one source per slice to stack layers."""
    (t,) = tensors
    return t if p.scale[0] == 1.0 else t * p.scale[0]
