"""PLeaS: permutations, then layer-by-layer least squares (Nasery et al., 2024,
arXiv:2407.02447)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch

from workers.align.transforms import stored
from workers.merge.registry import Alignment, internal, merge_method, param


@dataclass(frozen=True)
class PleasParams:
    width: float = param(1.0, ge=1, le=2)  # merged MLP width, a multiple of the models' n
    ridge: float = param(1e-4, ge=0)  # least squares' ridge, relative to the mean diagonal
    transforms: str = internal("", "driver")  # the solved alignment (URI#sha256)
    fitted: str = internal("", "driver")  # the fitted model's tensors (URI#sha256)
    shapes: str = internal("{}", "driver")  # JSON {tensor: shape} of the resized tensors


def _shapes(p: PleasParams) -> dict[str, tuple[int, ...]]:
    return {name: tuple(shape) for name, shape in json.loads(p.shapes).items()}


@merge_method("pleas", params=PleasParams, needs_base=False, min_models=2, max_models=2,
              alignment=Alignment(reads="activations", solver="refit"), wants_name=True,
              out_shapes=_shapes)
def pleas(tensors: Sequence[torch.Tensor], p: PleasParams, *, name: str) -> torch.Tensor:
    """Partially match two models' MLP units to a width between n and 2n, then fit each MLP
    layer by least squares on the merged prefix's activations.

    Models need not share a base; `data` gives unlabelled inputs. Residual stream and
    attention heads are matched and averaged (activation matching); each block's MLP is
    refitted in depth order, so later layers correct for the merge before them. `width`
    sets the merged MLP width (the output's intermediate_size).
    """
    return stored(p.fitted, name).to(tensors[0].dtype)
