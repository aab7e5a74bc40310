"""Weight matching (Git Re-Basin, Ainsworth et al., ICLR 2023, arXiv:2209.04836)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.align.transforms import merged
from workers.merge.registry import Alignment, internal, merge_method, param


@dataclass(frozen=True)
class WeightMatchingParams:
    max_sweeps: int = param(100, ge=1)  # coordinate-descent sweeps over the groups
    schedule: str = param("sequential", choices=("sequential", "colors"))  # colors: groups
    # that share no tensor stepped at once on the workers (Jacobi-style; another order)
    transforms: str = internal("", "driver")  # the solved alignment (URI#sha256)


@merge_method("weight_matching", params=WeightMatchingParams, needs_base=False, min_models=2,
              alignment=Alignment(reads="weights", solver="coordinate_descent"),
              wants_name=True)
def weight_matching(tensors: Sequence[torch.Tensor], p: WeightMatchingParams, *,
                    name: str) -> torch.Tensor:
    """Permute the other models' units to best match the first's weights, then average.

    Models need not share a base. The permutation of every hidden space (residual stream,
    MLP hidden, attention heads) maximises Σ⟨W_A, π(W_B)⟩ by coordinate descent; no data.
    `schedule: colors` steps groups that share no tensor together, on the workers.
    """
    return merged(list(tensors), p.transforms, name)
