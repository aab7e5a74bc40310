"""DELLA-TIES: DELLA's ranked drop with TIES' sign election (Deep et al., 2024)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workers.merge.della_linear import DellaParams, drop_and_rescale
from workers.merge.registry import merge_method
from workers.merge.task_vectors import combine


@merge_method("della", params=DellaParams, needs_base=True, uses_rng=True)
def della(tensors: Sequence[torch.Tensor], p: DellaParams, *, base: torch.Tensor,
          rng: Sequence[np.random.BitGenerator]) -> torch.Tensor:
    """DELLA-sparsified task vectors merged with TIES' sign election and disjoint sum (the
    disjoint mean with ``normalize``). Same keyed masks as ``della_linear``."""
    return combine(drop_and_rescale(tensors, p, base, rng), p.weight, base=base,
                   sign_consensus=True, normalize=p.normalize, scale=p.scale)
