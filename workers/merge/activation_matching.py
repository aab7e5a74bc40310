"""Activation matching: permute units by the correlation of their activations on data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.align.transforms import merged
from workers.merge.registry import Alignment, internal, merge_method


@dataclass(frozen=True)
class ActivationMatchingParams:
    transforms: str = internal("", "driver")  # the solved alignment (URI#sha256)


@merge_method("activation_matching", params=ActivationMatchingParams, needs_base=False,
              min_models=2, alignment=Alignment(reads="activations", solver="groups"),
              wants_name=True)
def activation_matching(tensors: Sequence[torch.Tensor], p: ActivationMatchingParams, *,
                        name: str) -> torch.Tensor:
    """Permute the other models' units to the first's by activation correlation, average.

    Models need not share a base; `data` gives unlabelled inputs. Each hidden space is
    assigned on its own (Hungarian on the Pearson correlation of the original models' units).
    """
    return merged(list(tensors), p.transforms, name)
