"""MuDSC: merging under dual-space constraints (Xu et al., CVPR 2024, arXiv:2403.17441)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.align.transforms import merged
from workers.merge.registry import internal, merge_method, param


@dataclass(frozen=True)
class MudscParams:
    variant: str = param("zip", choices=("zip", "perm"))  # zip units, or permute and average
    f: float = param(0.5, ge=0, le=1)  # weight of the weight-space similarity
    alpha: float = param(0.5)  # zip: as ZipIt!'s (MuDSC's code defaults)
    beta: float = param(1.0, ge=0)
    max_sweeps: int = param(100, ge=1)  # coordinate descent over the groups
    stop: int = param(-1, ge=-1)  # partial: merge the stem and the first `stop` layers only,
    # each model keeping the rest (written with its head); -1: every layer (full)
    transforms: str = internal("", "driver")  # the solved alignment (URI#sha256)


@merge_method("mudsc", params=MudscParams, needs_base=False, min_models=2,
              alignment="dual", wants_name=True)
def mudsc(tensors: Sequence[torch.Tensor], p: MudscParams, *, name: str) -> torch.Tensor:
    """Align models on weight- and activation-space similarity together, then merge.

    Models need not share a base; `data` gives unlabelled inputs. Similarity is
    f * weight-signature correlation + (1 - f) * activation correlation; `variant: perm`
    permutes and averages, `zip` zips free groups as ZipIt! does (heads permuted).
    """
    return merged(list(tensors), p.transforms, name)
